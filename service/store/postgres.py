"""PostgreSQL storage for several replicas: psycopg 3 with a connection pool.

Writers lock the run row with ``SELECT ... FOR UPDATE`` (so reports to one run from any
replica serialise in the database), run creation is ``INSERT ... ON CONFLICT DO NOTHING``
and the reports' primary key (run, step, rank) backs the idempotency check. Migrations
take a transaction-scoped advisory lock, so replicas starting together migrate once.

Connections die under the pool when PostgreSQL restarts or an administrator terminates the
backends. Each checkout therefore looks whether the server has sent anything on an idle
connection (a poll of the socket, no round trip): a terminated backend has sent its FATAL
and closed, so the connection is dropped there and another taken, and no request gets the
dead one. A write whose ``BEGIN`` still meets a dead connection is retried once on a fresh
one (nothing has been sent yet); a connection lost later in a transaction is a 503 and is
never retried here, because its ``COMMIT`` may have been applied (clients retry: a report's
key makes it idempotent).
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from service.runs.repository import StoreBusy, StoreError, StoreFault
from service.store.sql import SqlStore

MIGRATION_LOCK_KEY = 0x6C72_7365  # "lrse": one advisory lock id for schema migrations
STEPS_CHANNEL = "lrserve_steps"
"""NOTIFY channel of completed steps (payload ``"<step> <run id>"``): waiting reports on
every replica wake at once instead of polling."""

_BUSY = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.TooManyConnections,
)
_RESTARTING = (
    psycopg.errors.AdminShutdown,
    psycopg.errors.CrashShutdown,
    psycopg.errors.CannotConnectNow,
)
RECONNECT_TIMEOUT_S = 2.0
"""How long the pool retries one lost connection (after 1 s, then at 2 s) before it gives
the slot up; the next request that needs a connection then opens one at once. With
psycopg_pool's default (300 s) the back-off grew to a minute, so a replica kept answering 503
for up to that long after the database was back."""
READY_TIMEOUT_S = 1.0
"""How long the readiness check waits for a connection (probes time out after a few s)."""
CHECKPOINT_WAIT_S = 0.05
"""Most a scan waits for a pool connection to read a stored checkpoint (then it scans)."""
UNREACHABLE_WAIT_S = 0.25
"""How long a request waits for a connection while the last attempt to open one failed: it
gets its 503 at once instead of after the whole busy timeout, and a database that has come
back is found by the attempt the wait itself starts."""


class _Reachability:
    """What the pool's last attempt to open a connection met: None when it succeeded, else
    the driver's reason (``Connection refused``, ``password authentication failed ...``)."""

    error: str | None = None


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # 'connection failed: connection to server at "h", port 5432 failed: FATAL:  <reason>'
    return first.rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip()


def _connection_class(reach: _Reachability) -> type[psycopg.Connection[Any]]:
    """psycopg's connection class, recording each connection attempt's outcome in ``reach``
    (the pool opens connections in its own threads and only logs their errors)."""

    class _Connection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                reach.error = _reason(exc)
                raise
            reach.error = None
            return conn

    return _Connection


def _utf8_fault(conn: psycopg.Connection[Any]) -> str | None:
    """Why this database cannot hold lrserve's text, or None when it is UTF8."""
    row = conn.execute(
        "SELECT current_database(), pg_encoding_to_char(encoding) FROM pg_database "
        "WHERE datname = current_database()"
    ).fetchone()
    if row is None or row[1] == "UTF8":
        return None
    name, encoding = row
    return (
        f"the PostgreSQL database {name!r} has encoding {encoding}; lrserve needs UTF8 (run "
        "ids, metadata and metric names are Unicode, and a non-UTF8 database fails or "
        "mangles them). Create a UTF8 database, e.g. CREATE DATABASE lrserve ENCODING 'UTF8' "
        "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0; (createdb -E UTF8 -l C -T template0 "
        "lrserve), and point LRSERVE_DATABASE at it"
    )


def _unanswered(conn: psycopg.Connection[Any]) -> bool:
    """True when an idle connection is dead: the server sent something (a terminated
    backend's FATAL, or the end of the stream) that no query asked for."""
    if conn.closed or conn.broken:
        return True
    try:
        poller = select.poll()  # (select.select fails for descriptors above 1023)
        poller.register(conn.fileno(), select.POLLIN)
        if not poller.poll(0):
            return False
    except (OSError, psycopg.Error):
        return True
    try:
        conn.execute("")  # reads what arrived; raises when it was the end (a notice is fine)
    except psycopg.Error:
        return True
    return False


def preflight(url: str, timeout_s: float) -> None:
    """The start-up check of ``lrserve serve`` on one direct connection: :class:`StoreFault`
    for a database lrserve must not use (not UTF8), :class:`StoreBusy` (with the driver's
    reason) when the server cannot be reached now, which may pass."""
    try:
        conn = psycopg.connect(
            url, connect_timeout=max(1, int(timeout_s)), autocommit=True, client_encoding="UTF8"
        )
    except psycopg.OperationalError as exc:
        raise StoreBusy(f"PostgreSQL is unreachable ({_reason(exc)})") from exc
    except psycopg.Error as exc:  # (its message may quote the URL, password included)
        raise StoreFault(
            f"LRSERVE_DATABASE is not a valid PostgreSQL URL ({type(exc).__name__}) — use "
            "postgresql://user:password@host:5432/dbname"
        ) from exc
    with conn:
        fault = _utf8_fault(conn)
    if fault is not None:
        raise StoreFault(fault)


def _autocommit(conn: psycopg.Connection[Any]) -> None:
    # Reads are single statements; writers issue BEGIN themselves (see write_conn).
    conn.autocommit = True


class PostgresStore(SqlStore):
    dialect = "postgres"
    inline_reads = False
    inline_writes = False
    lock_suffix = " FOR UPDATE"

    def __init__(
        self, url: str, busy_timeout_ms: int = 5000, pool_min: int = 1, pool_max: int = 10
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s = busy_timeout_ms / 1000
        self._reach = _Reachability()
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            connection_class=_connection_class(self._reach),
            min_size=pool_min,
            max_size=pool_max,
            timeout=timeout_s,
            open=False,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            configure=self._configure,
            kwargs={
                # A report stuck behind a lock becomes a 503 instead of hanging forever.
                "options": f"-c lock_timeout={int(busy_timeout_ms)} -c statement_timeout=30000",
                "connect_timeout": max(1, int(timeout_s)),
                "application_name": "lrserve",
                # A network cut without a reset (packets dropped) would otherwise hold a pooled
                # connection, and the request on it, until the kernel gives up after minutes:
                # unacknowledged sends fail after 10 s, idle connections are probed.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 3,
                "keepalives_count": 3,
                "tcp_user_timeout": 10_000,
                # Text as UTF-8 whatever the database's encoding: on a SQL_ASCII database
                # psycopg would otherwise return bytes, and a run id read back as b"..."
                # broke every report (a foreign-key error, answered 503).
                "client_encoding": "UTF8",
            },
        )
        self._own_backends: dict[int, weakref.ref[psycopg.Connection[Any]]] = {}
        """Backend process id -> this pool's connection on it (see :meth:`listen`)."""
        self.pool.open(wait=False)
        self._heard: list[Callable[[str, int], None]] = []
        self._listen_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()

    def nowait(self) -> AbstractContextManager[None]:  # pragma: no cover - never inline
        return contextlib.nullcontext()

    def q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except _BUSY as exc:
            raise StoreBusy(f"PostgreSQL is busy: {type(exc).__name__}") from exc
        except _RESTARTING as exc:
            raise StoreBusy(
                f"PostgreSQL closed the connection ({type(exc).__name__}: the server is "
                "restarting or the session was terminated); the request may be sent again as is"
            ) from exc
        except PoolTimeout as exc:
            error = self._reach.error
            if error is not None:
                raise StoreBusy(f"PostgreSQL is unreachable ({error})") from exc
            raise StoreBusy(
                f"no PostgreSQL connection free within {self.timeout_s:g} s: all "
                f"{self.pool.max_size} connections of this worker are busy"
            ) from exc
        except psycopg.errors.DiskFull as exc:
            raise StoreBusy(
                "the PostgreSQL server's disk is full; nothing was written: free space there",
                retry_after=5,
            ) from exc
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            raise StoreBusy(
                "PostgreSQL is read-only (a standby, or default_transaction_read_only is on): "
                "point LRSERVE_DATABASE at the primary"
            ) from exc
        except psycopg.OperationalError as exc:
            raise StoreBusy(
                f"PostgreSQL is unreachable or dropped the connection ({type(exc).__name__})"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}") from exc

    def _getconn(self, deadline: float) -> psycopg.Connection[Any]:
        """A live connection from the pool by ``deadline``: dead ones are dropped without a
        round trip (see the module's docstring) and without psycopg_pool's ``check``, whose
        back-off slept a second or more per dead connection. The wait is cut short once an
        attempt to connect has failed (see :data:`UNREACHABLE_WAIT_S`)."""
        while True:
            wait = min(deadline - time.monotonic(), UNREACHABLE_WAIT_S)
            try:
                conn = self.pool.getconn(timeout=max(0.001, wait))
            except PoolTimeout:
                if self._reach.error is not None or time.monotonic() >= deadline:
                    raise
                continue  # busy, not down: wait on until the deadline
            if not _unanswered(conn):
                return conn
            self._drop(conn)

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        """Close a dead connection and hand it back: the pool replaces it."""
        with contextlib.suppress(Exception):
            conn.close()
        self.pool.putconn(conn)

    def scan_checkpoints(
        self, curve: str, most: int, least: int, limit: int
    ) -> list[tuple[int, bytes, bytes]]:
        # Asked by a scan, which may run inside a transaction holding a pool connection (a
        # report's plateau decision): a pool drained by such transactions must not make each
        # of them wait for a second one. With none free soon, the engine scans instead.
        with self.errors(), self.read_conn(CHECKPOINT_WAIT_S) as conn:
            return self.scan_checkpoints_on(conn, curve, most, least, limit)

    @contextmanager
    def read_conn(self, timeout_s: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        conn = self._getconn(
            time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        )
        try:
            yield conn
        finally:
            if conn.broken:
                self._drop(conn)
            else:
                self.pool.putconn(conn)

    @contextmanager
    def write_conn(self) -> Iterator[psycopg.Connection[Any]]:
        deadline = time.monotonic() + self.timeout_s
        conn = self._getconn(deadline)
        try:
            conn.execute("BEGIN")
        except psycopg.OperationalError:
            if not conn.broken:
                self.pool.putconn(conn)
                raise
            # Died between the check and BEGIN: nothing was sent, so once more on another.
            self._drop(conn)
            conn = self._getconn(deadline)
            try:
                conn.execute("BEGIN")
            except BaseException:
                self._drop(conn) if conn.broken else self.pool.putconn(conn)
                raise
        try:
            yield conn
            conn.commit()
        except BaseException:
            if not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
            raise
        finally:
            if conn.broken:
                self._drop(conn)
            else:
                self.pool.putconn(conn)

    def ping(self) -> None:
        """One round trip on a connection got within :data:`READY_TIMEOUT_S`: the server
        answers and takes writes (not a standby, not read-only)."""
        deadline = time.monotonic() + min(self.timeout_s, READY_TIMEOUT_S)
        with self.errors():
            conn = self._getconn(deadline)
            try:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"
                ).fetchone()
            finally:
                self._drop(conn) if conn.broken else self.pool.putconn(conn)
        if row is not None and (row[0] or row[1] == "on"):
            raise StoreBusy(
                "PostgreSQL is read-only (a standby, or default_transaction_read_only is on): "
                "point LRSERVE_DATABASE at the primary"
            )

    def migrate(self) -> None:
        """Migrate under the advisory lock; :class:`StoreFault` for a database that is not
        UTF8 (waiting would not help)."""
        with self.errors(), self.write_conn() as conn:
            fault = _utf8_fault(conn)
            if fault is not None:
                raise StoreFault(fault)
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            self.apply_migrations(conn)

    def announce(self, conn: Any, run_id: str, step: int) -> None:
        # Delivered when (and only if) the report's transaction commits.
        conn.execute("SELECT pg_notify(%s, %s)", (STEPS_CHANNEL, f"{step} {run_id}"))

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new pool connection: autocommit, and its backend noted as this store's."""
        _autocommit(conn)
        backends = self._own_backends
        for pid, ref in list(backends.items()):
            if ref() is None:
                backends.pop(pid, None)
        backends[conn.info.backend_pid] = weakref.ref(conn)

    def _announced_here(self, backend_pid: int) -> bool:
        """Whether a notification came from one of this pool's open connections."""
        ref = self._own_backends.get(backend_pid)
        conn = ref() if ref is not None else None
        return conn is not None and not conn.closed

    def listen(self, heard: Callable[[str, int], None]) -> bool:
        """Call ``heard`` for the completions other processes commit (replicas, workers).

        This store's own are not heard: the report that committed one answers the waits of
        its process itself, with its result (``Runs.report``); heard first, the waits would
        each read the step instead, and the completion would find none left to answer.
        """
        with self._listen_lock:
            self._heard.append(heard)
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="lrserve-pg-listen", daemon=True
                )
                self._listener.start()
        return True

    def _listen(self) -> None:
        """One connection of its own, LISTENing; reconnects after a lost connection (a wait
        meanwhile still polls, only less often)."""
        while not self._closing.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=5, application_name="lrserve"
                ) as conn:
                    conn.execute(f"LISTEN {STEPS_CHANNEL}")
                    while not self._closing.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if self._announced_here(note.pid):
                                continue
                            step, _, run_id = note.payload.partition(" ")
                            for heard in list(self._heard):
                                heard(run_id, int(step))
            except (psycopg.Error, OSError, ValueError):
                self._closing.wait(1.0)

    def close(self) -> None:
        self._closing.set()
        self.pool.close()
