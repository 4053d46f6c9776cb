"""What the use cases hand out: a run as read, and the result of every read and report.

Domain values, never HTTP bodies (``service.api`` renders them), and never written back:
:class:`Run` (a stored run with its spec and schedule compiled, its state and changes
parsed, its status derived) and the results (:class:`RunVersion`, :class:`StepValues`,
:class:`Window`, :class:`ReportOutcome`, :class:`CurveValues`, :class:`MetricHistory`, ...).
They do no I/O; :class:`~service.runs.service.Runs` builds them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from service.runs.listing import (
    DEFAULT_IDLE_AFTER,
    Status,
    active_since,
    run_horizon,
    run_status,
    run_tags,
)
from service.runs.model import RunSpec, Values, compile_run, compile_spec, evaluate
from service.runs.repository import RunRecord
from service.runs.states import full_state
from service.runs.timeline import Timeline


@dataclass(frozen=True)
class Run:
    """A run as the use cases see it: the spec compiled, state and overrides parsed."""

    id: str
    spec_text: str
    """The normalised spec (canonical JSON): also the idempotency key."""
    spec: RunSpec
    schedule: Timeline
    """The whole schedule: the spec's program and the amendments."""
    state: dict[str, Any]
    overrides: list[dict[str, Any]]
    amendments: list[dict[str, Any]]
    rewinds: list[dict[str, Any]]
    version: int
    step: int | None
    completed_step: int | None
    leased_until: int
    branch: int
    created_at: str
    updated_at: str
    last_report_at: str | None = None
    values_version: int = 1
    """Changes only when the values change (what window and GET lr ETags name)."""
    heartbeat_at: str | None = None
    heartbeat_step: int | None = None
    finished: bool = False
    """A heartbeat said the job finished (see :func:`~service.runs.listing.run_status`)."""
    horizon: int | None = None
    tags: tuple[str, ...] = ()
    active_since: str = ""
    """Activity at or after this makes the run ``running`` (``Runs`` sets it when it reads the
    run; empty: the default ``idle_after`` from now)."""

    @property
    def status(self) -> Status:
        """``running``, ``idle`` or ``finished`` (:func:`~service.runs.listing.run_status`)."""
        since = self.active_since or active_since(datetime.now(timezone.utc), DEFAULT_IDLE_AFTER)
        return run_status(
            finished=self.finished,
            horizon=self.horizon,
            completed_step=self.completed_step,
            last_report_at=self.last_report_at,
            heartbeat_at=self.heartbeat_at,
            active_since=since,
        )

    @classmethod
    def of(
        cls, record: RunRecord, state: dict[str, Any] | None = None, active_since: str = ""
    ) -> Run:
        """The run of a stored row (``state``: the row's state already parsed, if at hand)."""
        return cls(
            id=record.id,
            spec_text=record.spec,
            spec=compile_spec(record.spec).spec,
            schedule=compile_run(record.spec, record.amendments),
            state=full_state(record) if state is None else state,
            overrides=_list(record.overrides),
            amendments=_list(record.amendments),
            rewinds=_list(record.rewinds),
            version=record.version,
            values_version=record.values_version,
            step=record.step,
            completed_step=record.completed_step,
            leased_until=record.leased_until,
            branch=record.branch,
            created_at=record.created_at,
            updated_at=record.updated_at,
            last_report_at=record.last_report_at,
            heartbeat_at=record.heartbeat_at,
            heartbeat_step=record.heartbeat_step,
            finished=record.finished,
            horizon=run_horizon(record.spec, record.amendments),
            tags=tuple(run_tags(compile_spec(record.spec).spec.metadata)),
            active_since=active_since,
        )

    def spec_document(self) -> dict[str, Any]:
        """The normalised spec as a JSON object."""
        document: dict[str, Any] = json.loads(self.spec_text)
        return document

    def values(self, start: int, count: int) -> Values:
        """Every group's values for ``[start, start + count)``: schedule, then overrides."""
        return evaluate(self.schedule, self.state, self.overrides, start, count)


def _list(text: str) -> list[dict[str, Any]]:
    return [] if text == "[]" else list(json.loads(text))


# The hot paths' results are NamedTuples: a frozen dataclass costs microseconds to build.


class RunVersion(NamedTuple):
    """What identifies a run's values: ``(version, created_at)``, where ``version`` is the
    run's *values* version (``values_version``: it changes only when values change, not on
    a partial report); its current step, and how far trainers have been handed values
    (``leased_until``, exclusive)."""

    version: int
    created_at: str
    step: int | None
    leased_until: int = 0


class StepValues(NamedTuple):
    run_id: str
    step: int
    version: int
    groups: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Window:
    run_id: str
    start: int
    count: int
    version: int
    values: Values


class ReportOutcome(NamedTuple):
    """A report's effect and the step's status, with the values from ``step + 1``."""

    run_id: str
    step: int
    rank: int
    complete: bool
    reported_ranks: int
    version: int
    decision: dict[str, Any] | None
    """The step's decision once complete (``None`` before)."""
    groups: dict[str, dict[str, float]]
    """Every group's values at ``step + 1``."""
    duplicate: bool
    completed_now: bool
    stop: bool = False
    """A range test is finished at ``step`` (diverged, or its last step): trainers stop."""
    values_version: int | None = None
    """The run's values version with this answer: a trainer whose window carries it keeps it."""


@dataclass(frozen=True)
class Sampled:
    """Values at chosen steps (a decimated curve or preview)."""

    count: int
    steps: list[int] | None
    """``None`` for a dense window (every step from ``start``)."""
    groups: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class CurveValues:
    run_id: str
    version: int
    start: int
    stop: int
    steps: list[int]
    groups: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class ChangePreview:
    """A dry run of a change: the run before and as the change would leave it, and its
    curve over the same steps before and after."""

    before: Run
    after: Run
    before_curve: CurveValues
    after_curve: CurveValues


@dataclass(frozen=True)
class MetricPoint:
    step: int
    rank: int
    value: float | None
    branch: int = 0
    """The run's branch when the report arrived (the number of rewinds before it)."""
    abandoned_by: int = 0
    """0 for a point on the run's timeline; else the rewind that set it aside."""


@dataclass(frozen=True)
class MetricHistory:
    run_id: str
    name: str
    points: list[MetricPoint]
    """The reports on the run's timeline, by step and rank."""
    aggregate: list[tuple[int, float | None, int]]
    """``(step, value, branch)`` the metric-driven nodes saw, per completed step."""
    abandoned: list[MetricPoint]
    """Reports that rewinds set aside (an abandoned branch), by rewind, step and rank."""
    next_after_step: int | None = None
    """More steps follow: ask again with this ``after_step`` (``None``: this is the end)."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]
    branch: int = 0
    abandoned_by: int = 0
