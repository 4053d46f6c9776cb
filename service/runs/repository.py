"""The repository: what the run layer needs from a database, and the rows it exchanges.

The run layer owns this protocol; ``service.store`` implements it for SQLite and PostgreSQL
(dependencies point inward: the store imports this module, never the reverse).

Every mutation of a run happens inside :meth:`Store.transaction`: the run row is locked
(``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), read, and the new
state, report rows and events are written before one commit. Nothing here caches mutable
state between calls, so several processes or replicas on one database see one history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic_core import to_json


class StoreError(Exception):
    """Base class of storage failures the HTTP layer translates."""


class StoreBusy(StoreError):
    """The database is locked, overloaded or unreachable right now: retry later (503)."""

    def __init__(self, message: str = "the database is busy", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WouldBlock(StoreBusy):
    """A write attempted without waiting found the lock taken; nothing was written."""


class StoreFault(StoreError):
    """The database cannot work as configured and will not recover by waiting (an unwritable
    path, a read-only file system, a database in the wrong encoding): the server refuses to
    start. The message names the fault and its fix."""


class RunExists(StoreError):
    """A run with this id already exists (raised inside a transaction; see create_run)."""


_second: tuple[int, str] = (-1, "")
"""The current second formatted (``utcnow`` formats the date and time once per second)."""


def utcnow() -> str:
    """Timestamps are ISO 8601 UTC strings with microseconds, identical on both dialects:
    ``2026-12-02T18:30:00.123456Z`` (every report takes one; a ``datetime`` costs a few
    microseconds more)."""
    global _second
    now = time.time()
    second = int(now)
    micros = int((now - second) * 1_000_000)  # < 10^6: the difference is below 1
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micros:06d}Z"


def dumps(value: Any) -> str:
    """Compact JSON for storage; non-finite floats kept (Python's json reads them back).

    Written by pydantic-core (a fifth of the stdlib encoder's cost on a plateau state: this
    runs on every report); keys stay in the order the value has them.
    """
    return to_json(value, inf_nan_mode="constants").decode()


def loads(text: str) -> Any:
    return json.loads(text)


@dataclass
class RunRecord:
    """One row of ``runs``: the spec, the state and the counters, stored denormalised."""

    id: str
    spec: str
    """Normalised spec JSON (keys sorted, defaults filled): also the idempotency key."""
    state: str
    """Program state JSON (plateau nodes' state)."""
    overrides: str = "[]"
    amendments: str = "[]"
    """Schedule amendments JSON, in the order they were made."""
    rewinds: str = "[]"
    """Rewinds JSON (each with its idempotency key), in order."""
    leased_until: int = 0
    """No trainer has been handed values for a step at or after this one (see the lease)."""
    branch: int = 0
    """The current branch: how many rewinds the run has had."""
    version: int = 1
    step: int | None = None
    completed_step: int | None = None
    event_seq: int = 0
    values_version: int = 1
    """Changes only when the run's values change (a reduction, an override, an amendment, a
    rewind): what window and GET lr ETags name (schema v4; ``version`` changes on every
    report)."""
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)
    # The run list's columns (schema v3; see service/runs/listing.py for how they derive).
    last_report_at: str | None = None
    """When the latest new report arrived (``None``: no report yet)."""
    heartbeat_at: str | None = None
    heartbeat_step: int | None = None
    finished: bool = False
    """A heartbeat said the job finished; a report at a step after ``finished_step`` clears it."""
    finished_step: int | None = None
    horizon: int | None = None
    """The step count after which the schedule ends (``runs.listing.run_horizon``)."""
    tags: str = "[]"
    """JSON list of the run's tags (also rows of ``run_tags``); written at creation."""
    search: str = ""
    """Lower-cased text ``?q=`` searches: the id and the metadata's values, one per line."""
    metadata: str | None = "{}"
    """The spec's metadata (JSON); ``None`` on a row from before v3 not yet derived."""
    metric_names: str | None = "[]"
    """Sorted JSON list of the metric names reported; ``None`` before v3 (read the reports)."""
    loaded: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """The whole program state once the run layer has read it (``state`` is its head: a
    node's reductions are rows of their own, see ``service/runs/states.py``); not a column."""


@dataclass(frozen=True)
class RunSummary:
    id: str
    version: int
    created_at: str
    step: int | None
    updated_at: str = ""
    completed_step: int | None = None
    last_report_at: str | None = None
    heartbeat_at: str | None = None
    finished: bool = False
    horizon: int | None = None
    tags: str = "[]"
    metadata: str = "{}"


SORT_KEYS = ("id", "created", "updated", "step")
"""What the run list sorts by (``-`` in front: descending)."""


@dataclass(frozen=True)
class RunQuery:
    """One page of the run list: filters, order and where the previous page ended."""

    limit: int
    sort: str = "id"
    """One of :data:`SORT_KEYS`."""
    descending: bool = False
    after: tuple[str | int | None, str] | None = None
    """``(sort value, id)`` of the previous page's last run (the id alone for ``sort=id``)."""
    statuses: frozenset[str] = frozenset()
    """``running`` / ``idle`` / ``finished``; empty: all."""
    active_since: str = ""
    """Runs with activity (a report or heartbeat) at or after this time are not idle."""
    search: str | None = None
    """Lower-cased substring of ``runs.search``."""
    tags: tuple[str, ...] = ()
    """Every one of these must be a tag of the run."""


@dataclass(frozen=True)
class RunPulse:
    """The point read a live view polls: what identifies the run's content and its status."""

    version: int
    created_at: str
    step: int | None
    completed_step: int | None
    branch: int
    last_report_at: str | None
    heartbeat_at: str | None
    finished: bool
    horizon: int | None


@dataclass(frozen=True)
class DerivedColumns:
    """The columns the run layer derives from a run's spec and amendments."""

    horizon: int | None
    tags: list[str]
    search: str
    metadata: str


@dataclass(frozen=True)
class ReportRow:
    step: int
    rank: int
    values: str
    """Canonical JSON of the reported values (non-finite floats as JSON NaN/Infinity)."""
    received_at: str
    branch: int = 0
    """The run's branch when the report arrived."""


@dataclass(frozen=True)
class AbandonedReportRow:
    """A report a rewind set aside (``abandoned_by``: that rewind's number)."""

    step: int
    rank: int
    values: str
    received_at: str
    branch: int
    abandoned_by: int


@dataclass(frozen=True)
class HistoryRows:
    """A window of a run's history by step: what a metric's history is read from."""

    reports: list[ReportRow]
    """On the run's timeline, by (step, rank)."""
    abandoned: list[AbandonedReportRow]
    completed: list[EventRow]
    """``report_completed`` events (their aggregates), set aside ones included, by seq."""
    more_from: int | None
    """The first step with reports after the window (``None``: the window reaches the end)."""


@dataclass(frozen=True)
class EventRow:
    seq: int
    type: str
    step: int | None
    at: str
    data: str
    branch: int = 0
    """The run's branch when the event was recorded."""
    abandoned_by: int = 0
    """0 while the event is on the run's timeline; else the rewind that set it aside."""


class RunTx(Protocol):
    """A run locked for writing; everything written commits together or not at all."""

    run: RunRecord
    now: str
    """The transaction's timestamp: events' ``at`` and the run's ``updated_at``."""

    def rank_values_at(self, step: int) -> list[tuple[int, str]]:
        """``(rank, values text)`` of every rank's report for ``step``, ordered by rank (only
        those two columns: a completing report of a 1,024-rank step reads them all)."""

    def insert_report(self, report: ReportRow) -> None: ...

    def count_step_report(self, step: int) -> int:
        """Count one more rank's report for ``step`` (just inserted); the step's count now.
        Kept incrementally, so a partial report reads no other rank's row."""

    def insert_report_if_absent(self, report: ReportRow) -> bool:
        """Insert unless a report with the same (step, rank) exists; True when inserted."""

    def add_event(self, type: str, step: int | None, data: dict[str, Any]) -> int:
        """Append an event (its ``seq`` is the run's next one) and return its seq."""

    def event_at(self, type: str, step: int) -> EventRow | None:
        """The latest event of ``type`` recorded for ``step``, read inside the transaction
        (on its own connection: a second one could wait on a pool the caller drains)."""

    def save(self) -> None:
        """Write ``run`` back (state, overrides, amendments, rewinds, lease, counters)."""

    def save_lease(self) -> None:
        """Write ``run.leased_until`` alone (bookkeeping: not a change of the run)."""

    def set_aside_after(self, step: int, rewind: int) -> int:
        """Rewind ``rewind``: move the reports for steps after ``step`` to the abandoned
        reports, and mark the events of reports after ``step`` (``report_completed``,
        ``reduced``) as set aside by it. Returns how many reports moved."""

    def completed_after_rewind(self) -> list[EventRow]:
        """The ``report_completed`` events on the run's timeline, ordered by step."""

    def highest_report_step(self) -> int | None:
        """The highest step any rank reported on the run's timeline."""

    def reductions(self, node: str, branch: int, start: int, stop: int) -> list[str]:
        """The stored reductions ``[start, stop)`` of metric node ``node`` on ``branch``, as
        JSON texts in order (fewer when some are missing)."""

    def append_reductions(self, node: str, branch: int, start: int, rows: list[str]) -> None:
        """Store ``rows`` as reductions ``start, start + 1, ...`` of ``node`` on ``branch``."""

    def delete_reductions(self, node: str | None = None) -> None:
        """Delete the stored reductions of ``node`` (``None``: of every node)."""

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transaction has committed (never if it rolls back; in a
        group, once the group has)."""

    def announce_completed(self, step: int) -> None:
        """Tell the other replicas, at commit, that ``step`` completed (their waiting
        reports wake: :meth:`Store.listen`); nothing where there is no such channel."""


class Store(Protocol):
    """What the run layer needs from a database (implemented in ``service.store``)."""

    dialect: str
    inline_reads: bool
    """True when point reads never wait on a lock, so they may run on the event loop."""
    inline_writes: bool
    """True when :meth:`nowait` makes a write fail fast instead of waiting for a lock."""

    def nowait(self) -> AbstractContextManager[None]:
        """Writes in this block raise :class:`WouldBlock` instead of waiting for a lock."""

    def migrate(self) -> None:
        """Bring the schema to the newest version (safe to call concurrently)."""

    def ping(self) -> None:
        """Raise :class:`StoreBusy` unless the database answers and can take writes (the
        readiness check: keep it cheap)."""

    def close(self) -> None: ...

    def create_run(self, record: RunRecord, event_data: dict[str, Any]) -> tuple[RunRecord, bool]:
        """Insert ``record`` (and its ``created`` event) unless the id exists.

        Returns the stored run and whether this call created it.
        """

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def list_runs(self, query: RunQuery) -> list[RunSummary]:
        """Up to ``query.limit`` runs matching its filters, in its order, after ``after``."""

    def heartbeat(self, run_id: str, at: str, step: int | None, finished: bool) -> RunRecord | None:
        """Record a trainer's heartbeat (not a change of the run: ``version`` stays);
        ``None`` when the run does not exist."""

    def run_pulse(self, run_id: str) -> RunPulse | None:
        """One point read by primary key: the run's version and status columns."""

    def history(self, run_id: str, after_step: int, steps: int) -> HistoryRows | None:
        """The reports, set-aside reports and completed-step events of the first ``steps``
        reported steps after ``after_step``; ``None`` when the run does not exist."""

    def metric_names(self, run_id: str) -> list[str] | None:
        """Sorted names of every metric reported to the run; ``None`` when it does not exist."""

    def underived(self, limit: int) -> list[tuple[str, str, str]]:
        """``(id, spec, amendments)`` of runs from before v3 whose derived columns are unset."""

    def set_derived(self, run_id: str, amendments: str, derived: DerivedColumns) -> None:
        """Write the derived columns of a run from before v3 (unless its amendments changed
        since they were read: the amendment's own transaction wrote them then)."""

    def delete_run(self, run_id: str) -> bool: ...

    def transaction(self, run_id: str) -> AbstractContextManager[RunTx | None]:
        """Lock ``run_id`` for writing; yields ``None`` when the run does not exist."""

    def events(self, run_id: str, after: int, limit: int) -> list[EventRow]: ...

    def reductions(self, run_id: str, node: str, branch: int, start: int, stop: int) -> list[str]:
        """:meth:`RunTx.reductions`, read outside a transaction (committed rows only)."""

    def reports(self, run_id: str) -> list[ReportRow]:
        """Every report of the run ordered by (step, rank)."""

    def events_of_type(self, run_id: str, type: str) -> list[EventRow]:
        """Every event of ``type``, set aside ones included (``abandoned_by``), by seq."""

    def count_reports(self, run_id: str, step: int) -> int: ...

    def event_at(self, run_id: str, type: str, step: int) -> EventRow | None:
        """The latest event of ``type`` recorded for ``step`` on the run's timeline."""

    def run_version(self, run_id: str) -> tuple[int, str, int | None, int] | None:
        """(values_version, created_at, step, leased_until) of the run; the first two identify
        its values."""

    def abandoned_reports(self, run_id: str) -> list[AbandonedReportRow]:
        """Every report rewinds set aside, ordered by (rewind, step, rank)."""

    def completed_step(self, run_id: str) -> tuple[bool, int | None]:
        """(exists, completed_step): the cheap read ``?wait=`` polls."""

    def scan_checkpoints(
        self, curve: str, most: int, least: int, limit: int
    ) -> list[tuple[int, bytes, bytes]]:
        """Up to ``limit`` stored scan checkpoints ``(block, signature, lr)`` of ``curve``
        with ``least <= block <= most``, latest block first (see
        ``service.schedules.ScanBacking``)."""

    def save_scan_checkpoints(self, rows: list[tuple[str, int, bytes, bytes]]) -> None:
        """Store ``(curve, block, signature, lr)`` rows; rows already stored are left as they
        are (a checkpoint is a function of its key)."""

    def delete_scan_checkpoints(self, programs: list[str]) -> None:
        """Delete the checkpoints of every scan of these compiled programs (their names)."""

    def listen(self, heard: Callable[[str, int], None]) -> bool:
        """Call ``heard(run_id, step)`` (from another thread) whenever another process (a
        replica, a worker) commits a completed step (this store's own commits are not heard:
        their reports wake their process's waits); False where the store has no such channel
        (then waits poll)."""
