"""Typed shapes of the wire contract (docs/architecture.md, "Wire decisions").

The client returns the server's JSON as plain ``dict``s; these ``TypedDict``s only
describe them for type checkers and readers. Fields the server adds later simply
appear in the dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypedDict

__all__ = [
    "Aggregate",
    "CreateRunResult",
    "Curve",
    "Decision",
    "Event",
    "EventList",
    "GroupSpec",
    "GroupValues",
    "GroupWindow",
    "LRValues",
    "LRWindow",
    "MetricHistory",
    "MetricNames",
    "MetricPoint",
    "OverrideAction",
    "Preview",
    "ReportResult",
    "Run",
    "RunList",
    "RunSpec",
    "RunSummary",
]

Aggregate = Literal["mean", "min", "max", "rank0"]
OverrideAction = Literal["scale", "set"]

#: ``{"lr": 0.001, "momentum": 0.9}``: one group's hyperparameters at one step.
GroupValues = dict[str, float]
#: ``{"lr": [...], "momentum": [...]}``: one group's hyperparameters over a window.
GroupWindow = dict[str, list[float]]


class GroupSpec(TypedDict, total=False):
    """One optimizer param group: ``name`` and ``lr`` are required."""

    name: str
    lr: float
    momentum: float
    betas: list[float]
    weight_decay: float


class RunSpec(TypedDict, total=False):
    """The body of ``PUT /v1/runs/{id}``; ``groups`` and ``schedule`` are required."""

    groups: list[GroupSpec]
    schedule: dict[str, Any]
    group_schedules: dict[str, dict[str, Any]]
    param_schedules: dict[str, Any]
    world_size: int
    aggregate: Aggregate
    metadata: dict[str, Any]


class Run(TypedDict):
    """``GET /v1/runs/{id}``."""

    id: str
    spec: RunSpec
    version: int
    #: Changes only when the run's values change: the version windows and their ETags name.
    values_version: int
    created_at: str
    updated_at: str
    step: int | None
    completed_step: int | None
    state: dict[str, Any]
    #: Operator overrides, numbered ``n`` from 1 (``until_step`` once withdrawn).
    overrides: list[dict[str, Any]]
    #: Schedule amendments in the order they were made.
    amendments: list[dict[str, Any]]
    #: Rewinds in order (``n`` is the branch each one started).
    rewinds: list[dict[str, Any]]
    #: The current branch: how many rewinds the run has had.
    branch: int
    #: Trainers may hold values up to this step (exclusive): changes can start here.
    leased_until: int
    #: ``running`` / ``idle`` / ``finished`` (see :class:`RunSummary`).
    status: str
    last_report_at: str | None
    heartbeat_at: str | None
    heartbeat_step: int | None
    #: Steps the run is planned for (``metadata.total_steps`` or its schedules' end).
    horizon: int | None
    tags: list[str]


class CreateRunResult(NamedTuple):
    """What :meth:`Client.create_run` returns: ``run, created = client.create_run(...)``.

    ``created`` is true when this call created the run (201) and false when an identical
    run already existed (200). After a retried request whose first attempt did create
    the run, ``created`` is false: the run is there either way.
    """

    run: Run
    created: bool


class RunSummary(TypedDict):
    """One entry of ``GET /v1/runs``."""

    id: str
    version: int
    created_at: str
    updated_at: str
    step: int | None
    completed_step: int | None
    last_report_at: str | None
    heartbeat_at: str | None
    #: ``finished`` (a heartbeat said so, or the horizon is reached), ``running`` (a report
    #: or heartbeat within the server's ``idle_after``) or ``idle``.
    status: str
    horizon: int | None
    #: ``metadata.tags`` (its strings) and ``metadata.tag``.
    tags: list[str]
    metadata: dict[str, Any]


class RunList(TypedDict):
    """``GET /v1/runs``: one page; ``next_cursor`` is ``None`` on the last page."""

    runs: list[RunSummary]
    next_cursor: str | None


class LRValues(TypedDict):
    """``GET /v1/runs/{id}/lr?step=N``."""

    run: str
    step: int
    version: int
    groups: dict[str, GroupValues]


class Decision(TypedDict, total=False):
    """What the metric-driven nodes decided when a step completed."""

    reduced: bool
    nodes: list[dict[str, Any]]


class ReportResult(TypedDict):
    """``POST /v1/runs/{id}/metrics``; ``groups`` holds the values at ``applies_from``."""

    run: str
    step: int
    rank: int
    complete: bool
    #: How many ranks have reported this step so far.
    reported_ranks: int
    version: int
    #: The values version with this answer: a window carrying it is still exact.
    values_version: int
    decision: Decision | None
    applies_from: int
    groups: dict[str, GroupValues]
    #: A range test is finished at this step (diverged, or its last step): stop.
    stop: bool


class MetricPoint(TypedDict):
    """One reported value."""

    step: int
    rank: int
    value: float | str | None
    #: The run's branch (rewinds before it) when the value was reported.
    branch: int


class MetricHistory(TypedDict, total=False):
    """``GET /v1/runs/{id}/metrics?name=...``."""

    run: str
    name: str
    #: Reports on the run's timeline.
    points: list[MetricPoint]
    aggregate: list[dict[str, Any]]
    #: Reports that rewinds set aside (each with ``abandoned_by``, the rewind).
    abandoned: list[dict[str, Any]]
    #: More steps follow: ask again with ``after_step`` set to it (``None``: the end).
    next_after_step: int | None


class MetricNames(TypedDict):
    """``GET /v1/runs/{id}/metrics`` (no ``name``): every metric name reported to the run."""

    run: str
    names: list[str]


class Event(TypedDict):
    """One entry of a run's event log."""

    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]
    #: The run's branch when the event was recorded.
    branch: int
    #: 0 while on the run's timeline; else the rewind that set it aside.
    abandoned_by: int


class EventList(TypedDict):
    """``GET /v1/runs/{id}/events``."""

    run: str
    events: list[Event]


class Curve(TypedDict):
    """``GET /v1/runs/{id}/curve``: decimated, columnar."""

    run: str
    version: int
    start: int
    stop: int
    steps: list[int]
    groups: dict[str, GroupWindow]


class Preview(TypedDict, total=False):
    """``POST /v1/schedules/preview``; ``steps`` is present for decimated previews."""

    start: int
    count: int
    steps: list[int]
    groups: dict[str, GroupWindow]


@dataclass(frozen=True)
class LRWindow:
    """A window of values from ``GET /v1/runs/{id}/lr?start=&count=``.

    When called with the ``etag`` of an earlier window and nothing changed, the server
    answers 304: then ``not_modified`` is true, ``values`` is ``None`` and the caller
    keeps the values it has. A window stays exact until ``version`` changes.
    """

    run: str
    start: int
    count: int
    #: The run's version the values belong to.
    version: int
    #: Pass back as ``etag=`` to get a cheap 304 while nothing changed.
    etag: str | None
    #: True when the server answered 304 Not Modified.
    not_modified: bool
    #: ``{group: {field: [value per step]}}``, or ``None`` when not modified.
    values: dict[str, GroupWindow] | None


class RangeTestSuggestions(TypedDict):
    """The suggested rates (``None`` where the curve is too short for a rule)."""

    #: torch-lr-finder's rule: the lr of the steepest descent of the smoothed loss.
    steepest: float | None
    #: fastai's valley rule.
    valley: float | None
    #: fastai's minimum rule: the lr at the smallest smoothed loss, divided by 10.
    minimum: float | None


class RangeTestResult(TypedDict):
    """``GET /v1/runs/{id}/range-test``: the curve (one point per completed step), the stop
    step and the suggestions; ``loss``/``smoothed`` may hold ``"NaN"``/``"Infinity"``."""

    run: str
    steps: list[int]
    #: The first range-test group's rate at each step.
    lr: list[float]
    loss: list[float | str]
    smoothed: list[float | str]
    #: The step whose smoothed loss diverged (recorded), or ``None``.
    stopped_at: int | None
    suggestions: RangeTestSuggestions
    version: int
    metric: str
    num_iter: int
    path: str
    #: Diverged or reached the last step: trainers were told to stop.
    finished: bool
    #: Every range-test group's rates, by group name.
    groups: dict[str, list[float]]
    #: The step each rule picked (``minimum``: the step of the smallest loss).
    suggested_steps: dict[str, int | None]
