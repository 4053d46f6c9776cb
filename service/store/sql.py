"""The SQL both dialects share; sqlite.py and postgres.py supply connections and locking.

Statements are written with ``?`` placeholders and translated once per dialect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import resources
from typing import Any

from service.runs.repository import (
    EventRow,
    ReportRow,
    RunRecord,
    RunSummary,
    StoreBusy,
    dumps,
    utcnow,
)

RUN_COLUMNS = (
    "id, spec, state, overrides, version, step, completed_step, event_seq, created_at, updated_at"
)


def migration_scripts(dialect: str) -> list[tuple[int, list[str]]]:
    """``(version, statements)`` for every migration file of ``dialect``, in order."""
    out: list[tuple[int, list[str]]] = []
    for entry in sorted(resources.files("service.store").iterdir(), key=lambda e: e.name):
        name = entry.name
        if not (name.startswith(f"{dialect}_") and name.endswith(".sql")):
            continue
        version = int(name[len(dialect) + 1 :].split("_", 1)[0])
        text = entry.read_text(encoding="utf-8")
        lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
        statements = [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
        out.append((version, statements))
    return out


def record_of(row: Any) -> RunRecord:
    """The :class:`RunRecord` of a row selected as ``RUN_COLUMNS``."""
    return RunRecord(
        id=row[0],
        spec=row[1],
        state=row[2],
        overrides=row[3],
        version=int(row[4]),
        step=None if row[5] is None else int(row[5]),
        completed_step=None if row[6] is None else int(row[6]),
        event_seq=int(row[7]),
        created_at=row[8],
        updated_at=row[9],
    )


class SqlTx:
    """A locked run inside an open write transaction (see :class:`RunTx`)."""

    def __init__(self, store: SqlStore, conn: Any, run: RunRecord) -> None:
        self._store = store
        self._conn = conn
        self.run = run
        # One timestamp for everything the transaction writes (it commits as one).
        self.now = utcnow()

    def reports_at(self, step: int) -> list[ReportRow]:
        rows = self._conn.execute(
            self._store.q(
                'SELECT step, rank, "values", received_at FROM reports '
                "WHERE run_id = ? AND step = ? ORDER BY rank"
            ),
            (self.run.id, step),
        ).fetchall()
        return [ReportRow(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]

    def insert_report(self, report: ReportRow) -> None:
        self._conn.execute(
            self._store.q(
                'INSERT INTO reports (run_id, step, rank, "values", received_at) '
                "VALUES (?, ?, ?, ?, ?)"
            ),
            (self.run.id, report.step, report.rank, report.values, report.received_at),
        )

    def insert_report_if_absent(self, report: ReportRow) -> bool:
        cur = self._conn.execute(
            self._store.q(
                'INSERT INTO reports (run_id, step, rank, "values", received_at) '
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
            ),
            (self.run.id, report.step, report.rank, report.values, report.received_at),
        )
        return bool(cur.rowcount)

    def add_event(self, type: str, step: int | None, data: dict[str, Any]) -> int:
        self.run.event_seq += 1
        self._store.insert_event(
            self._conn, self.run.id, self.run.event_seq, type, step, data, self.now
        )
        return self.run.event_seq

    def event_at(self, type: str, step: int) -> EventRow | None:
        return self._store.event_at_on(self._conn, self.run.id, type, step)

    def save(self) -> None:
        run = self.run
        run.updated_at = self.now
        self._conn.execute(
            self._store.q(
                "UPDATE runs SET state = ?, overrides = ?, version = ?, step = ?, "
                "completed_step = ?, event_seq = ?, updated_at = ? WHERE id = ?"
            ),
            (
                run.state,
                run.overrides,
                run.version,
                run.step,
                run.completed_step,
                run.event_seq,
                run.updated_at,
                run.id,
            ),
        )


class SqlStore(ABC):
    """Queries shared by both dialects; subclasses own connections and write locking."""

    dialect: str = "sql"
    inline_reads: bool = False
    lock_suffix: str = ""
    """Appended to the SELECT that reads the run inside a write transaction."""

    def q(self, sql: str) -> str:
        """``sql`` with this dialect's placeholders."""
        return sql

    # -- connection management, per dialect -------------------------------------------
    @abstractmethod
    def read_conn(self) -> AbstractContextManager[Any]:
        """A connection for reads (autocommit semantics)."""

    @abstractmethod
    def write_conn(self) -> AbstractContextManager[Any]:
        """A connection inside an open write transaction that commits on clean exit."""

    @abstractmethod
    def errors(self) -> AbstractContextManager[None]:
        """Translate the driver's lock/busy/connection errors into StoreBusy."""

    # -- schema -------------------------------------------------------------------------
    def apply_migrations(self, conn: Any) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, statements in migration_scripts(self.dialect):
            if version in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                self.q("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
                (version, utcnow()),
            )

    def schema_version(self) -> int:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def ping(self) -> None:
        with self.errors(), self.read_conn() as conn:
            conn.execute("SELECT 1").fetchone()

    # -- runs -----------------------------------------------------------------------------
    def insert_event(
        self,
        conn: Any,
        run_id: str,
        seq: int,
        type: str,
        step: int | None,
        data: dict[str, Any],
        at: str | None = None,
    ) -> None:
        conn.execute(
            self.q(
                "INSERT INTO events (run_id, seq, type, step, at, data) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (run_id, seq, type, step, utcnow() if at is None else at, dumps(data)),
        )

    @abstractmethod
    def insert_run_if_absent(self, conn: Any, record: RunRecord) -> bool:
        """Insert the row unless the id exists; True when inserted."""

    def create_run(self, record: RunRecord, event_data: dict[str, Any]) -> tuple[RunRecord, bool]:
        with self.errors(), self.write_conn() as conn:
            record.event_seq = 1
            if self.insert_run_if_absent(conn, record):
                self.insert_event(conn, record.id, 1, "created", None, event_data)
                return record, True
            row = conn.execute(
                self.q(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"), (record.id,)
            ).fetchone()
        if row is None:  # pragma: no cover - deleted between the conflict and the read
            raise StoreBusy("the run was deleted while being created; retry")
        return record_of(row), False

    def get_run(self, run_id: str) -> RunRecord | None:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
        return None if row is None else record_of(row)

    def run_version(self, run_id: str) -> tuple[int, str, int | None] | None:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q("SELECT version, created_at, step FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
        if row is None:
            return None
        return int(row[0]), row[1], None if row[2] is None else int(row[2])

    def completed_step(self, run_id: str) -> tuple[bool, int | None]:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q("SELECT completed_step FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
        if row is None:
            return False, None
        return True, None if row[0] is None else int(row[0])

    def list_runs(self, limit: int, after: str | None) -> list[RunSummary]:
        with self.errors(), self.read_conn() as conn:
            if after is None:
                rows = conn.execute(
                    self.q("SELECT id, version, created_at, step FROM runs ORDER BY id LIMIT ?"),
                    (limit,),
                ).fetchall()
            else:
                rows = conn.execute(
                    self.q(
                        "SELECT id, version, created_at, step FROM runs WHERE id > ? "
                        "ORDER BY id LIMIT ?"
                    ),
                    (after, limit),
                ).fetchall()
        return [
            RunSummary(r[0], int(r[1]), r[2], None if r[3] is None else int(r[3])) for r in rows
        ]

    def delete_run(self, run_id: str) -> bool:
        with self.errors(), self.write_conn() as conn:
            # Lock the run first, so a report in flight commits before its rows are deleted.
            locked = conn.execute(
                self.q(f"SELECT id FROM runs WHERE id = ?{self.lock_suffix}"), (run_id,)
            ).fetchone()
            if locked is None:
                return False
            # Children first: nothing relies on the driver enforcing ON DELETE CASCADE.
            conn.execute(self.q("DELETE FROM reports WHERE run_id = ?"), (run_id,))
            conn.execute(self.q("DELETE FROM events WHERE run_id = ?"), (run_id,))
            cur = conn.execute(self.q("DELETE FROM runs WHERE id = ?"), (run_id,))
            return bool(cur.rowcount)

    def transaction(self, run_id: str) -> AbstractContextManager[SqlTx | None]:
        return self._transaction(run_id)

    @contextmanager
    def _transaction(self, run_id: str) -> Iterator[SqlTx | None]:
        with self.errors(), self.write_conn() as conn:
            row = conn.execute(
                self.q(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?{self.lock_suffix}"),
                (run_id,),
            ).fetchone()
            yield None if row is None else SqlTx(self, conn, record_of(row))

    def events(self, run_id: str, after: int, limit: int) -> list[EventRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    "SELECT seq, type, step, at, data FROM events WHERE run_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?"
                ),
                (run_id, after, limit),
            ).fetchall()
        return [
            EventRow(int(r[0]), r[1], None if r[2] is None else int(r[2]), r[3], r[4]) for r in rows
        ]

    def events_of_type(self, run_id: str, type: str) -> list[EventRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    "SELECT seq, type, step, at, data FROM events WHERE run_id = ? AND type = ? "
                    "ORDER BY seq"
                ),
                (run_id, type),
            ).fetchall()
        return [
            EventRow(int(r[0]), r[1], None if r[2] is None else int(r[2]), r[3], r[4]) for r in rows
        ]

    def event_at(self, run_id: str, type: str, step: int) -> EventRow | None:
        with self.errors(), self.read_conn() as conn:
            return self.event_at_on(conn, run_id, type, step)

    def event_at_on(self, conn: Any, run_id: str, type: str, step: int) -> EventRow | None:
        """:meth:`event_at` on a given connection (a transaction's own)."""
        row = conn.execute(
            self.q(
                "SELECT seq, type, step, at, data FROM events WHERE run_id = ? AND type = ? "
                "AND step = ? ORDER BY seq DESC LIMIT 1"
            ),
            (run_id, type, step),
        ).fetchone()
        if row is None:
            return None
        return EventRow(
            int(row[0]), row[1], None if row[2] is None else int(row[2]), row[3], row[4]
        )

    def count_reports(self, run_id: str, step: int) -> int:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q("SELECT COUNT(*) FROM reports WHERE run_id = ? AND step = ?"), (run_id, step)
            ).fetchone()
        return int(row[0])

    def reports(self, run_id: str) -> list[ReportRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    'SELECT step, rank, "values", received_at FROM reports WHERE run_id = ? '
                    "ORDER BY step, rank"
                ),
                (run_id,),
            ).fetchall()
        return [ReportRow(int(r[0]), int(r[1]), r[2], r[3]) for r in rows]
