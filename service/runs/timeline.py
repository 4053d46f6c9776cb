"""A run's schedule over time: the spec's program from step 0, then each amendment from its
``from_step`` (pure: no I/O).

An amendment replaces some *slots* of the schedule from a step on. A slot is one field of one
group (``("head", "lr")``, ``("backbone", "weight_decay")``):

- ``schedule`` takes the ``lr`` slot of every group without a group schedule (after the
  amendment's own ``group_schedules`` are merged in), ``group_schedules[g]`` group ``g``'s;
  a group's momentum (``momentum`` or ``beta1``) goes with its ``lr`` unless a
  ``param_schedules`` entry schedules it.
- ``param_schedules[f]`` takes slot ``f`` of every group that has that hyperparameter.

At step ``t`` a slot's value comes from the last amendment (in the order they were made) with
``from_step <= t`` that took the slot, else from the spec's own program: what an amendment
leaves out stays exactly as it was, and nothing before ``from_step`` changes.

Each amendment compiles to its own :class:`~service.schedules.Program` over the run's groups:

- ``restart``: the program sees local steps (``t - from_step``; its step 0 is ``from_step``);
  otherwise the run's absolute step.
- ``base="current"``: the groups' base values (``lr``, momentum / ``betas[0]``, scheduled
  fields) are the schedule's values at ``from_step - 1``, the values in force when the new
  schedule takes over; as torch does when a new scheduler is built on an optimizer that holds
  them. They depend on the reports before ``from_step`` (a plateau reduction changes them), so
  the program is compiled for the values of the current state (and cached per values).
  Operator overrides are not part of them: overrides stay a layer on top of the schedule, so an
  override in force before the amendment keeps applying after it.

Metric-driven nodes of an amendment have their own state (keys prefixed ``amendment<n>:``),
fresh at its ``from_step``: they see reports from ``from_step`` on. A part of the run sees a
report at step ``s`` while it serves at least one slot at ``s + 1`` (the step a decision
applies from), so a part that an amendment replaced entirely stops deciding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from service.runs.errors import InvalidArgument
from service.schedules import Program, ScheduleSpec
from service.schedules.base import MAX_STEP, ProgramState, SpecError
from service.schedules.cost import WORK_BUDGET

Values = dict[str, dict[str, npt.NDArray[np.float64]]]
Slot = tuple[str, str]

MAX_AMENDMENTS = 64
"""Amendments a run may have (each is a compiled program; evaluation visits each)."""

PARTS = ("schedule", "group_schedules", "param_schedules")


def state_prefix(n: int) -> str:
    """State keys of amendment ``n``'s metric-driven nodes start with this."""
    return f"amendment{n}:"


@lru_cache(maxsize=1024)
def _compile(spec_text: str) -> Program:
    """A program for a schedule spec's canonical JSON (a pure function of the text)."""
    return Program(ScheduleSpec.model_validate_json(spec_text))


def _spec_text(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _momentum_field(group: Mapping[str, Any]) -> str | None:
    if group.get("momentum") is not None:
        return "momentum"
    if group.get("betas") is not None:
        return "beta1"
    return None


def _rebase_problems(exc: ValidationError, groups: Sequence[Mapping[str, Any]]) -> str:
    """What of the rebased groups a spec refuses, named by group and field (at most 3)."""
    problems = []
    errors = exc.errors(include_url=False)
    for error in errors[:3]:
        loc = error.get("loc", ())
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 3 and loc[0] == "groups" and isinstance(loc[1], int):
            where = f"group {groups[loc[1]].get('name')!r} {'.'.join(str(p) for p in loc[2:])}"
        value = f" = {error['input']!r}" if "input" in error else ""
        problems.append(f"{where}{value}: {str(error.get('msg', 'invalid')).lower()}")
    if len(errors) > 3:
        problems.append(f"and {len(errors) - 3} more")
    return "; ".join(problems)


def _rebased(group: Mapping[str, Any], values: Mapping[str, float]) -> dict[str, Any]:
    """``group`` (a spec's group document) with its base values replaced by ``values``."""
    out = dict(group)
    for fld, value in values.items():
        if fld == "beta1":
            out["betas"] = [value, group["betas"][1]]
        else:
            out[fld] = value
    return out


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class _Segment:
    """One amendment, resolved against the run (what it takes and how it compiles)."""

    n: int
    from_step: int
    restart: bool
    current_base: bool
    parts: dict[str, Any]
    """The ``schedule`` / ``group_schedules`` / ``param_schedules`` in force after it."""
    program_parts: dict[str, Any]
    """What its program compiles (see :func:`_resolve`)."""
    slots: frozenset[Slot]
    shape: Program
    """The program over the run's initial base values: fields, state shape, validation."""


class Timeline:
    """A run's spec and its amendments, evaluated and observed as one schedule.

    Immutable once built (shared between threads like a :class:`Program`); build it with
    :func:`timeline`.
    """

    _segments: list[_Segment]

    def __init__(
        self,
        spec: ScheduleSpec,
        amendments: Sequence[Mapping[str, Any]] = (),
        base: Program | None = None,
        previous: Timeline | None = None,
    ) -> None:
        """``previous``: the timeline of ``amendments[:-1]``, when at hand (saves resolving
        the earlier amendments again; :func:`timeline` builds the chain)."""
        self.spec = spec
        self.base = Program(spec) if base is None else base
        self.group_names = self.base.group_names
        spec_doc = spec.model_dump(mode="json")
        self._groups: list[dict[str, Any]] = spec_doc["groups"]
        self._base_constants = {g.name: g.hyperparameters() for g in spec.groups}
        if amendments and previous is None:
            previous = timeline(spec, amendments[:-1], self.base)
        self._previous = previous
        segments: list[_Segment] = [] if previous is None else list(previous._segments)
        if amendments:
            parts = segments[-1].parts if segments else {k: spec_doc[k] for k in PARTS}
            segments.append(_resolve(self._groups, parts, amendments[-1]))
        self._segments = segments
        fields = {n: list(fs) for n, fs in self.base.fields.items()}
        for segment in segments:
            for name, fs in segment.shape.fields.items():
                fields[name].extend(f for f in fs if f not in fields[name])
        self.fields: dict[str, tuple[str, ...]] = {n: tuple(fs) for n, fs in fields.items()}
        self.metric_names = frozenset(
            self.base.metric_names.union(*(s.shape.metric_names for s in segments))
        )
        # Per slot: the amendments that take it, latest first.
        takers: dict[Slot, list[_Segment]] = {}
        for segment in segments:
            for slot in segment.slots:
                takers.setdefault(slot, []).insert(0, segment)
        self._takers = takers

    # -- state ------------------------------------------------------------------------

    def initial_state(self) -> ProgramState:
        state = dict(self.base.initial_state())
        for segment in self._segments:
            prefix = state_prefix(segment.n)
            state.update({prefix + k: v for k, v in segment.shape.initial_state().items()})
        return state

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self, state: Mapping[str, Any] | None, start: int, count: int) -> Values:
        """Every group's schedule values for ``[start, start + count)`` (no overrides)."""
        if not self._segments:
            return self.base.evaluate(state, start, count)
        _check_window(start, count)
        state = state or {}
        stop = start + count
        out: Values = {g: {f: np.empty(count) for f in fs} for g, fs in self.fields.items()}
        cuts = sorted(
            {start, stop} | {s.from_step for s in self._segments if start < s.from_step < stop}
        )
        for a, b in pairwise(cuts):
            owners = self._owners(a)
            for owner, slots in _by_owner(owners).items():
                values = self._segment_values(owner, state, a, b - a)
                for g, f in slots:
                    series = values[g].get(f)
                    if series is None:  # a field this part does not schedule: its constant
                        out[g][f][a - start : b - start] = self._base_constants[g][f]
                    else:
                        out[g][f][a - start : b - start] = series
        return out

    def work(self, start: int, count: int) -> int:
        """What evaluating ``[start, start + count)`` may cost: every program that may serve
        part of it, over all of it (an upper bound; see :mod:`service.schedules.cost`)."""
        if not self._segments:
            return self.base.work(start, count)
        programs = [self.base, *(s.shape for s in self._segments)]
        return sum(p.work(start, count) for p in programs)

    def resumed_work(self, start: int, count: int, state: Mapping[str, Any] | None) -> int:
        """:meth:`work` with scans counted from their checkpoints (``Program.resumed_work``).

        With ``state``, each program is priced over the part of the window it serves, in
        its own steps and state, as :meth:`evaluate` runs it (an amendment on the run's
        current values: the program rebased on them, and the one step of the timeline
        before it that gives them). ``state=None`` (the forward walk) prices every program
        over the whole window."""
        if not self._segments:
            return self.base.resumed_work(start, count, state)
        if state is None:
            return sum(p.resumed_work(start, count, None) for p in self.programs())
        stop = start + count
        cuts = sorted(
            {start, stop} | {s.from_step for s in self._segments if start < s.from_step < stop}
        )
        return sum(
            self._segment_work(owner, state, a, b - a)
            for a, b in pairwise(cuts)
            for owner in _by_owner(self._owners(a))
        )

    def _segment_work(
        self, segment: _Segment | None, state: Mapping[str, Any], start: int, count: int
    ) -> int:
        """:meth:`resumed_work` of what ``_segment_values`` evaluates."""
        if segment is None:
            return self.base.resumed_work(start, count, state)
        local = start - segment.from_step if segment.restart else start
        own = _own_state(state, segment.n)
        if not segment.current_base:
            return segment.shape.resumed_work(local, count, own)
        before = self._before(segment).resumed_work(segment.from_step - 1, 1, state)
        if before > WORK_BUDGET:
            # Not evaluated just to price it (the default budget: a server with another one
            # refuses or serves by its own): the program rebased on it priced as its shape.
            return before + segment.shape.work(local, count)
        return before + self._program(segment, state).resumed_work(local, count, own)

    def held_bytes(self, start: int, count: int) -> int:
        """Most memory a recursion holds at once for that window."""
        if not self._segments:
            return self.base.held_bytes(start, count)
        programs = [self.base, *(s.shape for s in self._segments)]
        return max(p.held_bytes(start, count) for p in programs)

    def programs(self) -> list[Program]:
        """The spec's program and each amendment's (over the run's initial base values)."""
        return [self.base, *(s.shape for s in self._segments)]

    @property
    def recursive(self) -> bool:
        """Whether any program of the run scans (see :attr:`Program.recursive`)."""
        return self.base.recursive or any(s.shape.recursive for s in self._segments)

    def _owners(self, step: int) -> dict[Slot, _Segment | None]:
        """Which part serves each slot at ``step`` (``None``: the spec's own program)."""
        owners: dict[Slot, _Segment | None] = {}
        for g, fs in self.fields.items():
            for f in fs:
                owners[(g, f)] = next(
                    (s for s in self._takers.get((g, f), ()) if s.from_step <= step), None
                )
        return owners

    def _segment_values(
        self, segment: _Segment | None, state: Mapping[str, Any], start: int, count: int
    ) -> Values:
        if segment is None:
            return self.base.evaluate(state, start, count)
        program = self._program(segment, state)
        local = start - segment.from_step if segment.restart else start
        return program.evaluate(_own_state(state, segment.n), local, count)

    def _program(self, segment: _Segment, state: Mapping[str, Any]) -> Program:
        if not segment.current_base:
            return segment.shape
        return self._rebased_program(segment, self._values_before(segment, state))

    def _values_before(
        self, segment: _Segment, state: Mapping[str, Any]
    ) -> dict[str, dict[str, float]]:
        """The values at ``from_step - 1`` of the schedule as it was before ``segment``."""
        before = self._before(segment)
        window = before.evaluate(state, segment.from_step - 1, 1)
        return {g: {f: float(v[0]) for f, v in fs.items()} for g, fs in window.items()}

    def _before(self, segment: _Segment) -> Timeline:
        """The timeline as it was before ``segment`` was added."""
        index = next(i for i, s in enumerate(self._segments) if s is segment)
        before = self._previous
        while before is not None and len(before._segments) > index:
            before = before._previous
        assert before is not None
        return before

    def _rebased_program(
        self, segment: _Segment, values: Mapping[str, Mapping[str, float]]
    ) -> Program:
        groups = [_rebased(g, values[g["name"]]) for g in self._groups]
        try:
            return _compile(_spec_text({"groups": groups, **segment.program_parts}))
        except (ValidationError, SpecError) as exc:
            why = _rebase_problems(exc, groups) if isinstance(exc, ValidationError) else str(exc)
            raise SpecError(
                ("amendments", segment.n),
                f"the values at step {segment.from_step - 1} cannot be this amendment's base "
                f'values: {why}. Amend with base "initial", or from another step',
            ) from None

    # -- reports ----------------------------------------------------------------------

    def observe(
        self, state: Mapping[str, Any] | None, step: int, metrics: Mapping[str, float | None]
    ) -> tuple[ProgramState, dict[str, Any]]:
        """Feed one aggregated report at ``step`` to every part that serves a slot at
        ``step + 1``; ``(new_state, decision)`` as :meth:`Program.observe`."""
        if not self._segments:
            return self.base.observe(state, step, metrics)
        full = {**self.initial_state(), **(state or {})}
        live = {owner.n if owner else 0 for owner in self._owners(step + 1).values()}
        new_state = dict(full)
        nodes: list[dict[str, Any]] = []
        if 0 in live:
            base_state, decision = self.base.observe(full, step, metrics)
            new_state.update(base_state)
            nodes.extend(decision["nodes"])
        for segment in self._segments:
            if segment.n not in live or step < segment.from_step:
                continue
            program = self._program(segment, full)
            local = step - segment.from_step if segment.restart else step
            own, decision = program.observe(_own_state(full, segment.n), local, metrics)
            prefix = state_prefix(segment.n)
            new_state.update({prefix + k: v for k, v in own.items()})
            nodes.extend({**d, "path": prefix + str(d["path"])} for d in decision["nodes"])
        return new_state, {"reduced": any(bool(n.get("reduced")) for n in nodes), "nodes": nodes}


def timeline(
    spec: ScheduleSpec, amendments: Sequence[Mapping[str, Any]], base: Program | None = None
) -> Timeline:
    """The timeline of a spec (compiled as ``base``, when at hand) and its amendments."""
    chain = Timeline(spec, (), base)
    for i in range(len(amendments)):
        chain = Timeline(spec, amendments[: i + 1], chain.base, chain)
    return chain


def _resolve(
    groups: Sequence[Mapping[str, Any]], parts: Mapping[str, Any], amendment: Mapping[str, Any]
) -> _Segment:
    """An amendment against the parts in force before it: its slots and its program.

    The program compiles only what the amendment gives (the slots it does not take are served
    by earlier parts): its ``schedule`` covers the groups that have no group schedule after
    the amendment (so a per-group list in it counts those groups, as in a run's spec); without
    one, a neutral schedule stands in for the groups it does not take.
    """
    n = int(amendment["n"])
    given = {k: amendment[k] for k in PARTS if amendment.get(k) is not None}
    merged = dict(parts)
    if "schedule" in given:
        merged["schedule"] = given["schedule"]
    for key in ("group_schedules", "param_schedules"):
        if key in given:
            merged[key] = {**parts[key], **given[key]}
    if "schedule" in given:
        own = {
            "schedule": given["schedule"],
            "group_schedules": merged["group_schedules"],
            "param_schedules": given.get("param_schedules", {}),
        }
    else:
        own = {
            "schedule": _NEUTRAL,
            "group_schedules": given.get("group_schedules", {}),
            "param_schedules": given.get("param_schedules", {}),
        }
    try:
        shape = _compile(_spec_text({"groups": list(groups), **own}))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(p for p in first.get("loc", ()) if isinstance(p, (str, int)))
        raise InvalidArgument(loc or ("schedule",), str(first.get("msg", "invalid"))) from None
    names = [str(g["name"]) for g in groups]
    lr_groups: set[str] = set(given.get("group_schedules", {}))
    if "schedule" in given:
        lr_groups |= {g for g in names if g not in merged["group_schedules"]}
    slots: set[Slot] = set()
    for g in groups:
        name = str(g["name"])
        if name in lr_groups:
            slots.add((name, "lr"))
            mf = _momentum_field(g)
            if mf is not None and mf not in merged["param_schedules"]:
                slots.add((name, mf))
    for fld in given.get("param_schedules", {}):
        for name, fs in shape.fields.items():
            if fld in fs:
                slots.add((name, fld))
    return _Segment(
        n=n,
        from_step=int(amendment["from_step"]),
        restart=bool(amendment.get("restart", False)),
        current_base=amendment.get("base", "initial") == "current",
        parts=merged,
        program_parts=own,
        slots=frozenset(slots),
        shape=shape,
    )


_NEUTRAL = {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}
"""Stands in for the lr of groups an amendment does not take (its values are never used)."""


def _own_state(state: Mapping[str, Any], n: int) -> dict[str, Any]:
    prefix = state_prefix(n)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _by_owner(owners: Mapping[Slot, _Segment | None]) -> dict[_Segment | None, list[Slot]]:
    out: dict[_Segment | None, list[Slot]] = {}
    for slot, owner in owners.items():
        out.setdefault(owner, []).append(slot)
    return out


def _check_window(start: int, count: int) -> None:
    if start < 0 or count < 0 or start + count > MAX_STEP:
        raise SpecError(("count",), f"start + count must be <= {MAX_STEP}, got {start + count}")


__all__ = ["MAX_AMENDMENTS", "Timeline", "state_prefix", "timeline"]
