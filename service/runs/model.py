"""The run model: specs, and the pure transitions a run goes through.

Nothing here does I/O. :mod:`service.runs.transactions` loads a locked run from the store, calls
these functions, and writes what they return in the same transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from service.runs.errors import InvalidArgument, ReportConflict, StaleReport, TooLate
from service.runs.timeline import MAX_AMENDMENTS, Timeline, timeline
from service.runs.values import BytesLRU
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


@dataclass(frozen=True)
class AmendmentChange:
    """A change of the schedule itself from ``from_step`` on (see :mod:`.timeline`).

    ``parts`` holds the given ``schedule`` / ``group_schedules`` / ``param_schedules`` as
    JSON documents; ``restart``: the new parts count steps from ``from_step``; ``base``:
    ``"initial"`` (the groups' own values) or ``"current"`` (the values at ``from_step - 1``).
    """

    from_step: int
    parts: Mapping[str, Any]
    restart: bool = False
    base: Literal["initial", "current"] = "initial"
    note: str = ""


@dataclass(frozen=True)
class RewindChange:
    """Take the run back to how it was when ``to_step`` completed."""

    to_step: int
    key: str | None = None
    note: str = ""


LEASE_GRAIN = 64
"""Leases grow in multiples of this many steps: a window that reaches a few steps further
than the last one writes nothing (one write per grain, however many ranks poll)."""


def lease_end(until: int) -> int:
    """The lease that covers values handed out up to (not including) ``until``."""
    return -(-until // LEASE_GRAIN) * LEASE_GRAIN


def check_not_too_late(what: str, from_step: int, leased_until: int) -> None:
    """Refuse a change from a step that trainers may already have been handed.

    The step named in the refusal leaves one lease grain of headroom: trainers keep fetching
    while the caller posts again, and the lease grows a grain at a time, so the step right at
    the lease could be gone by then; one grain further, it holds until the fastest trainer has
    gone that many steps further.
    """
    if from_step < leased_until:
        earliest = leased_until + LEASE_GRAIN
        raise TooLate(
            f"{what} from step {from_step} is too late: trainers may already have the values "
            f"of steps up to {leased_until - 1}; post it from step {earliest} or later (that "
            f"leaves the trainers {LEASE_GRAIN} more steps before it is too late again)",
            earliest,
        )


@dataclass(frozen=True)
class Compiled:
    spec: RunSpec
    program: Program


DEFAULT_COMPILE_CACHE_BYTES = 48 * 1024 * 1024
"""The compiled schedules' budget unless ``LRSERVE_COMPILE_CACHE_BYTES`` says otherwise."""

COMPILED: BytesLRU[Any] = BytesLRU(DEFAULT_COMPILE_CACHE_BYTES)
"""Compiled specs and run timelines of this process, least recently used out by (estimated)
bytes: a pure function of their texts, so only an optimisation. Sized by bytes rather than a
count so that a thousand small runs all stay compiled while a few huge ones cannot take
gigabytes; ``create_app`` sets the budget from the settings."""

_BYTES_PER_SPEC_CHAR = 48
"""Estimated bytes of the parsed models and compiled nodes per character of spec text
(measured with tracemalloc: 20-55 for small and 64-group specs)."""
_MEMO_STEPS = 4 * 256
"""Steps of a program's one-step memo an active run holds (four of its 256-step blocks)."""


def program_bytes(program: Program, text: str) -> int:
    """An estimate of what a compiled program holds: its nodes, in proportion to the spec's
    text, and the one-step memo an active run keeps filled (float64 per series and step)."""
    return 4096 + _BYTES_PER_SPEC_CHAR * len(text) + program.series * _MEMO_STEPS * 8


def compile_spec(spec_text: str) -> Compiled:
    """Parse and compile a stored (normalised) spec.

    A pure function of the text, so caching it per process is only an optimisation: the
    stored spec of a run id can change only by delete + create, which changes the text.
    """
    key = ("spec", spec_text)
    compiled: Compiled | None = COMPILED.get(key)
    if compiled is None:
        spec = RunSpec.model_validate_json(spec_text)
        compiled = Compiled(spec, Program(spec))
        COMPILED.put(key, compiled, program_bytes(compiled.program, spec_text))
    return compiled


def compile_run(spec_text: str, amendments_text: str = "[]") -> Timeline:
    """The run's whole schedule: its spec's program and its amendments (cached per text)."""
    key = ("run", spec_text, amendments_text)
    schedule: Timeline | None = COMPILED.get(key)
    if schedule is None:
        compiled = compile_spec(spec_text)
        amendments = [] if amendments_text == "[]" else json.loads(amendments_text)
        schedule = timeline(compiled.spec, amendments, compiled.program)
        # The base program is counted under its spec's entry; amendments compile their own.
        size = 512 + _BYTES_PER_SPEC_CHAR * len(amendments_text)
        COMPILED.put(key, schedule, size)
    return schedule


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
        until = ov.get("until_step")  # withdrawn: in force on [from_step, until_step)
        last = stop if until is None else min(stop, int(until))
        if first >= last or last <= start:
            continue
        a, b = max(0, first - start), last - start
        fld = ov["field"]
        for group in ov["groups"]:
            series = values.get(group, {}).get(fld)
            if series is None:
                continue
            if ov["action"] == "set":
                series[a:b] = float(ov["value"])
            else:
                series[a:b] *= float(ov["value"])
    return values


def evaluate(
    program: Program | Timeline,
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


def make_override(
    program: Program | Timeline, body: OverrideChange, at: str, n: int = 1
) -> dict[str, Any]:
    """The stored form of override number ``n``, checked against the run's groups and
    fields."""
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
        "n": n,
        "from_step": body.from_step,
        "action": body.action,
        "value": body.value,
        "groups": groups,
        "field": body.field,
        "note": body.note,
        "at": at,
    }


def withdraw_override(
    overrides: list[dict[str, Any]], n: int, from_step: int | None, leased_until: int, at: str
) -> dict[str, Any]:
    """Withdraw override ``n`` from ``from_step`` on (default: the earliest step every trainer
    is guaranteed to see) and return it. Values before that step keep it; an override
    withdrawn from a step before its own ``from_step`` never applies."""
    if not 1 <= n <= len(overrides):
        raise InvalidArgument(("n",), f"the run has no override {n} (it has {len(overrides)})")
    ov = overrides[n - 1]
    if ov.get("until_step") is not None:
        raise InvalidArgument(
            ("n",), f"override {n} was already withdrawn from step {ov['until_step']}"
        )
    step = leased_until if from_step is None else from_step
    check_not_too_late(f"withdrawing override {n}", step, leased_until)
    ov["until_step"] = step
    ov["withdrawn_at"] = at
    return ov


# -- amendments --------------------------------------------------------------------------


def amendment_key(change: AmendmentChange) -> str:
    """What makes two amendment requests the same (everything but the time)."""
    return json.dumps(
        {
            "from_step": change.from_step,
            "parts": dict(change.parts),
            "restart": change.restart,
            "base": change.base,
            "note": change.note,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def stored_amendment_key(amendment: Mapping[str, Any]) -> str:
    """:func:`amendment_key` of a stored amendment."""
    return amendment_key(
        AmendmentChange(
            from_step=int(amendment["from_step"]),
            parts={
                k: amendment[k]
                for k in ("schedule", "group_schedules", "param_schedules")
                if k in amendment
            },
            restart=bool(amendment["restart"]),
            base=amendment["base"],
            note=amendment["note"],
        )
    )


def make_amendment(
    spec: RunSpec,
    base: Program,
    amendments: Sequence[Mapping[str, Any]],
    state: Mapping[str, Any],
    change: AmendmentChange,
    at: str,
) -> dict[str, Any]:
    """The stored form of a new amendment, checked: it compiles for the run's groups and, with
    ``base="current"``, for the values at ``from_step - 1`` as they stand now."""
    if len(amendments) >= MAX_AMENDMENTS:
        raise InvalidArgument(
            ("from_step",), f"a run has at most {MAX_AMENDMENTS} amendments; create a new run"
        )
    if change.base == "current" and change.from_step < 1:
        raise InvalidArgument(
            ("base",), "base 'current' takes the values at from_step - 1: from_step must be >= 1"
        )
    stored: dict[str, Any] = {
        "n": len(amendments) + 1,
        "from_step": change.from_step,
        **{k: v for k, v in change.parts.items() if v is not None},
        "restart": change.restart,
        "base": change.base,
        "note": change.note,
        "at": at,
    }
    new = timeline(spec, [*amendments, stored], base)
    # Evaluating the first amended step compiles the amendment on its base values: a bad one
    # is refused now, not at a trainer's next request.
    new.evaluate(dict(state), change.from_step, 1)
    return stored


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
    schedule: Program | Timeline,
    state: Mapping[str, Any],
    completed_step: int | None,
    step: int,
    rank: int,
    values_text: str,
    existing: Sequence[tuple[int, str]],
) -> ReportPlan:
    """Decide what a report means: duplicate, conflict, stale, partial or completing.

    ``existing`` are the (rank, values text) already stored for ``step``; ``schedule`` is
    the run's whole schedule (its amendments included), which observes the aggregate.
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
    # One parse of every rank's text together: a thousand json.loads calls cost more than
    # the rest of a completing report.
    parsed = json.loads("[" + ",".join([*(t for _, t in existing), values_text]) + "]")
    ranks_in_order = [*(r for r, _ in existing), rank]
    reports = sorted(zip(ranks_in_order, parsed, strict=True), key=lambda rv: rv[0])
    agg = aggregate(reports, spec.aggregate)
    new_state, decision = schedule.observe(dict(state), step, agg)
    return ReportPlan(
        duplicate=False,
        complete=True,
        reported_ranks=ranks,
        completes_now=True,
        decision=decision,
        new_state=new_state,
        aggregate=agg,
    )
