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
    created_at: str
    updated_at: str
    step: int | None
    completed_step: int | None
    state: dict[str, Any]
    overrides: list[dict[str, Any]]


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
    step: int | None


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
    decision: Decision | None
    applies_from: int
    groups: dict[str, GroupValues]


class MetricPoint(TypedDict):
    """One reported value."""

    step: int
    rank: int
    value: float | str | None


class MetricHistory(TypedDict, total=False):
    """``GET /v1/runs/{id}/metrics?name=...``."""

    run: str
    name: str
    points: list[MetricPoint]
    aggregate: list[dict[str, Any]]


class Event(TypedDict):
    """One entry of a run's event log."""

    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]


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
