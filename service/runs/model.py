"""The run model: specs, and the pure transitions a run goes through.

Nothing here does I/O. :mod:`service.runs.service` loads a locked run from the store, calls
these functions, and writes what they return in the same transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from service.runs.errors import InvalidArgument, ReportConflict, StaleReport
from service.schedules import Program, ScheduleSpec

Aggregate = Literal["mean", "min", "max", "rank0"]
Values = dict[str, dict[str, npt.NDArray[np.float64]]]
"""Evaluated hyperparameters: group -> field -> values per step."""


class RunSpec(ScheduleSpec):
    """The body of ``PUT /v1/runs/{id}``: a schedule spec plus how ranks report."""

    world_size: int = Field(1, ge=1, le=4096, description="ranks that report every step")
    aggregate: Aggregate = Field("mean", description="how the ranks' metrics are combined")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form, stored as is")

    @field_validator("metadata")
    @classmethod
    def _unicode_text(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Python's JSON parser (FastAPI's body) accepts a lone surrogate ("\ud800"), which no
        # UTF-8 text can hold: the stored spec could not be read back (it was a 500).
        stack: list[Any] = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        f"contains a lone UTF-16 surrogate in {item[:40]!r}; send valid Unicode"
                    ) from None
        return value

    def normalised(self) -> str:
        """Canonical JSON (defaults filled, keys sorted): equal specs give equal text."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class OverrideChange:
    """An operator's override: ``set`` replaces, ``scale`` multiplies ``field`` of ``groups``
    (``None``: every group) from ``from_step`` on."""

    from_step: int
    action: Literal["scale", "set"]
    value: float
    groups: Sequence[str] | None = None
    field: str = "lr"
    note: str = ""


# -- compiled programs -----------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    spec: RunSpec
    program: Program


@lru_cache(maxsize=512)
def compile_spec(spec_text: str) -> Compiled:
    """Parse and compile a stored (normalised) spec.

    A pure function of the text, so caching it per process is only an optimisation: the
    stored spec of a run id can change only by delete + create, which changes the text.
    """
    spec = RunSpec.model_validate_json(spec_text)
    return Compiled(spec, Program(spec))


# -- values: schedule, then overrides ----------------------------------------------------


def apply_overrides(
    values: Values, start: int, count: int, overrides: Sequence[Mapping[str, Any]]
) -> Values:
    """Operator overrides in the order they were made: ``set`` replaces, ``scale`` multiplies."""
    if not overrides:
        return values
    stop = start + count
    for ov in overrides:
        first = int(ov["from_step"])
        if first >= stop:
            continue
        offset = max(0, first - start)
        fld = ov["field"]
        for group in ov["groups"]:
            series = values.get(group, {}).get(fld)
            if series is None:
                continue
            if ov["action"] == "set":
                series[offset:] = float(ov["value"])
            else:
                series[offset:] *= float(ov["value"])
    return values


def evaluate(
    program: Program,
    state: Mapping[str, Any],
    overrides: Sequence[Mapping[str, Any]],
    start: int,
    count: int,
) -> Values:
    """Every group's hyperparameters for steps ``start .. start + count - 1``."""
    raw = program.evaluate(state, start=start, count=count)
    if not overrides:
        return {
            g: {f: np.asarray(v, dtype=np.float64) for f, v in fields.items()}
            for g, fields in raw.items()
        }
    # Overrides write in place: never into an array the program might share.
    values: Values = {
        g: {f: np.array(v, dtype=np.float64, copy=True) for f, v in fields.items()}
        for g, fields in raw.items()
    }
    return apply_overrides(values, start, count, overrides)


def at_step(values: Values, index: int = 0) -> dict[str, dict[str, float]]:
    return {g: {f: float(v[index]) for f, v in fields.items()} for g, fields in values.items()}


# -- overrides ---------------------------------------------------------------------------


def make_override(program: Program, body: OverrideChange, at: str) -> dict[str, Any]:
    """The stored form of an override, checked against the run's groups and fields."""
    names = list(program.group_names)
    groups = list(body.groups) if body.groups is not None else names
    for i, g in enumerate(groups):
        if g not in names:
            raise InvalidArgument(("groups", i), f"unknown group {g!r}; the run has {names}")
        if body.field not in program.fields[g]:
            raise InvalidArgument(
                ("field",),
                f"group {g!r} has no field {body.field!r}; it has {list(program.fields[g])}",
            )
    if len(set(groups)) != len(groups):
        raise InvalidArgument(("groups",), "groups are listed more than once")
    return {
        "from_step": body.from_step,
        "action": body.action,
        "value": body.value,
        "groups": groups,
        "field": body.field,
        "note": body.note,
        "at": at,
    }


# -- reports -----------------------------------------------------------------------------


def canonical_values(values: Mapping[str, float | None]) -> str:
    """Stored text of a report's values; equal reports give equal text (NaN included)."""
    return json.dumps(
        {k: (None if v is None else float(v)) for k, v in values.items()},
        sort_keys=True,
        separators=(",", ":"),
    )


def aggregate(
    reports: Sequence[tuple[int, Mapping[str, float | None]]], how: Aggregate
) -> dict[str, float | None]:
    """Combine the ranks' values per metric name.

    ``null`` means "no value" and is left out (all null: ``None``, which metric-driven nodes
    skip); NaN and infinities take part and propagate (NaN in, NaN out). ``rank0`` takes
    rank 0's values alone.
    """
    if how == "rank0":
        for rank, values in reports:
            if rank == 0:
                return {k: (None if v is None else float(v)) for k, v in values.items()}
        return {}
    columns: dict[str, list[float]] = {}
    for _, values in reports:
        for k, v in values.items():
            col = columns.setdefault(k, [])
            if v is not None:
                col.append(float(v))
    out: dict[str, float | None] = {}
    for k, col in columns.items():
        if not col:
            out[k] = None
        elif len(col) == 1:
            out[k] = col[0]
        elif how == "mean":
            # math.fsum: exactly rounded, so the mean does not depend on the ranks' order.
            if all(math.isfinite(v) for v in col):
                try:
                    total = math.fsum(col)
                except OverflowError:
                    # Finite values whose sum is beyond a float: their mean is not.
                    out[k] = float(sum(map(Fraction, col), Fraction(0)) / len(col))
                    continue
            else:
                total = sum(col)
            out[k] = total / len(col)
        elif any(math.isnan(v) for v in col):
            out[k] = math.nan
        else:
            out[k] = min(col) if how == "min" else max(col)
    return out


@dataclass
class ReportPlan:
    """What one report does to a run (computed purely, written by the service)."""

    duplicate: bool
    complete: bool
    reported_ranks: int
    completes_now: bool = False
    decision: dict[str, Any] | None = None
    new_state: dict[str, Any] | None = None
    aggregate: dict[str, float | None] = field(default_factory=dict)


def check_rank(compiled: Compiled, rank: int) -> None:
    """A rank outside the run's world size is the caller's mistake."""
    world_size = compiled.spec.world_size
    if rank >= world_size:
        raise InvalidArgument(("rank",), f"rank {rank} is out of range for world_size {world_size}")


def plan_report(
    compiled: Compiled,
    state: Mapping[str, Any],
    completed_step: int | None,
    step: int,
    rank: int,
    values_text: str,
    existing: Sequence[tuple[int, str]],
) -> ReportPlan:
    """Decide what a report means: duplicate, conflict, stale, partial or completing.

    ``existing`` are the (rank, values text) already stored for ``step``.
    """
    spec = compiled.spec
    check_rank(compiled, rank)
    mine = next((text for r, text in existing if r == rank), None)
    if mine is not None and mine == values_text:
        ranks = len(existing)
        return ReportPlan(duplicate=True, complete=ranks >= spec.world_size, reported_ranks=ranks)
    # Stale wins over a key conflict: anything but an exact duplicate for a step older than
    # the newest completed one is refused as stale (API.md).
    if completed_step is not None and (
        step < completed_step or (step == completed_step and mine is None)
    ):
        raise StaleReport(f"step {step} is older than the newest completed step {completed_step}")
    if mine is not None:
        raise ReportConflict(f"rank {rank} already reported other values for step {step}")
    ranks = len(existing) + 1
    if ranks < spec.world_size:
        return ReportPlan(duplicate=False, complete=False, reported_ranks=ranks)
    reports = [(r, json.loads(t)) for r, t in existing] + [(rank, json.loads(values_text))]
    agg = aggregate(sorted(reports, key=lambda rv: rv[0]), spec.aggregate)
    new_state, decision = compiled.program.observe(dict(state), step=step, metrics=agg)
    return ReportPlan(
        duplicate=False,
        complete=True,
        reported_ranks=ranks,
        completes_now=True,
        decision=decision,
        new_state=new_state,
        aggregate=agg,
    )
