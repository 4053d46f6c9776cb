"""The wire's shapes: request bodies and one response model per answer.

Request bodies are validated here (``ReportIn``, ``OverrideIn``, ``PreviewIn``; the run body
is the run layer's :class:`~service.runs.model.RunSpec`). The response models document every
answer in OpenAPI; the routers build answers as plain dicts (the hot paths cannot afford a
model per answer) and ``tests/service/test_schemas.py`` holds real answers to these models, so
the documentation cannot drift from what is sent. Non-finite numbers travel as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (JSON has no literal for them).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from service.runs.model import Aggregate
from service.schedules import ScheduleSpec
from service.schedules.base import MAX_STEP
from service.schedules.spec import AnySchedule

MAX_METRICS_PER_REPORT = 256
MAX_WINDOW = 100_000
"""Most steps one ``GET .../lr`` window or preview may ask for."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _metric_value(value: Any) -> float | None:
    # JSON has no NaN/Infinity literals: they arrive as these exact strings (or null).
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("a metric value must be a number, null, 'NaN', 'Infinity' or '-Infinity'")
    if isinstance(value, (int, float)):
        # A NaN/Infinity literal (or 1e999, which parses as inf) is not JSON: refuse it so that
        # a non-finite value is always an explicit string. A huge int must be a 422, not an
        # OverflowError (a 500).
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(
                "must be a finite number: JSON has no NaN/Infinity literals, send the strings "
                "'NaN', 'Infinity' or '-Infinity' (or null)"
            )
        return number
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    raise ValueError("a metric value must be a number, null, 'NaN', 'Infinity' or '-Infinity'")


MetricValue = Annotated[float | None, BeforeValidator(_metric_value)]
MetricName = Annotated[str, Field(min_length=1, max_length=200)]


# -- request bodies ----------------------------------------------------------------------


class ReportIn(BaseModel):
    """The body of ``POST /v1/runs/{id}/metrics``."""

    model_config = ConfigDict(extra="forbid")

    # The answer evaluates step + 1, which must stay an exact float64 step.
    step: int = Field(ge=0, le=MAX_STEP - 2)
    rank: int = Field(0, ge=0, le=4095)
    values: dict[MetricName, MetricValue] = Field(max_length=MAX_METRICS_PER_REPORT)


class OverrideIn(BaseModel):
    """The body of ``POST /v1/runs/{id}/overrides``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    from_step: int = Field(ge=0, le=MAX_STEP)
    action: Literal["scale", "set"]
    value: float = Field(ge=0.0)
    groups: list[str] | None = Field(None, min_length=1, max_length=1024)
    field: str = Field("lr", min_length=1, max_length=100)
    note: str = Field("", max_length=2000)


class AmendmentIn(BaseModel):
    """The body of ``POST /v1/runs/{id}/amendments``: new schedule parts from a step on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    from_step: int = Field(ge=0, le=MAX_STEP - 1)
    schedule: AnySchedule | None = None
    group_schedules: dict[str, AnySchedule] | None = Field(None, max_length=1024)
    param_schedules: dict[str, AnySchedule] | None = Field(None, max_length=64)
    restart: bool = Field(
        False, description="true: the new parts count steps from from_step (their step 0)"
    )
    base: Literal["initial", "current"] = Field(
        "initial",
        description="the groups' own base values, or the values in force at from_step - 1",
    )
    note: str = Field("", max_length=2000)

    @model_validator(mode="after")
    def _something(self) -> AmendmentIn:
        if self.schedule is None and not self.group_schedules and not self.param_schedules:
            raise ValueError("give at least one of schedule, group_schedules, param_schedules")
        return self

    def parts(self) -> dict[str, Any]:
        """The given parts as JSON documents (the form they are stored in)."""
        dumped = self.model_dump(
            mode="json", include={"schedule", "group_schedules", "param_schedules"}
        )
        return {k: v for k, v in dumped.items() if v is not None}


class RewindIn(BaseModel):
    """The body of ``POST /v1/runs/{id}/rewind``."""

    model_config = ConfigDict(extra="forbid")

    to_step: int = Field(ge=0, le=MAX_STEP - 2)
    key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="idempotency key: a rewind with a key already used changes nothing",
    )
    note: str = Field("", max_length=2000)


class PreviewIn(ScheduleSpec):
    """``POST /v1/schedules/preview``: a run's schedule part plus the steps to show."""

    start: int = Field(0, ge=0, le=MAX_STEP)
    count: int | None = Field(None, ge=1, le=MAX_WINDOW)
    points: int | None = Field(None, ge=2, le=10_000)
    stop: int | None = Field(None, ge=1, le=MAX_STEP)

    def schedule_spec(self) -> ScheduleSpec:
        """The schedule part alone."""
        return ScheduleSpec.model_validate(
            self.model_dump(exclude={"start", "count", "points", "stop"})
        )


# -- answers -----------------------------------------------------------------------------

WireFloat = float | Literal["NaN", "Infinity", "-Infinity"]
GroupValues = dict[str, dict[str, WireFloat]]
"""``{group: {field: value}}`` at one step."""
GroupSeries = dict[str, dict[str, list[WireFloat]]]
"""``{group: {field: [value per step]}}`` (columnar)."""


class _Answer(BaseModel):
    # Extra keys refused: the schema test then proves the documentation complete.
    model_config = ConfigDict(extra="forbid")


class ProblemItem(_Answer):
    loc: list[str | int]
    msg: str


class Problem(_Answer):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(examples=["/problems/run-not-found"])
    title: str
    status: int
    detail: str
    errors: list[ProblemItem] | None = None
    earliest_step: int | None = Field(
        None, description="too-late: the first step the change can be guaranteed from"
    )


class OverrideOut(_Answer):
    n: int = Field(description="the override's number (DELETE .../overrides/{n})")
    from_step: int
    action: Literal["scale", "set"]
    value: float
    groups: list[str]
    field: str
    note: str
    at: str
    until_step: int | None = Field(None, description="withdrawn: in force before this step")
    withdrawn_at: str | None = None


class AmendmentOut(_Answer):
    n: int
    from_step: int
    schedule: dict[str, Any] | None = None
    group_schedules: dict[str, dict[str, Any]] | None = None
    param_schedules: dict[str, dict[str, Any]] | None = None
    restart: bool
    base: Literal["initial", "current"]
    note: str
    at: str


class RewindOut(_Answer):
    n: int = Field(description="the rewind's number: the branch it starts")
    key: str | None
    to_step: int
    from_step: int | None = Field(description="the run's highest step before the rewind")
    note: str
    reports_set_aside: int
    at: str


RunStatus = Literal["running", "idle", "finished"]
_STATUS_DOC = (
    "finished: a heartbeat said so, or completed_step >= horizon - 1; running: a report or "
    "heartbeat within the server's idle_after seconds; else idle"
)
_HORIZON_DOC = (
    "steps the run is planned for: metadata.total_steps, else the longest schedule's end "
    "(null when no schedule has one)"
)


class RunOut(_Answer):
    """A run: its normalised spec, counters and the plateau nodes' state."""

    id: str
    spec: dict[str, Any]
    version: int
    values_version: int = Field(
        description="changes only when the run's values change (a reduction, an override, "
        "an amendment, a rewind): the version windows, GET lr and their ETags name"
    )
    created_at: str
    updated_at: str
    step: int | None = Field(description="highest step any rank reported")
    completed_step: int | None = Field(description="highest step every rank reported")
    state: dict[str, Any]
    overrides: list[OverrideOut]
    amendments: list[AmendmentOut]
    rewinds: list[RewindOut]
    branch: int = Field(description="the current branch: how many rewinds the run has had")
    leased_until: int = Field(
        description="trainers may hold values up to this step (exclusive): changes of the "
        "schedule or overrides can start here at the earliest"
    )
    status: RunStatus = Field(description=_STATUS_DOC)
    last_report_at: str | None = Field(description="when the latest new report arrived")
    heartbeat_at: str | None = Field(description="when the latest heartbeat arrived")
    heartbeat_step: int | None = Field(None, description="the step the latest heartbeat named")
    horizon: int | None = Field(description=_HORIZON_DOC)
    tags: list[str] = Field(description="metadata.tags (its strings) and metadata.tag")


class RunSummaryOut(_Answer):
    id: str
    version: int
    created_at: str
    updated_at: str
    step: int | None
    completed_step: int | None
    last_report_at: str | None
    heartbeat_at: str | None
    status: RunStatus = Field(description=_STATUS_DOC)
    horizon: int | None = Field(description=_HORIZON_DOC)
    tags: list[str]
    metadata: dict[str, Any]


class HeartbeatIn(BaseModel):
    """The body of ``POST /v1/runs/{id}/heartbeat``."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(0, ge=0, le=4095, description="the sending rank (< world_size)")
    step: int | None = Field(None, ge=0, le=MAX_STEP, description="the trainer's step now")
    finished: bool = Field(
        False,
        description="the job is done: the run is finished until a report at a later step",
    )


class RunListOut(_Answer):
    runs: list[RunSummaryOut]
    next_cursor: str | None


class StepValuesOut(_Answer):
    """``GET .../lr?step=N``."""

    run: str
    step: int
    version: int
    groups: GroupValues


class WindowOut(_Answer):
    """``GET .../lr?start=N&count=K``."""

    run: str
    start: int
    count: int
    version: int
    groups: GroupSeries


class DecisionOut(_Answer):
    reduced: bool
    nodes: list[dict[str, Any]]


class ReportOut(_Answer):
    """``POST .../metrics``: the step's status and the values from ``step + 1``."""

    run: str
    step: int
    rank: int
    complete: bool
    reported_ranks: int
    version: int
    values_version: int = Field(
        description="the run's values version with this answer: a window fetched at this "
        "values version is still exact (no refetch needed after a partial report)"
    )
    decision: DecisionOut | None = Field(description="null until the step is complete")
    applies_from: int
    groups: GroupValues
    stop: bool = Field(
        False,
        description="a range test (LRRangeTest) is finished at this step: diverged at or "
        "before it, or it is the last step; every rank stops",
    )


class MetricPointOut(_Answer):
    step: int
    rank: int
    value: WireFloat | None
    branch: int = Field(description="the run's branch (rewinds before it) when reported")


class AbandonedPointOut(MetricPointOut):
    abandoned_by: int = Field(description="the rewind that set the point aside")


class AggregatePointOut(_Answer):
    step: int
    value: WireFloat | None
    branch: int


class MetricHistoryOut(_Answer):
    run: str
    name: str
    points: list[MetricPointOut] = Field(description="reports on the run's timeline")
    aggregate: list[AggregatePointOut] = Field(description="the values metric nodes saw")
    abandoned: list[AbandonedPointOut] = Field(description="reports rewinds set aside")
    next_after_step: int | None = Field(
        None,
        description="more steps follow (the limit cut the answer): ask again with this "
        "after_step; null at the end",
    )


class MetricNamesOut(_Answer):
    """``GET .../metrics`` without ``name``."""

    run: str
    names: list[str] = Field(description="every metric name reported to the run, sorted")


class EventOut(_Answer):
    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]
    branch: int = Field(description="the run's branch when the event was recorded")
    abandoned_by: int = Field(description="0 on the run's timeline; else the rewind")


class EventsOut(_Answer):
    run: str
    events: list[EventOut]


class CurveOut(_Answer):
    run: str
    version: int
    start: int
    stop: int
    steps: list[int]
    groups: GroupSeries


class ChangePreviewOut(_Answer):
    """A change's dry run (``?dry_run=true`` on a steering call): nothing was stored."""

    dry_run: Literal[True]
    changed: bool = Field(
        description="false when the change would change nothing (the same amendment made "
        "already, a rewind key used already)"
    )
    run: RunOut = Field(description="the run as the change would leave it")
    before: CurveOut = Field(description="the run's curve now, as GET .../curve answers it")
    after: CurveOut = Field(description="the same steps' curve after the change")


class PreviewOut(_Answer):
    start: int
    count: int
    steps: list[int] | None = Field(None, description="present when points were asked for")
    groups: GroupSeries


class RangeTestSuggestionsOut(_Answer):
    steepest: float | None = Field(description="torch-lr-finder's steepest-gradient rule")
    valley: float | None = Field(description="fastai's valley rule")
    minimum: float | None = Field(description="fastai's rule: lr at the minimum / 10")


class RangeTestStepsOut(_Answer):
    steepest: int | None
    valley: int | None
    minimum: int | None = Field(description="the step of the smallest smoothed loss")


class RangeTestOut(_Answer):
    """``GET .../range-test``: API.md's fields, then lrserve's extensions (docs/range-test.md)."""

    run: str
    steps: list[int]
    lr: list[float] = Field(description="the first range-test group's rate at each step")
    loss: list[WireFloat] = Field(description="the loss the node saw (the ranks' aggregate)")
    smoothed: list[WireFloat]
    stopped_at: int | None = Field(description="the step the loss diverged at (recorded)")
    suggestions: RangeTestSuggestionsOut
    version: int
    metric: str
    num_iter: int
    path: str = Field(description="the node's place: schedule or group_schedules.<name>")
    finished: bool = Field(description="diverged or reached its last step: trainers stop")
    groups: dict[str, list[float]] = Field(description="every range-test group's rates")
    suggested_steps: RangeTestStepsOut


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, as the problem+json they are."""
    titles = {
        304: "If-None-Match matched the run's version (no body)",
        401: "no or invalid token",
        403: "the read-only token cannot write",
        404: "no run with this id (run-not-found)",
        409: "conflicts with the run's state (too-late: earliest_step says from when)",
        413: "body too large",
        415: "body is not JSON",
        422: "invalid request (validation-error): errors[] names each field",
        503: "database busy or unreachable (database-busy); retry after Retry-After",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        if status == 304:
            out[status] = {"description": titles[status]}
            continue
        # Documented under application/json by FastAPI; create_app's OpenAPI moves every
        # error answer to application/problem+json, the media type it is sent with.
        out[status] = {"description": titles.get(status, "error"), "model": Problem}
    return out


__all__ = [
    "MAX_METRICS_PER_REPORT",
    "MAX_WINDOW",
    "Aggregate",
    "AmendmentIn",
    "ChangePreviewOut",
    "CurveOut",
    "EventsOut",
    "HeartbeatIn",
    "MetricHistoryOut",
    "MetricNamesOut",
    "OverrideIn",
    "PreviewIn",
    "PreviewOut",
    "Problem",
    "ReportIn",
    "ReportOut",
    "RewindIn",
    "RunListOut",
    "RunOut",
    "StepValuesOut",
    "WindowOut",
    "problems",
]
