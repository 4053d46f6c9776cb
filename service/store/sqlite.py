"""SQLite storage (the default): WAL, synchronous=NORMAL, busy_timeout, BEGIN IMMEDIATE writers.

One connection per thread. Writers take the database's write lock up front with ``BEGIN
IMMEDIATE`` so two reports never both read a run and then fail to upgrade their lock; a
writer that still cannot get the lock within ``busy_timeout`` becomes :class:`StoreBusy`
(503 + Retry-After). Several uvicorn workers may share one file: SQLite's own lock is the
only serialisation, nothing process-local.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from service.runs.repository import RunRecord, StoreBusy, StoreError, WouldBlock
from service.store.sql import RUN_COLUMNS, SqlStore, SqlTx, record_of

_BUSY_MARKERS = ("locked", "busy")


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

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.path = sqlite_path(url)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._inline_commits = 0
        self._checkpointer: ThreadPoolExecutor | None = None
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ValueError(f"the directory of the SQLite database does not exist: {parent}")

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

    def _after_inline_commit(self) -> None:
        self._inline_commits += 1
        if self._inline_commits % self.checkpoint_every == 0:
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="lrserve-wal")
            self._checkpointer.submit(self._checkpoint)

    def _translate(self, exc: sqlite3.DatabaseError) -> StoreError:
        """The store's error for a driver error (busy/locked: retry later, 503)."""
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            if any(m in text for m in _BUSY_MARKERS):
                if getattr(self._local, "nowait", False):
                    return WouldBlock("the SQLite write lock is taken")
                return StoreBusy("the SQLite database is locked by another writer")
            return StoreBusy(f"the SQLite database is unavailable: {exc}")
        return StoreError(f"SQLite error: {exc}")

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

    def insert_run_if_absent(self, conn: Any, record: RunRecord) -> bool:
        cur = conn.execute(
            "INSERT OR IGNORE INTO runs (id, spec, state, overrides, version, step, "
            "completed_step, event_seq, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.spec,
                record.state,
                record.overrides,
                record.version,
                record.step,
                record.completed_step,
                record.event_seq,
                record.created_at,
                record.updated_at,
            ),
        )
        return bool(cur.rowcount)

    def migrate(self) -> None:
        with self.errors():
            conn = self._connection()
            # WAL is a property of the file: set it once, outside any transaction.
            mode = self._set_wal(conn)
            if mode is None or str(mode[0]).lower() != "wal":  # pragma: no cover
                raise StoreError(f"could not switch {self.path} to WAL mode")
            with self.write_conn() as wconn:
                self.apply_migrations(wconn)

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


_RUN_VERSION = "SELECT version, created_at, step, leased_until FROM runs WHERE id = ?"
_COMPLETED_STEP = "SELECT completed_step FROM runs WHERE id = ?"
_LOCK_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"


class _Transaction:
    """``SqliteStore.transaction``: the run locked (BEGIN IMMEDIATE) and read; commit on a
    clean exit, roll back otherwise; driver errors become the store's errors."""

    __slots__ = ("_conn", "_nowait", "_run_id", "_store")

    def __init__(self, store: SqliteStore, run_id: str) -> None:
        self._store = store
        self._run_id = run_id

    def __enter__(self) -> SqlTx | None:
        store = self._store
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
        return None if row is None else SqlTx(store, conn, record_of(row))

    def _abort(self) -> None:
        try:
            conn = getattr(self, "_conn", None)
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            self._store._write_lock.release()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        store = self._store
        if exc is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException as commit_exc:
                self._abort()
                if isinstance(commit_exc, sqlite3.DatabaseError):
                    raise store._translate(commit_exc) from commit_exc
                raise
            store._write_lock.release()
            if self._nowait:
                store._after_inline_commit()
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
