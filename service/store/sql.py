"""The SQL both dialects share; sqlite.py and postgres.py supply connections and locking.

Statements are written with ``?`` placeholders and translated once per dialect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import resources
from typing import Any

from service.runs.repository import (
    AbandonedReportRow,
    DerivedColumns,
    EventRow,
    HistoryRows,
    ReportRow,
    RunPulse,
    RunQuery,
    RunRecord,
    RunSummary,
    StoreBusy,
    dumps,
    loads,
    utcnow,
)

RUN_COLUMNS = (
    "id, spec, state, overrides, version, step, completed_step, event_seq, created_at, "
    "updated_at, amendments, rewinds, leased_until, branch, last_report_at, heartbeat_at, "
    "heartbeat_step, finished, finished_step, horizon, tags, search, metadata, metric_names, "
    "values_version"
)
SUMMARY_COLUMNS = (
    "id, version, created_at, step, updated_at, completed_step, last_report_at, heartbeat_at, "
    "finished, horizon, tags, metadata"
)
# The run list's orders: a column (NULL-free, so that keyset paging is a plain comparison)
# backed by an index (schema v3) whose leading expression is exactly this one.
SORT_COLUMNS = {
    "id": "id",
    "created": "created_at",
    "updated": "updated_at",
    "step": "COALESCE(step, -1)",
}
# A run is finished when a heartbeat said so or its completed step reached the horizon
# (service/runs/listing.py run_status is the same rule in Python).
FINISHED_SQL = (
    "(finished = 1 OR (horizon IS NOT NULL AND completed_step IS NOT NULL "
    "AND completed_step >= horizon - 1))"
)
EVENT_COLUMNS = "seq, type, step, at, data, branch, abandoned_by"


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
        amendments=row[10],
        rewinds=row[11],
        leased_until=int(row[12]),
        branch=int(row[13]),
        last_report_at=row[14],
        heartbeat_at=row[15],
        heartbeat_step=None if row[16] is None else int(row[16]),
        finished=bool(row[17]),
        finished_step=None if row[18] is None else int(row[18]),
        horizon=None if row[19] is None else int(row[19]),
        tags=row[20],
        search=row[21],
        metadata=row[22],
        metric_names=row[23],
        values_version=int(row[24]),
    )


def summary_of(row: Any) -> RunSummary:
    """The :class:`RunSummary` of a row selected as ``SUMMARY_COLUMNS``."""
    return RunSummary(
        id=row[0],
        version=int(row[1]),
        created_at=row[2],
        step=None if row[3] is None else int(row[3]),
        updated_at=row[4],
        completed_step=None if row[5] is None else int(row[5]),
        last_report_at=row[6],
        heartbeat_at=row[7],
        finished=bool(row[8]),
        horizon=None if row[9] is None else int(row[9]),
        tags=row[10],
        metadata="{}" if row[11] is None else row[11],
    )


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere (``\\`` escapes ``%`` and ``_``)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_query(query: RunQuery) -> tuple[str, list[Any]]:
    """The SELECT of one page of the run list and its parameters (``?`` placeholders)."""
    where: list[str] = []
    params: list[Any] = []
    if query.statuses and query.statuses != {"running", "idle", "finished"}:
        alive: list[str] = []
        if "finished" in query.statuses:
            alive.append(FINISHED_SQL)
        if "running" in query.statuses:
            alive.append(f"(NOT {FINISHED_SQL} AND active_at >= ?)")
            params.append(query.active_since)
        if "idle" in query.statuses:
            alive.append(f"(NOT {FINISHED_SQL} AND (active_at IS NULL OR active_at < ?))")
            params.append(query.active_since)
        where.append("(" + " OR ".join(alive) + ")")
    if query.search:
        where.append("search LIKE ? ESCAPE '\\'")
        params.append(_like(query.search))
    for tag in query.tags:
        where.append("id IN (SELECT run_id FROM run_tags WHERE tag = ?)")
        params.append(tag)
    column = SORT_COLUMNS[query.sort]
    direction = "DESC" if query.descending else "ASC"
    if query.after is not None:
        value, last_id = query.after
        if query.sort == "id":
            where.append("id < ?" if query.descending else "id > ?")
            params.append(last_id)
        else:
            # Row-value comparison: both dialects use the (column, id) index for it.
            where.append(f"({column}, id) {'<' if query.descending else '>'} (?, ?)")
            params.extend([value, last_id])
    order = f"{column} {direction}"
    if query.sort != "id":
        order += f", id {direction}"
    sql = f"SELECT {SUMMARY_COLUMNS} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order} LIMIT ?"
    params.append(query.limit)
    return sql, params


def event_of(row: Any) -> EventRow:
    """The :class:`EventRow` of a row selected as ``EVENT_COLUMNS``."""
    return EventRow(
        int(row[0]),
        row[1],
        None if row[2] is None else int(row[2]),
        row[3],
        row[4],
        int(row[5]),
        int(row[6]),
    )


class SqlTx:
    """A locked run inside an open write transaction (see :class:`RunTx`)."""

    def __init__(self, store: SqlStore, conn: Any, run: RunRecord) -> None:
        self._store = store
        self._conn = conn
        self.run = run
        # One timestamp for everything the transaction writes (it commits as one).
        self.now = utcnow()
        self.committed: list[Callable[[], None]] = []
        """What :meth:`on_commit` was given: the store calls them after the commit."""

    def on_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)

    def reductions(self, node: str, branch: int, start: int, stop: int) -> list[str]:
        return self._store.reductions_on(self._conn, self.run.id, node, branch, start, stop)

    def append_reductions(self, node: str, branch: int, start: int, rows: list[str]) -> None:
        self._conn.cursor().executemany(
            self._store.q(
                "INSERT INTO reductions (run_id, node, seq, branch, data) VALUES (?, ?, ?, ?, ?)"
            ),
            [(self.run.id, node, start + i, branch, row) for i, row in enumerate(rows)],
        )

    def delete_reductions(self, node: str | None = None) -> None:
        if node is None:
            self._conn.execute(
                self._store.q("DELETE FROM reductions WHERE run_id = ?"), (self.run.id,)
            )
        else:
            self._conn.execute(
                self._store.q("DELETE FROM reductions WHERE run_id = ? AND node = ?"),
                (self.run.id, node),
            )

    def rank_values_at(self, step: int) -> list[tuple[int, str]]:
        rows: list[tuple[int, str]] = self._conn.execute(
            self._store.q(
                'SELECT rank, "values" FROM reports WHERE run_id = ? AND step = ? ORDER BY rank'
            ),
            (self.run.id, step),
        ).fetchall()
        return rows

    def insert_report(self, report: ReportRow) -> None:
        self._conn.execute(
            self._store.q(
                'INSERT INTO reports (run_id, step, rank, "values", received_at, branch) '
                "VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (
                self.run.id,
                report.step,
                report.rank,
                report.values,
                report.received_at,
                report.branch,
            ),
        )

    def count_step_report(self, step: int) -> int:
        row = self._conn.execute(
            self._store.q(
                "INSERT INTO step_reports (run_id, step, ranks) VALUES (?, ?, 1) "
                "ON CONFLICT (run_id, step) DO UPDATE SET ranks = step_reports.ranks + 1 "
                "RETURNING ranks"
            ),
            (self.run.id, step),
        ).fetchone()
        return int(row[0])

    def insert_report_if_absent(self, report: ReportRow) -> bool:
        cur = self._conn.execute(
            self._store.q(
                'INSERT INTO reports (run_id, step, rank, "values", received_at, branch) '
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
            ),
            (
                self.run.id,
                report.step,
                report.rank,
                report.values,
                report.received_at,
                report.branch,
            ),
        )
        return bool(cur.rowcount)

    def save_lease(self) -> None:
        self._conn.execute(
            self._store.q("UPDATE runs SET leased_until = ? WHERE id = ?"),
            (self.run.leased_until, self.run.id),
        )

    def set_aside_after(self, step: int, rewind: int) -> int:
        q, run_id = self._store.q, self.run.id
        self._conn.execute(
            q(
                "INSERT INTO abandoned_reports "
                '(run_id, branch, step, rank, "values", received_at, abandoned_by) '
                'SELECT run_id, branch, step, rank, "values", received_at, ? FROM reports '
                "WHERE run_id = ? AND step > ?"
            ),
            (rewind, run_id, step),
        )
        cur = self._conn.execute(
            q("DELETE FROM reports WHERE run_id = ? AND step > ?"), (run_id, step)
        )
        # The steps after ``step`` start again with no report counted.
        self._conn.execute(
            q("DELETE FROM step_reports WHERE run_id = ? AND step > ?"), (run_id, step)
        )
        self._conn.execute(
            q(
                "UPDATE events SET abandoned_by = ? WHERE run_id = ? AND abandoned_by = 0 "
                "AND type IN ('report_completed', 'reduced') AND step > ?"
            ),
            (rewind, run_id, step),
        )
        return int(cur.rowcount)

    def completed_after_rewind(self) -> list[EventRow]:
        rows = self._conn.execute(
            self._store.q(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND "
                "type = 'report_completed' AND abandoned_by = 0 ORDER BY step, seq"
            ),
            (self.run.id,),
        ).fetchall()
        return [event_of(r) for r in rows]

    def highest_report_step(self) -> int | None:
        row = self._conn.execute(
            self._store.q("SELECT MAX(step) FROM reports WHERE run_id = ?"), (self.run.id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def announce_completed(self, step: int) -> None:
        self._store.announce(self._conn, self.run.id, step)

    def add_event(self, type: str, step: int | None, data: dict[str, Any]) -> int:
        self.run.event_seq += 1
        self._store.insert_event(
            self._conn, self.run.id, self.run.event_seq, type, step, data, self.now, self.run.branch
        )
        return self.run.event_seq

    def event_at(self, type: str, step: int) -> EventRow | None:
        return self._store.event_at_on(self._conn, self.run.id, type, step)

    def save(self) -> None:
        run = self.run
        run.updated_at = self.now
        active = max((t for t in (run.last_report_at, run.heartbeat_at) if t), default=None)
        self._conn.execute(
            self._store.q(
                "UPDATE runs SET state = ?, overrides = ?, version = ?, values_version = ?, "
                "step = ?, "
                "completed_step = ?, event_seq = ?, updated_at = ?, amendments = ?, "
                "rewinds = ?, leased_until = ?, branch = ?, last_report_at = ?, active_at = ?, "
                "finished = ?, finished_step = ?, horizon = ?, metric_names = ? WHERE id = ?"
            ),
            (
                run.state,
                run.overrides,
                run.version,
                run.values_version,
                run.step,
                run.completed_step,
                run.event_seq,
                run.updated_at,
                run.amendments,
                run.rewinds,
                run.leased_until,
                run.branch,
                run.last_report_at,
                active,
                int(run.finished),
                run.finished_step,
                run.horizon,
                run.metric_names,
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
        branch: int = 0,
    ) -> None:
        conn.execute(
            self.q(
                "INSERT INTO events (run_id, seq, type, step, at, data, branch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            (run_id, seq, type, step, utcnow() if at is None else at, dumps(data), branch),
        )

    def insert_run_if_absent(self, conn: Any, record: RunRecord) -> bool:
        """Insert the row unless the id exists; True when inserted."""
        cur = conn.execute(
            self.q(
                "INSERT INTO runs (id, spec, state, overrides, version, step, completed_step, "
                "event_seq, created_at, updated_at, horizon, tags, search, metadata, "
                "metric_names) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING"
            ),
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
                record.horizon,
                record.tags,
                record.search,
                record.metadata,
                record.metric_names,
            ),
        )
        return bool(cur.rowcount)

    def create_run(self, record: RunRecord, event_data: dict[str, Any]) -> tuple[RunRecord, bool]:
        with self.errors(), self.write_conn() as conn:
            record.event_seq = 1
            if self.insert_run_if_absent(conn, record):
                self.insert_event(conn, record.id, 1, "created", None, event_data)
                for tag in loads(record.tags):
                    conn.execute(
                        self.q("INSERT INTO run_tags (tag, run_id) VALUES (?, ?)"),
                        (tag, record.id),
                    )
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

    def run_version(self, run_id: str) -> tuple[int, str, int | None, int] | None:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q(
                    "SELECT values_version, created_at, step, leased_until FROM runs WHERE id = ?"
                ),
                (run_id,),
            ).fetchone()
        if row is None:
            return None
        return int(row[0]), row[1], None if row[2] is None else int(row[2]), int(row[3])

    def announce(self, conn: Any, run_id: str, step: int) -> None:  # noqa: B027 - optional hook
        """See :meth:`SqlTx.announce_completed` (no channel here: a no-op)."""

    def listen(self, heard: Callable[[str, int], None]) -> bool:
        """No channel between processes: waits poll (see :class:`~service.runs.Store`)."""
        return False

    def completed_step(self, run_id: str) -> tuple[bool, int | None]:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q("SELECT completed_step FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
        if row is None:
            return False, None
        return True, None if row[0] is None else int(row[0])

    def list_runs(self, query: RunQuery) -> list[RunSummary]:
        sql, params = list_query(query)
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(self.q(sql), params).fetchall()
        return [summary_of(r) for r in rows]

    def heartbeat(self, run_id: str, at: str, step: int | None, finished: bool) -> RunRecord | None:
        with self.errors(), self.write_conn() as conn:
            row = conn.execute(
                self.q(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?{self.lock_suffix}"),
                (run_id,),
            ).fetchone()
            if row is None:
                return None
            run = record_of(row)
            run.heartbeat_at = at
            if step is not None:
                run.heartbeat_step = step
            if finished:
                run.finished = True
                run.finished_step = step if step is not None else run.step
            elif run.finished and step is not None and step > (run.finished_step or -1):
                run.finished = False  # the job goes on past the step it said it finished at
            active = max(t for t in (run.last_report_at, at) if t)
            # Bookkeeping, not a change of the run: version and updated_at stay.
            conn.execute(
                self.q(
                    "UPDATE runs SET heartbeat_at = ?, heartbeat_step = ?, active_at = ?, "
                    "finished = ?, finished_step = ? WHERE id = ?"
                ),
                (at, run.heartbeat_step, active, int(run.finished), run.finished_step, run_id),
            )
            return run

    def run_pulse(self, run_id: str) -> RunPulse | None:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q(
                    "SELECT version, created_at, step, completed_step, branch, last_report_at, "
                    "heartbeat_at, finished, horizon FROM runs WHERE id = ?"
                ),
                (run_id,),
            ).fetchone()
        if row is None:
            return None
        return RunPulse(
            int(row[0]),
            row[1],
            None if row[2] is None else int(row[2]),
            None if row[3] is None else int(row[3]),
            int(row[4]),
            row[5],
            row[6],
            bool(row[7]),
            None if row[8] is None else int(row[8]),
        )

    def history(self, run_id: str, after_step: int, steps: int) -> HistoryRows | None:
        q = self.q
        with self.errors(), self.read_conn() as conn:
            if conn.execute(q("SELECT 1 FROM runs WHERE id = ?"), (run_id,)).fetchone() is None:
                return None
            # The first step beyond the window: a range scan of the reports' primary key.
            cut_row = conn.execute(
                q(
                    "SELECT DISTINCT step FROM reports WHERE run_id = ? AND step > ? "
                    "ORDER BY step LIMIT 1 OFFSET ?"
                ),
                (run_id, after_step, steps),
            ).fetchone()
            cut = None if cut_row is None else int(cut_row[0])
            until = cut if cut is not None else (1 << 62)
            window = (run_id, after_step, until)
            reports = [
                ReportRow(int(r[0]), int(r[1]), r[2], r[3], int(r[4]))
                for r in conn.execute(
                    q(
                        'SELECT step, rank, "values", received_at, branch FROM reports '
                        "WHERE run_id = ? AND step > ? AND step < ? ORDER BY step, rank"
                    ),
                    window,
                ).fetchall()
            ]
            abandoned = [
                AbandonedReportRow(int(r[0]), int(r[1]), r[2], r[3], int(r[4]), int(r[5]))
                for r in conn.execute(
                    q(
                        'SELECT step, rank, "values", received_at, branch, abandoned_by '
                        "FROM abandoned_reports WHERE run_id = ? AND step > ? AND step < ? "
                        "ORDER BY abandoned_by, step, rank"
                    ),
                    window,
                ).fetchall()
            ]
            completed = [
                event_of(r)
                for r in conn.execute(
                    q(
                        f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? "
                        "AND type = 'report_completed' AND step > ? AND step < ? ORDER BY seq"
                    ),
                    window,
                ).fetchall()
            ]
        return HistoryRows(reports, abandoned, completed, cut)

    def metric_names(self, run_id: str) -> list[str] | None:
        with self.errors(), self.read_conn() as conn:
            row = conn.execute(
                self.q("SELECT metric_names FROM runs WHERE id = ?"), (run_id,)
            ).fetchone()
            if row is None:
                return None
            if row[0] is not None:
                return list(loads(row[0]))
            # A run from before schema v3: its names are only in its reports.
            names: set[str] = set()
            for table in ("reports", "abandoned_reports"):
                for (values,) in conn.execute(
                    self.q(f'SELECT "values" FROM {table} WHERE run_id = ?'), (run_id,)
                ):
                    names.update(loads(values))
        return sorted(names)

    def underived(self, limit: int) -> list[tuple[str, str, str]]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q("SELECT id, spec, amendments FROM runs WHERE metadata IS NULL LIMIT ?"),
                (limit,),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def set_derived(self, run_id: str, amendments: str, derived: DerivedColumns) -> None:
        with self.errors(), self.write_conn() as conn:
            cur = conn.execute(
                self.q(
                    "UPDATE runs SET horizon = ?, tags = ?, search = ?, metadata = ? "
                    "WHERE id = ? AND metadata IS NULL AND amendments = ?"
                ),
                (
                    derived.horizon,
                    dumps(derived.tags),
                    derived.search,
                    derived.metadata,
                    run_id,
                    amendments,
                ),
            )
            if cur.rowcount:
                conn.execute(self.q("DELETE FROM run_tags WHERE run_id = ?"), (run_id,))
                for tag in derived.tags:
                    conn.execute(
                        self.q("INSERT INTO run_tags (tag, run_id) VALUES (?, ?)"), (tag, run_id)
                    )

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
            conn.execute(self.q("DELETE FROM step_reports WHERE run_id = ?"), (run_id,))
            conn.execute(self.q("DELETE FROM abandoned_reports WHERE run_id = ?"), (run_id,))
            conn.execute(self.q("DELETE FROM events WHERE run_id = ?"), (run_id,))
            conn.execute(self.q("DELETE FROM run_tags WHERE run_id = ?"), (run_id,))
            conn.execute(self.q("DELETE FROM reductions WHERE run_id = ?"), (run_id,))
            cur = conn.execute(self.q("DELETE FROM runs WHERE id = ?"), (run_id,))
            return bool(cur.rowcount)

    def transaction(self, run_id: str) -> AbstractContextManager[SqlTx | None]:
        return self._transaction(run_id)

    @contextmanager
    def _transaction(self, run_id: str) -> Iterator[SqlTx | None]:
        tx = None
        with self.errors(), self.write_conn() as conn:
            row = conn.execute(
                self.q(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?{self.lock_suffix}"),
                (run_id,),
            ).fetchone()
            tx = None if row is None else SqlTx(self, conn, record_of(row))
            yield tx
        if tx is not None:  # committed
            for callback in tx.committed:
                callback()

    def events(self, run_id: str, after: int, limit: int) -> list[EventRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?"
                ),
                (run_id, after, limit),
            ).fetchall()
        return [event_of(r) for r in rows]

    def events_of_type(self, run_id: str, type: str) -> list[EventRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND type = ? ORDER BY seq"
                ),
                (run_id, type),
            ).fetchall()
        return [event_of(r) for r in rows]

    def event_at(self, run_id: str, type: str, step: int) -> EventRow | None:
        with self.errors(), self.read_conn() as conn:
            return self.event_at_on(conn, run_id, type, step)

    def event_at_on(self, conn: Any, run_id: str, type: str, step: int) -> EventRow | None:
        """:meth:`event_at` on a given connection (a transaction's own)."""
        row = conn.execute(
            self.q(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE run_id = ? AND type = ? "
                "AND step = ? AND abandoned_by = 0 ORDER BY seq DESC LIMIT 1"
            ),
            (run_id, type, step),
        ).fetchone()
        return None if row is None else event_of(row)

    def reductions(self, run_id: str, node: str, branch: int, start: int, stop: int) -> list[str]:
        with self.errors(), self.read_conn() as conn:
            return self.reductions_on(conn, run_id, node, branch, start, stop)

    def reductions_on(
        self, conn: Any, run_id: str, node: str, branch: int, start: int, stop: int
    ) -> list[str]:
        """:meth:`reductions` on a given connection (a transaction's own)."""
        rows = conn.execute(
            self.q(
                "SELECT data FROM reductions WHERE run_id = ? AND node = ? AND seq >= ? "
                "AND seq < ? AND branch = ? ORDER BY seq"
            ),
            (run_id, node, start, stop, branch),
        ).fetchall()
        return [r[0] for r in rows]

    # -- scan checkpoints ------------------------------------------------------------------
    def scan_checkpoints(
        self, curve: str, most: int, least: int, limit: int
    ) -> list[tuple[int, bytes, bytes]]:
        with self.errors(), self.read_conn() as conn:
            return self.scan_checkpoints_on(conn, curve, most, least, limit)

    def scan_checkpoints_on(
        self, conn: Any, curve: str, most: int, least: int, limit: int
    ) -> list[tuple[int, bytes, bytes]]:
        """:meth:`scan_checkpoints` on a given connection."""
        rows = conn.execute(
            self.q(
                "SELECT block, signature, lr FROM scan_checkpoints WHERE curve = ? AND "
                "block <= ? AND block >= ? ORDER BY block DESC LIMIT ?"
            ),
            (curve, most, least, limit),
        ).fetchall()
        return [(int(r[0]), bytes(r[1]), bytes(r[2])) for r in rows]

    def save_scan_checkpoints(self, rows: list[tuple[str, int, bytes, bytes]]) -> None:
        with self.errors(), self.write_conn() as conn:
            conn.cursor().executemany(
                self.q(
                    "INSERT INTO scan_checkpoints (curve, block, signature, lr) VALUES "
                    "(?, ?, ?, ?) ON CONFLICT (curve, block, signature) DO NOTHING"
                ),
                rows,
            )

    def delete_scan_checkpoints(self, programs: list[str]) -> None:
        with self.errors(), self.write_conn() as conn:
            for program in programs:
                # Every curve of the program: names ``<program>/<path>`` ('0' follows '/').
                conn.execute(
                    self.q("DELETE FROM scan_checkpoints WHERE curve > ? AND curve < ?"),
                    (f"{program}/", f"{program}0"),
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
                    'SELECT step, rank, "values", received_at, branch FROM reports '
                    "WHERE run_id = ? ORDER BY step, rank"
                ),
                (run_id,),
            ).fetchall()
        return [ReportRow(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in rows]

    def abandoned_reports(self, run_id: str) -> list[AbandonedReportRow]:
        with self.errors(), self.read_conn() as conn:
            rows = conn.execute(
                self.q(
                    'SELECT step, rank, "values", received_at, branch, abandoned_by '
                    "FROM abandoned_reports WHERE run_id = ? ORDER BY abandoned_by, step, rank"
                ),
                (run_id,),
            ).fetchall()
        return [
            AbandonedReportRow(int(r[0]), int(r[1]), r[2], r[3], int(r[4]), int(r[5])) for r in rows
        ]
