"""A run's schedule compiled for its parameter groups: evaluate windows, observe reports.

``ScheduleSpec`` is the schedule part of a run body (``groups``, ``schedule``,
``group_schedules``, ``param_schedules``); ``Program(spec)`` compiles it once. Evaluation and
observation are pure: the metric-driven nodes' state is a JSON-serialisable dict passed in and
returned, never kept on the program.

A ``Program`` is an immutable value once constructed (see :mod:`.base`): the service shares one
between requests and evaluates it from the event loop and worker threads at once. Its only
mutable part is the one-step memo, a bounded thread-safe LRU of state-independent blocks.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import (
    MAX_NESTING,
    MAX_STEP,
    CompileContext,
    Curve,
    GroupBase,
    Matrix,
    MetricCurve,
    NonNegReal,
    ProgramState,
    ScanResume,
    SpecError,
)
from .cost import PartCost, part_cost
from .cost import held_bytes as _held_bytes
from .cost import window_work as _window_work
from .spec import AnySchedule
from .torch_compose import SCAN_FORMAT

MAX_GROUPS = 1024
GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class GroupSpec(BaseModel):
    """One optimizer parameter group: its name and starting hyperparameters.

    ``momentum`` (SGD-style) and ``betas`` (Adam-style; ``betas[0]`` is the field ``beta1``)
    are mutually exclusive. Any further number (``eps``, ...) is accepted as an extra
    hyperparameter that ``param_schedules`` may schedule.
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    __pydantic_extra__: dict[str, NonNegReal] = Field(init=False)

    name: str = Field(pattern=GROUP_NAME.pattern)
    lr: NonNegReal
    momentum: NonNegReal | None = None
    betas: tuple[NonNegReal, NonNegReal] | None = None
    weight_decay: NonNegReal | None = None

    @model_validator(mode="after")
    def _check(self) -> GroupSpec:
        if self.momentum is not None and self.betas is not None:
            raise ValueError("give either momentum (SGD-style) or betas (Adam-style), not both")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        for key in self.model_extra or {}:
            if not FIELD_NAME.match(key) or key in _RESERVED:
                raise ValueError(f"{key!r} is not a valid hyperparameter name")
        return self

    def hyperparameters(self) -> dict[str, float]:
        """Every schedulable number this group has, by field name (``beta1`` for betas[0])."""
        out: dict[str, float] = {"lr": self.lr}
        if self.momentum is not None:
            out["momentum"] = self.momentum
        if self.betas is not None:
            out["beta1"] = self.betas[0]
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        for key, value in (self.model_extra or {}).items():
            out[key] = float(value)
        return out


_RESERVED = {"name", "lr", "momentum", "betas", "beta1", "weight_decay"}


def _depth(value: Any) -> int:
    """Nesting depth of schedule nodes in raw input (iterative: never recursion-limited)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            depth += 1 if "type" in item else 0
            deepest = max(deepest, depth)
            if depth > MAX_NESTING + 1:
                return depth
            stack.extend((v, depth) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth) for v in item)
    return deepest


class ScheduleSpec(BaseModel):
    """The schedule part of a run: groups, the schedule, per-group and per-field overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: list[GroupSpec] = Field(min_length=1, max_length=MAX_GROUPS)
    schedule: AnySchedule
    group_schedules: dict[str, AnySchedule] = Field(default_factory=dict)
    param_schedules: dict[str, AnySchedule] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bounded_nesting(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in ("schedule", "group_schedules", "param_schedules"):
                # The root node is level 1; MAX_NESTING composites may stack on it.
                if _depth(data.get(key)) > MAX_NESTING + 1:
                    raise ValueError(f"{key}: schedules nest deeper than {MAX_NESTING} levels")
        return data

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups: list[GroupSpec]) -> list[GroupSpec]:
        seen: set[str] = set()
        for g in groups:
            if g.name in seen:
                raise ValueError(f"group name {g.name!r} is used twice; names must be unique")
            seen.add(g.name)
        return groups

    @field_validator("group_schedules")
    @classmethod
    def _known_groups(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        groups = info.data.get("groups")
        if groups is not None:
            names = [g.name for g in groups]
            unknown = [k for k in value if k not in names]
            if unknown:
                raise ValueError(f"unknown group name(s) {unknown}; the groups are {names}")
        return value

    @field_validator("param_schedules")
    @classmethod
    def _known_fields(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "lr" in value:
            raise ValueError("schedule lr with schedule / group_schedules, not param_schedules")
        groups = info.data.get("groups")
        if groups is not None:
            have = {f for g in groups for f in g.hyperparameters()}
            missing = [k for k in value if k not in have]
            if missing:
                raise ValueError(
                    f"no group has the hyperparameter(s) {missing}; groups have {sorted(have)}"
                )
        return value


@dataclass(frozen=True)
class _Part:
    """One compiled curve and the groups/field it writes."""

    curve: Curve
    groups: tuple[int, ...]
    field: str


_BLOCK = 256
"""Steps per memoised block of a state-independent part (see ``Program._pure_block``)."""
_BLOCKS_MAX_BYTES = 128 * 1024
"""Memo bound per program (compiled programs are themselves cached, 512 at most)."""

Block = tuple[Matrix, Matrix | None]


def _walk(curve: Curve) -> Iterator[Curve]:
    yield curve
    for child in curve.children():
        yield from _walk(child)


def _block(parts: Sequence[_Part], cycles: Sequence[bool], k: int, first: int) -> Block:
    """Part ``k``'s (lr, cycled momentum) over ``[first, first + _BLOCK)``, read-only (it is
    shared by every thread that reads the memo)."""
    part = parts[k]
    t = np.arange(first, min(first + _BLOCK, MAX_STEP), dtype=np.float64)
    with np.errstate(all="ignore"):
        lr = np.ascontiguousarray(part.curve.lr(t, {}), dtype=np.float64)
        mom = part.curve.momentum(t, {}) if cycles[k] else None
    lr.setflags(write=False)
    if mom is not None:
        mom = np.ascontiguousarray(mom, dtype=np.float64)
        mom.setflags(write=False)
    return lr, mom


def _check_window(start: object, count: object) -> tuple[int, int]:
    for name, value in (("start", start), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SpecError((name,), f"must be an integer, got {value!r}")
        if value < 0:
            raise SpecError((name,), f"must be >= 0, got {value}")
    s, c = int(start), int(count)  # type: ignore[call-overload]
    if s + c > MAX_STEP:
        raise SpecError(("count",), f"start + count must be <= {MAX_STEP}, got {s + c}")
    return s, c


class Program:
    """A ``ScheduleSpec`` compiled for its groups (raises ``SpecError`` for problems that
    depend on the groups, e.g. a per-group list of the wrong length)."""

    def __init__(self, spec: ScheduleSpec) -> None:
        self.spec = spec
        self.group_names: tuple[str, ...] = tuple(g.name for g in spec.groups)
        lr = np.asarray([g.lr for g in spec.groups], dtype=np.float64)
        mom = np.asarray(
            [
                g.momentum
                if g.momentum is not None
                else (g.betas[0] if g.betas is not None else math.nan)
                for g in spec.groups
            ],
            dtype=np.float64,
        )
        base = GroupBase(names=self.group_names, lr=lr, momentum=mom)
        index = {name: i for i, name in enumerate(self.group_names)}
        parts: list[_Part] = []
        shared = tuple(i for i, n in enumerate(self.group_names) if n not in spec.group_schedules)
        if shared:
            ctx = CompileContext(base=base.subset(shared), loc=("schedule",))
            parts.append(_Part(spec.schedule.compile(ctx), shared, "lr"))
        for name, node in spec.group_schedules.items():
            i = index[name]
            ctx = CompileContext(base=base.subset([i]), loc=("group_schedules", name))
            parts.append(_Part(node.compile(ctx), (i,), "lr"))
        for fld, node in spec.param_schedules.items():
            having = tuple(i for i, g in enumerate(spec.groups) if fld in g.hyperparameters())
            values = np.asarray(
                [spec.groups[i].hyperparameters()[fld] for i in having], dtype=np.float64
            )
            sub = base.subset(having)
            sub = GroupBase(names=sub.names, lr=values, momentum=np.full(len(having), math.nan))
            ctx = CompileContext(base=sub, loc=("param_schedules", fld))
            parts.append(_Part(node.compile(ctx), having, fld))
        self._parts = parts
        self._momentum_field: dict[int, str] = {}
        for i, g in enumerate(spec.groups):
            if g.momentum is not None:
                self._momentum_field[i] = "momentum"
            elif g.betas is not None:
                self._momentum_field[i] = "beta1"
        self._base_momentum = mom
        self._metric_nodes: list[MetricCurve] = [
            node for part in parts for node in part.curve.metric_nodes()
        ]
        paths = [n.path for n in self._metric_nodes]
        if len(set(paths)) != len(paths):  # pragma: no cover - paths derive from unique locs
            raise SpecError(("schedule",), "two metric-driven nodes share a state key")
        self._check_param_momentum_conflicts()
        fields: dict[str, list[str]] = {n: ["lr"] for n in self.group_names}
        for i, fld in self._momentum_field.items():
            fields[self.group_names[i]].append(fld)
        for part in parts:
            if part.field != "lr":
                for i in part.groups:
                    if part.field not in fields[self.group_names[i]]:
                        fields[self.group_names[i]].append(part.field)
        self.fields: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in fields.items()}
        self.series = sum(len(v) for v in self.fields.values())
        """Series a window answers (groups x their fields)."""
        self._costs: tuple[PartCost, ...] = tuple(part_cost(p.curve, len(p.groups)) for p in parts)
        self.nodes = sum(c.total_nodes for c in self._costs)
        """Compiled schedule nodes over every part (the work model's size of the program)."""
        self.recursive = any(c.recursive for c in self._costs)
        """Whether a part scans (its work grows with the step, not only with the window)."""
        scans = [c for part in parts for c in _walk(part.curve) if hasattr(c, "name_scans")]
        self.scan_name: str | None = None
        """What names this program's scan checkpoints in a backing (``None``: it has no scan
        that keeps any): a hash of the spec and of the scan's format, so the same spec
        compiled anywhere resumes from them."""
        if scans:
            text = f"{SCAN_FORMAT}\n{spec.model_dump_json()}".encode()
            self.scan_name = hashlib.blake2b(text, digest_size=16).hexdigest()
            for curve in scans:
                curve.name_scans(self.scan_name)
        # Without a recursion the work is affine in the window's length: keep its two terms,
        # so that pricing a trainer's read costs two multiplications, not a walk of parts.
        self._affine = (
            None
            if self.recursive
            else (
                _window_work(self._costs, self.series, 0, 1)
                - _window_work(self._costs, self.series, 0, 0),
                _window_work(self._costs, self.series, 0, 0),
            )
        )
        self.metric_names: frozenset[str] = frozenset(n.metric for n in self._metric_nodes)
        # Parts without a metric-driven node are pure functions of the step. For one step,
        # their values come from a memoised block (see _pure_block): a block costs about what
        # one step costs (numpy's per-call overhead), and a run is asked about nearby steps.
        # The memo is a bounded LRU (functools.lru_cache: thread-safe, and a miss computed by
        # two threads at once is stored once). Its bound is fixed here: a part whose block is
        # larger than a quarter of the budget is not memoised, and the entry count is what
        # the budget holds of the largest memoised block.
        probe, state = np.zeros(1), self.initial_state()
        cycles = tuple(
            p.field == "lr" and p.curve.momentum(probe, state) is not None for p in parts
        )
        memoised: list[bool] = []
        largest = 0
        for p, cycled in zip(parts, cycles, strict=True):
            size = len(p.groups) * _BLOCK * 8 * (2 if cycled else 1)
            memo = next(iter(p.curve.metric_nodes()), None) is None
            memo = memo and size <= _BLOCKS_MAX_BYTES // 4
            memoised.append(memo)
            largest = max(largest, size) if memo else largest
        self._memoised = tuple(memoised)
        self._blocks = functools.lru_cache(maxsize=_BLOCKS_MAX_BYTES // max(largest, 1))(
            functools.partial(_block, tuple(parts), cycles)
        )

    def _check_param_momentum_conflicts(self) -> None:
        probe = np.zeros(1)
        state = self.initial_state()
        for part in self._parts:
            if part.field != "lr" or part.curve.momentum(probe, state) is None:
                continue
            for i in part.groups:
                fld = self._momentum_field.get(i)
                if fld is not None and fld in self.spec.param_schedules:
                    raise SpecError(
                        ("param_schedules", fld),
                        f"group {self.group_names[i]!r} already has its {fld} cycled by its lr "
                        "schedule; schedule it in one place only",
                    )

    # -- state ------------------------------------------------------------------------------

    @property
    def metric_nodes(self) -> tuple[MetricCurve, ...]:
        """Every metric-driven node, in the order they observe (read-only view)."""
        return tuple(self._metric_nodes)

    def initial_state(self) -> ProgramState:
        """Every metric-driven node's state before any report, keyed by node path."""
        return {node.path: node.initial_state() for node in self._metric_nodes}

    def _full_state(self, state: Mapping[str, Any] | None) -> ProgramState:
        full = self.initial_state()
        if state:
            full.update({k: v for k, v in state.items() if k in full})
        return full

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(
        self, state: Mapping[str, Any] | None, start: int, count: int
    ) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
        """Values for steps ``[start, start + count)``: ``{group: {field: array(count)}}``."""
        start, count = _check_window(start, count)
        full = self._full_state(state)
        t = np.arange(start, start + count, dtype=np.float64)
        out: dict[str, dict[str, npt.NDArray[np.float64]]] = {n: {} for n in self.group_names}
        momentum_done: set[int] = set()
        with np.errstate(all="ignore"):
            for k, part in enumerate(self._parts):
                if count == 1 and self._memoised[k]:
                    values, cycled = self._pure_block(k, start)
                else:
                    values = part.curve.lr(t, full)
                    cycled = None
                    if part.field == "lr":
                        cycled = part.curve.momentum(t, full)
                for row, i in enumerate(part.groups):
                    out[self.group_names[i]][part.field] = np.ascontiguousarray(values[row])
                if part.field != "lr":
                    continue
                if cycled is None:
                    continue
                for row, i in enumerate(part.groups):
                    fld = self._momentum_field.get(i)
                    if fld is not None:
                        out[self.group_names[i]][fld] = np.ascontiguousarray(cycled[row])
                        momentum_done.add(i)
        for i, fld in self._momentum_field.items():
            if i not in momentum_done and fld not in self.spec.param_schedules:
                out[self.group_names[i]][fld] = np.full(count, self._base_momentum[i])
        return {name: {f: out[name][f] for f in self.fields[name]} for name in self.group_names}

    def work(self, start: int, count: int) -> int:
        """What evaluating and answering ``[start, start + count)`` costs (see :mod:`.cost`)."""
        if self._affine is not None:
            return self._affine[0] * count + self._affine[1]
        return _window_work(self._costs, self.series, start, count)

    def resumed_work(self, start: int, count: int, state: Mapping[str, Any] | None) -> int:
        """:meth:`work` with every scan counted from the checkpoint it would resume from: the
        latest valid for ``state`` this process finds (memo, then scan backing; it may read
        the database), or with ``state=None`` the one a trainer walking forward leaves."""
        if not self.recursive:
            return self.work(start, count)
        full = None if state is None else self._full_state(state)
        return _window_work(self._costs, self.series, start, count, ScanResume(start, full))

    def held_bytes(self, start: int, count: int) -> int:
        """Most memory a recursion holds at once for that window (see :mod:`.cost`)."""
        if not self.recursive:
            return 0
        return _held_bytes(self._costs, start, count)

    def _pure_block(self, k: int, step: int) -> Block:
        """Part ``k``'s (lr, cycled momentum) at ``step`` (shape ``(groups, 1)``), sliced from a
        memoised block of ``_BLOCK`` steps. Only for parts without metric-driven nodes, whose
        values do not depend on the state: the memo is a pure recomputation cache."""
        first = step - step % _BLOCK
        lr, mom = self._blocks(k, first)
        i = step - first
        # Copies: callers own what evaluate returns and may write to it.
        return lr[:, i : i + 1].copy(), None if mom is None else mom[:, i : i + 1].copy()

    def at(self, state: Mapping[str, Any] | None, step: int) -> dict[str, dict[str, float]]:
        """The values at one step: ``{group: {field: float}}``."""
        window = self.evaluate(state, step, 1)
        return {g: {f: float(v[0]) for f, v in fields.items()} for g, fields in window.items()}

    # -- reports ----------------------------------------------------------------------------

    def observe(
        self, state: Mapping[str, Any] | None, step: int, metrics: Mapping[str, float | None]
    ) -> tuple[ProgramState, dict[str, Any]]:
        """Feed one (aggregated) report at ``step`` to every metric-driven node, in tree order.

        Returns ``(new_state, decision)`` with ``decision = {"reduced": bool, "nodes": [...]}``;
        a reduction decided here applies from ``step + 1``. Nodes whose metric is absent (or
        ``None``) or whose active range does not include ``step`` are skipped.
        """
        step, _ = _check_window(step, 0)
        new_state = self._full_state(state)
        nodes: list[dict[str, Any]] = []
        for node in self._metric_nodes:
            value = metrics.get(node.metric)
            if value is None or not node.observes(step):
                continue
            node_state, decision = node.observe(new_state[node.path], float(value), step, new_state)
            new_state = {**new_state, node.path: node_state}
            nodes.append(
                {"path": node.path, "metric": node.metric, "value": float(value), **decision}
            )
        reduced = any(bool(n.get("reduced")) for n in nodes)
        return new_state, {"reduced": reduced, "nodes": nodes}


__all__ = ["MAX_GROUPS", "GroupSpec", "Program", "ScheduleSpec"]
