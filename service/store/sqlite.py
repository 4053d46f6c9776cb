"""SQLite storage (the default): WAL, synchronous=NORMAL, busy_timeout, BEGIN IMMEDIATE writers.

One connection per thread. Writers take the database's write lock up front with ``BEGIN
IMMEDIATE`` so two reports never both read a run and then fail to upgrade their lock; a
writer that still cannot get the lock within ``busy_timeout`` becomes :class:`StoreBusy`
(503 + Retry-After). Several uvicorn workers may share one file: SQLite's own lock is the
only serialisation, nothing process-local.

Faults of the file system are told apart from a busy database: a directory the server may not
write, a read-only file system or a file that is no SQLite database refuse the start
(:class:`StoreFault`, with the fix in the message); a full disk is a 503 that recovers, and
:meth:`SqliteStore.ping` (``/readyz``) fails while free space is below ``min_free_bytes``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from service.runs.repository import StoreBusy, StoreError, StoreFault, WouldBlock
from service.store.sql import RUN_COLUMNS, SqlStore, SqlTx, record_of

_BUSY_MARKERS = ("locked", "busy")

# SQLite's primary result codes (the low byte of an extended code) for file-system faults.
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 3, 8, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_FS_CODES = frozenset({_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN})
DISK_FULL_HOLD_S = 5.0
"""How long after a write failed for a full disk ``ping`` keeps answering not ready."""


def sqlite_path(url: str) -> str:
    """``sqlite:///./x.db`` -> ``./x.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(
            f"not a sqlite URL: {url!r} (expected sqlite:///relative.db or sqlite:////abs.db)"
        )
    path = url[len(prefix) :]
    if path == ":memory:":
        raise ValueError("an in-memory SQLite database cannot be shared by connections")
    return path


class SqliteStore(SqlStore):
    dialect = "sqlite"
    # A WAL reader never waits for the writer: a point read costs a few microseconds.
    inline_reads = True
    # A write is tried on the event loop with a connection that never waits for a lock
    # (busy_timeout 0, see nowait()); only when the lock is taken does it go to a thread.
    # A worker-thread hop costs more CPU than the whole report transaction.
    inline_writes = True
    checkpoint_every = 1024
    """Inline commits between two background WAL checkpoints (the loop never fsyncs)."""

    def __init__(
        self, url: str, busy_timeout_ms: int = 5000, min_free_bytes: int = 32 * 1024 * 1024
    ) -> None:
        self.path = sqlite_path(url)
        self.busy_timeout_ms = busy_timeout_ms
        self.min_free_bytes = min_free_bytes
        self._disk_full_at = -DISK_FULL_HOLD_S  # monotonic time of the last SQLITE_FULL
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._inline_commits = 0
        self._checkpointer: ThreadPoolExecutor | None = None
        self.directory = parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ValueError(
                f"the directory of the SQLite database does not exist: {parent} (create it, "
                "or set LRSERVE_DATABASE to a file in an existing directory)"
            )

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "nowait", False):
            return self._nowait_connection()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # only so close() may close it from another thread
                timeout=self.busy_timeout_ms / 1000,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            # Children are deleted explicitly with their run (see delete_run), so the
            # per-insert foreign-key lookups would only cost time on every report.
            conn.execute("PRAGMA foreign_keys = OFF")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _nowait_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "nowait_conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = OFF")
            # Checkpoints (with their fsync) run in a background thread instead.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._local.nowait_conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def nowait(self) -> _NoWait:
        """Within this block, a write that would wait for a lock raises :class:`WouldBlock`
        at once (before anything is written) instead of waiting."""
        return _NoWait(self._local)

    def _checkpoint(self) -> None:
        # Two passes. The first copies the bulk of the WAL into the database while writers go
        # on. The second, under this process's write lock, copies only what they appended
        # meanwhile, so it completes (no writer of ours appends while it runs) and the next
        # writer starts the WAL over. Without it a steady stream of writes always outran the
        # checkpoint and the WAL grew without bound (400 MB in 5 s of bench_http.py), every
        # commit getting slower. Inline writers refused meanwhile retry shortly (Runs._write).
        with contextlib.suppress(sqlite3.Error):
            conn = self._connection()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            with self._write_lock:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _after_inline_commit(self, writes: int = 1) -> None:
        # Counted in writes, not commits: a group commit carries many reports' pages.
        before = self._inline_commits
        self._inline_commits += writes
        if self._inline_commits // self.checkpoint_every != before // self.checkpoint_every:
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="lrserve-wal")
            self._checkpointer.submit(self._checkpoint)

    def _translate(self, exc: sqlite3.DatabaseError) -> StoreError:
        """The store's error for a driver error: busy/locked, a full disk and file-system
        faults are :class:`StoreBusy` (503 + Retry-After, nothing written), with a detail
        that says what is wrong; anything else a :class:`StoreError`."""
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            self._disk_full_at = time.monotonic()
            return StoreBusy(
                f"the disk holding the SQLite database is full ({self.directory}); nothing was "
                "written: free space there",
                retry_after=5,
            )
        if code in _FS_CODES:
            fault = self.file_fault(probe=False)
            return StoreBusy(fault[0] if fault else f"the SQLite database cannot be written: {exc}")
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            if any(m in text for m in _BUSY_MARKERS):
                if getattr(self._local, "nowait", False):
                    return WouldBlock("the SQLite write lock is taken")
                return StoreBusy("the SQLite database is locked by another writer")
            return StoreBusy(f"the SQLite database is unavailable: {exc}")
        return StoreError(f"SQLite error: {exc}")

    def file_fault(self, probe: bool, directory: bool = True) -> tuple[str, bool] | None:
        """Why the server cannot write its database file, with the fix, and whether waiting
        cannot help (anything but a full disk); None when it can write.

        SQLite in WAL mode writes the file and creates ``-wal`` and ``-shm`` files beside it,
        so the directory must be writable too. ``probe`` creates (and removes) a file in the
        directory, which tells permission, read-only file system and a full disk apart where
        ``os.access`` cannot (root passes every permission check of ``access``); without it
        the check costs a few ``access`` calls. ``directory=False`` leaves out whether new
        files can be made there: a running server keeps its ``-wal`` open, so it writes on
        while the directory is not writable (the next start refuses).
        """
        where = self.directory
        uid = os.geteuid() if hasattr(os, "geteuid") else "of the server"
        fix = "or set LRSERVE_DATABASE to a writable path"
        if not os.path.isdir(where):
            return (
                f"cannot write {self.path}: the directory {where} does not exist (a volume "
                f"not mounted?) — create it {fix}",
                True,
            )
        failed: OSError | None = None
        if probe:
            try:
                fd, test = tempfile.mkstemp(prefix=".lrserve-write-test-", dir=where)
                try:
                    os.write(fd, b"x")
                finally:
                    os.close(fd)
                    os.unlink(test)
            except OSError as exc:
                failed = exc
        elif directory and not os.access(where, os.W_OK | os.X_OK):
            failed = OSError(errno.EACCES, "permission denied")
        if failed is None:
            for name in (self.path, f"{self.path}-wal", f"{self.path}-shm"):
                try:
                    if probe:
                        os.close(os.open(name, os.O_RDWR))
                    elif os.path.exists(name) and not os.access(name, os.R_OK | os.W_OK):
                        raise OSError(errno.EACCES, "permission denied")
                except FileNotFoundError:
                    continue  # not there (yet, or any more: the last connection removes -wal)
                except OSError as exc:
                    failed, where = exc, name
                    break
        if failed is None:
            return None
        if failed.errno == errno.EROFS:
            message = (
                f"cannot write {self.path}: {where} is on a read-only file system — mount the "
                f"volume read-write (with a read-only root file system, put a writable volume "
                f"at {self.directory}) {fix}"
            )
        elif failed.errno in (errno.EACCES, errno.EPERM):
            message = (
                f"cannot write {self.path}: permission denied on {where} — make it writable "
                f"by uid {uid} (the user the server runs as) {fix}"
            )
        elif failed.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"cannot write {self.path}: no space left on {self.directory} — free space",
                False,
            )
        else:
            message = f"cannot write {self.path}: {failed.strerror or failed} ({where}) {fix}"
        return message, True

    def ping(self) -> None:
        """The database answers, its files can be written and the disk has room: a read, a
        few ``access`` calls and a ``statvfs``, no write (the readiness probe polls this)."""
        with self.errors():
            self._connection().execute("SELECT 1").fetchone()
        fault = self.file_fault(probe=False, directory=False)
        if fault is not None:
            raise StoreBusy(fault[0])
        if time.monotonic() - self._disk_full_at < DISK_FULL_HOLD_S:
            raise StoreBusy(
                f"a write failed for a full disk in the last {DISK_FULL_HOLD_S:g} s "
                f"({self.directory}): free space there",
                retry_after=5,
            )
        try:
            st = os.statvfs(self.directory)
        except OSError as exc:
            raise StoreBusy(f"cannot stat {self.directory}: {exc.strerror}") from exc
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise StoreBusy(
                f"{free // 1024} KiB free on {self.directory}, less than the "
                f"{self.min_free_bytes // 1024} KiB writes need (LRSERVE_MIN_FREE_BYTES): free "
                "space there",
                retry_after=5,
            )

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from exc

    @contextmanager
    def read_conn(self) -> Iterator[sqlite3.Connection]:
        yield self._connection()

    def _lock_for_write(self) -> bool:
        """Take this process's write lock; returns whether the write is a ``nowait`` one."""
        # The threads of this process queue on a Python lock first: SQLite's busy handler polls
        # with sleeps of up to 100 ms, which under a pool of writer threads turned into a p99 of
        # 600 ms and a fifth of the throughput (bench/bench_http.py). BEGIN IMMEDIATE still
        # serialises writers of other processes on the database itself.
        nowait: bool = getattr(self._local, "nowait", False)
        if nowait:
            if not self._write_lock.acquire(blocking=False):
                raise WouldBlock("another thread of this process is writing")
        elif not self._write_lock.acquire(timeout=self.busy_timeout_ms / 1000):
            raise StoreBusy("the SQLite database is locked by another writer")
        return nowait

    @contextmanager
    def write_conn(self) -> Iterator[sqlite3.Connection]:
        nowait = self._lock_for_write()
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if nowait:
                self._after_inline_commit()
        finally:
            self._write_lock.release()

    def transaction(self, run_id: str) -> _Transaction:
        # The same as SqlStore.transaction, as one class instead of three generator context
        # managers: this is every report's path, and those cost microseconds each.
        return _Transaction(self, run_id)

    group_commit = True
    """:meth:`group` is available: many writes in one transaction, one savepoint each."""

    def group(self, writes: int) -> _Group:
        """One transaction (BEGIN IMMEDIATE ... COMMIT) around ``writes`` transactions of this
        thread: within the block, :meth:`transaction` opens a savepoint instead, so each write
        commits or rolls back alone inside the group, and all of them become durable at the
        group's one COMMIT. Raises as :meth:`transaction` does when the lock cannot be taken
        (:class:`WouldBlock` under :meth:`nowait`), before anything is written."""
        return _Group(self, writes)

    # The point reads of the hot paths, without the generic context managers (see above).
    def run_version(self, run_id: str) -> tuple[int, str, int | None, int] | None:
        try:
            row = self._connection().execute(_RUN_VERSION, (run_id,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from exc
        if row is None:
            return None
        return int(row[0]), row[1], None if row[2] is None else int(row[2]), int(row[3])

    def completed_step(self, run_id: str) -> tuple[bool, int | None]:
        try:
            row = self._connection().execute(_COMPLETED_STEP, (run_id,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from exc
        if row is None:
            return False, None
        return True, None if row[0] is None else int(row[0])

    def migrate(self) -> None:
        """Switch the file to WAL and migrate it; :class:`StoreFault` when the file cannot be
        written where it is or is no SQLite database (waiting would not help)."""
        fault = self.file_fault(probe=True)
        if fault is not None:
            raise StoreFault(fault[0]) if fault[1] else StoreBusy(fault[0], retry_after=5)
        try:
            with self.errors():
                conn = self._connection()
                # WAL is a property of the file: set it once, outside any transaction.
                mode = self._set_wal(conn)
                if mode is None or str(mode[0]).lower() != "wal":  # pragma: no cover
                    raise StoreError(f"could not switch {self.path} to WAL mode")
                with self.write_conn() as wconn:
                    self.apply_migrations(wconn)
        except StoreError as exc:
            cause = exc.__cause__
            code = (getattr(cause, "sqlite_errorcode", None) or 0) & 0xFF
            if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
                raise StoreFault(
                    f"{self.path} is not a usable SQLite database ({cause}) — point "
                    "LRSERVE_DATABASE at lrserve's database file, or restore it from a backup"
                ) from exc
            if code in _FS_CODES:
                # The probe passed, so something else refuses (a file SQLite opened read-only,
                # a lock it cannot take): name what SQLite says.
                fault = self.file_fault(probe=True)
                if fault is not None and not fault[1]:
                    raise
                raise StoreFault(
                    fault[0]
                    if fault
                    else f"cannot write {self.path}: {cause} — check the permissions and the "
                    "mount of the file and its directory, or set LRSERVE_DATABASE"
                ) from exc
            raise

    def _set_wal(self, conn: sqlite3.Connection) -> Any:
        # Switching a fresh file to WAL while another process or thread does the same may
        # answer "database is locked" at once, without SQLite's busy handler: retry it
        # within busy_timeout like any other lock wait.
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if not any(m in text for m in _BUSY_MARKERS) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.shutdown(wait=True)
            self._checkpointer = None
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):  # best effort at shutdown
                conn.close()


_RUN_VERSION = "SELECT values_version, created_at, step, leased_until FROM runs WHERE id = ?"
_COMPLETED_STEP = "SELECT completed_step FROM runs WHERE id = ?"
_LOCK_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"


def _roll_back(store: SqliteStore, conn: sqlite3.Connection | None) -> None:
    """Roll back ``conn``'s open transaction, if any, and release the process's write lock."""
    try:
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")
    finally:
        store._write_lock.release()


def _commit(
    store: SqliteStore,
    conn: sqlite3.Connection,
    nowait: bool,
    writes: int,
    committed: list[Callable[[], None]],
    abort: Callable[[], None],
) -> None:
    """COMMIT a transaction of ``writes`` writes and release the write lock, then what waits
    on the commit (the inline writes' checkpoint count, ``committed``'s callbacks); a failed
    COMMIT is ``abort``-ed and raised as the store's error."""
    try:
        conn.execute("COMMIT")
    except BaseException as exc:
        abort()
        if isinstance(exc, sqlite3.DatabaseError):
            raise store._translate(exc) from exc
        raise
    store._write_lock.release()
    if nowait:
        store._after_inline_commit(writes)
    for callback in committed:
        callback()


class _Transaction:
    """``SqliteStore.transaction``: the run locked (BEGIN IMMEDIATE) and read; commit on a
    clean exit, roll back otherwise; driver errors become the store's errors."""

    __slots__ = ("_conn", "_grouped", "_nowait", "_run_id", "_store", "_tx")

    def __init__(self, store: SqliteStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id
        self._tx: SqlTx | None = None

    def __enter__(self) -> SqlTx | None:
        store = self._store
        group: sqlite3.Connection | None = getattr(store._local, "group", None)
        if group is not None:
            return self._enter_savepoint(group)
        self._grouped = False
        self._nowait = store._lock_for_write()
        try:
            conn = self._conn = store._connection()
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_LOCK_RUN, (self._run_id,)).fetchone()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, sqlite3.DatabaseError):
                raise store._translate(exc) from exc
            raise
        self._tx = None if row is None else SqlTx(store, conn, record_of(row))
        return self._tx

    def _enter_savepoint(self, conn: sqlite3.Connection) -> SqlTx | None:
        # Within a group (SqliteStore.group): the lock is the group's, and a savepoint makes
        # this write roll back alone (a refused report alters nothing, its neighbours commit).
        store = self._store
        self._grouped = True
        self._conn = conn
        if not conn.in_transaction:
            # A fault (a full disk, an I/O error) rolled the whole group back: a write now
            # would autocommit on its own, outside the group that is to fail.
            raise StoreBusy("the SQLite group transaction was rolled back")
        try:
            conn.execute("SAVEPOINT lrserve_write")
            row = conn.execute(_LOCK_RUN, (self._run_id,)).fetchone()
        except BaseException as exc:
            self._rollback_savepoint()
            if isinstance(exc, sqlite3.DatabaseError):
                raise store._translate(exc) from exc
            raise
        self._tx = None if row is None else SqlTx(store, conn, record_of(row))
        return self._tx

    def _rollback_savepoint(self) -> None:
        conn = self._conn
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK TO lrserve_write")
                conn.execute("RELEASE lrserve_write")

    def _abort(self) -> None:
        _roll_back(self._store, getattr(self, "_conn", None))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        if self._grouped:
            if exc is None:
                try:
                    self._conn.execute("RELEASE lrserve_write")
                    if self._tx is not None and self._tx.committed:
                        # Durable only at the group's COMMIT: the group calls them then.
                        store._local.committed.extend(self._tx.committed)
                    return
                except BaseException as release_exc:
                    self._rollback_savepoint()
                    if isinstance(release_exc, sqlite3.DatabaseError):
                        raise store._translate(release_exc) from release_exc
                    raise
            self._rollback_savepoint()
            if isinstance(exc, sqlite3.DatabaseError):
                raise store._translate(exc) from exc
            return
        if exc is None:
            committed = [] if self._tx is None else self._tx.committed
            _commit(store, self._conn, self._nowait, 1, committed, self._abort)
            return
        self._abort()
        if isinstance(exc, sqlite3.DatabaseError):
            raise store._translate(exc) from exc


class _Group:
    """``SqliteStore.group``: one BEGIN IMMEDIATE ... COMMIT around many writes' savepoints."""

    __slots__ = ("_conn", "_nowait", "_store", "_writes")

    def __init__(self, store: SqliteStore, writes: int) -> None:
        self._store = store
        self._writes = writes

    def __enter__(self) -> None:
        store = self._store
        self._nowait = store._lock_for_write()
        try:
            conn = self._conn = store._connection()
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self._abort()
            if isinstance(exc, sqlite3.DatabaseError):
                raise store._translate(exc) from exc
            raise
        store._local.group = conn
        store._local.committed = []

    def _abort(self) -> None:
        self._store._local.group = None
        self._store._local.committed = []
        _roll_back(self._store, getattr(self, "_conn", None))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        if exc is None:
            store._local.group = None
            committed, store._local.committed = store._local.committed, []
            _commit(store, self._conn, self._nowait, self._writes, committed, self._abort)
            return
        self._abort()
        if isinstance(exc, sqlite3.DatabaseError):
            raise store._translate(exc) from exc


class _NoWait:
    """``SqliteStore.nowait()`` (a class: it wraps every inline write)."""

    __slots__ = ("_local",)

    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.nowait = True

    def __exit__(self, *exc: object) -> None:
        self._local.nowait = False
