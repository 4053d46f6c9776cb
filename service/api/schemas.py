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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.runs.model import Aggregate
from service.schedules import ScheduleSpec
from service.schedules.base import MAX_STEP

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


class OverrideOut(_Answer):
    from_step: int
    action: Literal["scale", "set"]
    value: float
    groups: list[str]
    field: str
    note: str
    at: str


class RunOut(_Answer):
    """A run: its normalised spec, counters and the plateau nodes' state."""

    id: str
    spec: dict[str, Any]
    version: int
    created_at: str
    updated_at: str
    step: int | None = Field(description="highest step any rank reported")
    completed_step: int | None = Field(description="highest step every rank reported")
    state: dict[str, Any]
    overrides: list[OverrideOut]


class RunSummaryOut(_Answer):
    id: str
    version: int
    created_at: str
    step: int | None


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
    decision: DecisionOut | None = Field(description="null until the step is complete")
    applies_from: int
    groups: GroupValues


class MetricPointOut(_Answer):
    step: int
    rank: int
    value: WireFloat | None


class AggregatePointOut(_Answer):
    step: int
    value: WireFloat | None


class MetricHistoryOut(_Answer):
    run: str
    name: str
    points: list[MetricPointOut]
    aggregate: list[AggregatePointOut] = Field(description="the values metric nodes saw")


class EventOut(_Answer):
    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]


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


class PreviewOut(_Answer):
    start: int
    count: int
    steps: list[int] | None = Field(None, description="present when points were asked for")
    groups: GroupSeries


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, as the problem+json they are."""
    titles = {
        304: "If-None-Match matched the run's version (no body)",
        401: "no or invalid token",
        403: "the read-only token cannot write",
        404: "no run with this id (run-not-found)",
        409: "conflicts with the run's state",
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
    "CurveOut",
    "EventsOut",
    "MetricHistoryOut",
    "OverrideIn",
    "PreviewIn",
    "PreviewOut",
    "Problem",
    "ReportIn",
    "ReportOut",
    "RunListOut",
    "RunOut",
    "StepValuesOut",
    "WindowOut",
    "problems",
]
