"""PostgreSQL storage for several replicas: psycopg 3 with a connection pool.

Writers lock the run row with ``SELECT ... FOR UPDATE`` (so reports to one run from any
replica serialise in the database), run creation is ``INSERT ... ON CONFLICT DO NOTHING``
and the reports' primary key (run, step, rank) backs the idempotency check. Migrations
take a transaction-scoped advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from service.runs.repository import RunRecord, StoreBusy, StoreError
from service.store.sql import SqlStore

MIGRATION_LOCK_KEY = 0x6C72_7365  # "lrse": one advisory lock id for schema migrations

_BUSY = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.QueryCanceled,
    psycopg.errors.AdminShutdown,
    psycopg.errors.TooManyConnections,
    psycopg.errors.CannotConnectNow,
)


class PostgresStore(SqlStore):
    dialect = "postgres"
    inline_reads = False
    inline_writes = False
    lock_suffix = " FOR UPDATE"

    def __init__(
        self, url: str, busy_timeout_ms: int = 5000, pool_min: int = 1, pool_max: int = 10
    ) -> None:
        self.url = url
        timeout_s = busy_timeout_ms / 1000
        self.pool = ConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            timeout=timeout_s,
            open=False,
            kwargs={
                # A report stuck behind a lock becomes a 503 instead of hanging forever.
                "options": f"-c lock_timeout={int(busy_timeout_ms)} -c statement_timeout=30000",
                "connect_timeout": max(1, int(timeout_s)),
                "application_name": "lrserve",
                # Text as UTF-8 whatever the database's encoding: on a SQL_ASCII database
                # psycopg would otherwise return bytes, and a run id read back as b"..."
                # broke every report (a foreign-key error, answered 503).
                "client_encoding": "UTF8",
            },
        )
        self.pool.open(wait=False)

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
        except PoolTimeout as exc:
            raise StoreBusy(
                "no PostgreSQL connection available (pool exhausted or server down)"
            ) from exc
        except psycopg.OperationalError as exc:
            raise StoreBusy("PostgreSQL is unreachable") from exc
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL error: {type(exc).__name__}") from exc

    @contextmanager
    def read_conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            conn.autocommit = True
            yield conn

    @contextmanager
    def write_conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            conn.autocommit = True
            with conn.transaction():
                yield conn

    def insert_run_if_absent(self, conn: Any, record: RunRecord) -> bool:
        cur = conn.execute(
            "INSERT INTO runs (id, spec, state, overrides, version, step, completed_step, "
            "event_seq, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
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
        with self.errors(), self.write_conn() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            self.apply_migrations(conn)

    def close(self) -> None:
        self.pool.close()
