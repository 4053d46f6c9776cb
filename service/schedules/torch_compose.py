"""Composition: torch's SequentialLR and ChainedScheduler, and the ``Epochs`` wrapper.

- ``SequentialLR``: torch 2.13 semantics. The child active at a step is
  ``bisect_right(milestones, t)``; it sees local time ``t - milestone``; a child that starts at
  a milestone > 0 restarts from the group's base (torch's ``_update_lr(0)``, closed form).
- ``ChainedScheduler``: torch steps every child on the same lr, in list order, so the value is
  the recurrence ``lr_t = A_t lr_{t-1} + B_t`` of the children's composed ``chain_map``s,
  evaluated with a vectorised scan (closed-form product when every child is multiplicative).
- ``Epochs``: a schedule written in epochs, applied per step: ``epoch = step // steps_per_epoch``
  (Lightning ``interval="epoch"``) or ``step / steps_per_epoch`` (``fractional``: timm's
  ``step_update``, CosineAnnealingWarmRestarts' fractional epochs).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from .base import (
    MAX_SCAN,
    MAX_STEP,
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    MetricCurve,
    NonNegInt,
    PosInt,
    ProgramState,
    ScheduleNode,
    SpecError,
    Steps,
    chainable,
    compose_maps,
    scan_affine,
)
from .piecewise import Piecewise, runs
from .torch_lambda import chunk_steps

if TYPE_CHECKING:
    from .spec import AnySchedule

MAX_CHILDREN = 1024
"""Most children a SequentialLR or ChainedScheduler may have."""

_CHUNK = 1 << 18
"""Steps per scan chunk: bounds the scan's memory whatever the horizon."""


# --------------------------------------------------------------------------------------------
# SequentialLR


class SequentialLR(ScheduleNode):
    """``torch.optim.lr_scheduler.SequentialLR``: ``schedulers[i]`` from ``milestones[i-1]``."""

    type: Literal["SequentialLR"]
    schedulers: list[AnySchedule] = Field(min_length=1, max_length=MAX_CHILDREN)
    milestones: list[NonNegInt] = Field(max_length=MAX_CHILDREN)

    @model_validator(mode="after")
    def _check_milestones(self) -> SequentialLR:
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(
                f"milestones must have exactly one entry fewer than schedulers: got "
                f"{len(self.schedulers)} scheduler(s) and {len(self.milestones)} milestone(s)"
            )
        if any(b < a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must be sorted ascending, got {self.milestones}")
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        starts = [0, *self.milestones]
        children: list[Curve] = []
        for i, child in enumerate(self.schedulers):
            lo = ctx.step_offset + starts[i]
            hi = ctx.step_offset + self.milestones[i] if i < len(self.milestones) else None
            active_from = max(ctx.active_from, lo)
            if ctx.active_until is not None:
                hi = ctx.active_until if hi is None else min(hi, ctx.active_until)
            children.append(
                child.compile(
                    ctx.child(
                        "schedulers",
                        i,
                        step_offset=lo,
                        active_from=active_from,
                        active_until=hi,
                    )
                )
            )
        return _SequentialCurve(ctx, children, list(self.milestones))


class _SequentialCurve(Piecewise, Chainable):
    """SequentialLR: the piecewise composite with torch's restart at each milestone, its
    chain map (as a ChainedScheduler child), and torch's lead momentum (see piecewise)."""

    def __init__(self, ctx: CompileContext, children: list[Curve], milestones: list[int]) -> None:
        super().__init__(ctx.base, children, milestones)
        self.loc = ctx.loc
        self.base = ctx.base.lr.reshape(-1, 1)
        self.chain: tuple[Chainable, ...] = tuple(chainable(c) for c in self.kids)
        cycling = [i for i, c in enumerate(self.cycled) if c]
        self._lead_from = cycling[-1] if cycling else None

    def segment_lr(self, k: int, local: Steps, state: ProgramState) -> Matrix:
        child = self.chain[k]
        if self.starts[k] == 0:
            # Active at step 0: torch runs its initial step (SequentialLR reset the lr to the
            # base first), so it behaves exactly as a standalone scheduler.
            return child.lr(local, state)
        restart = child.restart_map(state)
        if restart is None:
            return child.restart_lr(local, state)
        # A restart that keeps the previous lr (MultiplicativeLR): scan the segment from the
        # value the sequence had just before the milestone.
        last = int(local.max())
        if last >= MAX_SCAN:
            raise SpecError(
                (*self.loc, "schedulers", k),
                f"this child keeps the lr it finds at its milestone, so it is evaluated step by "
                f"step from there: at most {MAX_SCAN} steps after milestone "
                f"{int(self.starts[k])} (asked {last})",
            )
        x0 = self.lr(np.asarray([self.starts[k] - 1]), state)[:, 0]
        steps = np.arange(0, last + 1, dtype=np.float64)
        a, b = child.chain_map(steps, state)
        a[:, :1], b[:, :1] = restart
        values = scan_affine(a, b, x0)
        return values[:, local.astype(np.int64)]

    def scanned(self, end: int) -> tuple[int, int]:
        steps, held = super().scanned(end)
        for k, child in enumerate(self.chain):
            start = int(self.starts[k])
            if start > 0 and end > start and child.restart_map({}) is not None:
                # segment_lr scans the whole segment up to its last asked step, at once.
                n = min(end - start, MAX_SCAN)
                steps, held = steps + n, max(held, n)
        return steps, held

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        t = np.asarray(t, dtype=np.float64)
        idx, local = self.segments(t)
        a = np.empty((self.n_groups, len(t)))
        b = np.empty((self.n_groups, len(t)))
        positions = np.arange(len(t))
        for k, sel in runs(idx):
            child = self.chain[k]
            ak, bk = child.chain_map(local[sel], state)
            a[:, sel], b[:, sel] = ak, bk
            at0 = positions[sel][local[sel] == 0]
            if len(at0) == 0:
                continue
            if self.starts[k] == 0:
                # SequentialLR's constructor resets the lr to the base, then the child's
                # initial step runs: absolute.
                a0, b0 = child.chain_map(np.zeros(1), state)
                a[:, at0], b[:, at0] = 0.0, a0 * self.base + b0
            else:
                restart = child.restart_map(state)
                if restart is None:
                    a[:, at0] = 0.0
                    b[:, at0] = child.restart_lr(np.zeros(1), state)
                else:
                    a[:, at0], b[:, at0] = restart
        return a, b

    def lead(self, state: ProgramState) -> Matrix:
        """torch leaves momentum alone while a non-cycling child runs: before any cycling child
        has run, it is what the last momentum-cycling child's constructor wrote (its own step
        0), since torch constructs every child before the sequence starts."""
        assert self._lead_from is not None  # only asked when some child cycles momentum
        values = self.kids[self._lead_from].momentum(np.zeros(1), state)
        assert values is not None
        return values


# --------------------------------------------------------------------------------------------
# ChainedScheduler


class ChainedScheduler(ScheduleNode):
    """``torch.optim.lr_scheduler.ChainedScheduler``: every child steps on the same lr."""

    type: Literal["ChainedScheduler"]
    schedulers: list[AnySchedule] = Field(min_length=1, max_length=MAX_CHILDREN)

    def compile(self, ctx: CompileContext) -> Curve:
        children = [
            child.compile(ctx.child("schedulers", i)) for i, child in enumerate(self.schedulers)
        ]
        return _ChainedCurve(ctx, children)


class _ChainedCurve(Chainable):
    def __init__(self, ctx: CompileContext, children: list[Curve]) -> None:
        self.n_groups = ctx.n_groups
        self.loc = ctx.loc
        self.base = ctx.base.lr.reshape(-1, 1)
        self.kids: tuple[Curve, ...] = tuple(children)
        self.chain: tuple[Chainable, ...] = tuple(chainable(c) for c in children)
        # A metric-driven child decides on the chain's value just before it (torch's
        # ReduceLROnPlateau.step() run at that place in the chain): MetricCurve.input_lr.
        # Compile-time wiring, done before this curve (let alone the program) is shared.
        for k, kid in enumerate(children):
            if isinstance(kid, MetricCurve):
                kid.input_lr = partial(self._value_before, k)
        self.horizon = min(c.mult_horizon() for c in self.chain)
        self.stateless = not any(True for _ in self.metric_nodes())
        # Scan checkpoints when values do not depend on state, so that later windows do not
        # rescan from the horizon: _checkpoints[i] is the lr at step horizon + (i+1)*chunk - 1,
        # where the scan chunk starting at horizon + (i+1)*chunk begins. A pure function of
        # the spec; append-only under _lock (so the index of an entry never shifts), read
        # without it; at most MAX_SCAN // chunk entries.
        self._checkpoints: list[npt.NDArray[np.float64]] = []
        self._lock = threading.Lock()
        # Scan chunks hold at most 2M values (16 MB a matrix; the scan keeps about six): up to
        # 8 groups scan _CHUNK steps at a time as before, 1,024 groups 2,048.
        self._chunk = chunk_steps(self.n_groups, _CHUNK)

    def children(self) -> Sequence[Curve]:
        return self.kids

    def mult_horizon(self) -> int:
        return self.horizon

    def scanned(self, end: int) -> tuple[int, int]:
        steps, held = super().scanned(end)
        if end > self.horizon:
            n = min(end, self.horizon + MAX_SCAN) - self.horizon
            steps, held = steps + n, max(held, min(n, self._chunk))
        return steps, held

    def _value_before(self, k: int, t: Steps, state: ProgramState) -> Matrix:
        """The chain's lr at steps ``t`` after step ``t - 1`` and the maps of children
        ``0..k-1`` at ``t`` (the base before step 0): ``MetricCurve.input_lr`` of child k."""
        t = np.asarray(t, dtype=np.float64)
        prev = self.lr(np.maximum(t - 1, 0), state)
        x = np.where(t[None, :] > 0, prev, self.base)
        for kid in self.chain[:k]:
            a, b = kid.chain_map(t, state)
            x = a * x + b
        return x

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        out = np.ones((self.n_groups, len(t)))
        for child in self.chain:
            out = out * child.factor(t, state)
        return out

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        a, b = self.chain[0].chain_map(t, state)
        for child in self.chain[1:]:
            a, b = compose_maps((a, b), child.chain_map(t, state))
        return a, b

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        # Momentum cyclers (CyclicLR, OneCycleLR) write absolute values: the last one wins.
        for child in reversed(self.kids):
            values = child.momentum(t, state)
            if values is not None:
                return values
        return None

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        out = np.empty((self.n_groups, len(t)))
        if len(t) == 0:
            return out
        if np.any(np.floor(t) != t):
            raise SpecError(self.loc, "ChainedScheduler steps only at whole steps or epochs")
        fast = t < self.horizon
        if fast.any():
            out[:, fast] = self.base * self.factor(t[fast], state)
        if fast.all():
            return out
        slow = np.nonzero(~fast)[0]
        order = slow[np.argsort(t[slow], kind="stable")]
        end = int(t[order[-1]]) + 1
        if end - self.horizon > MAX_SCAN:
            raise SpecError(
                self.loc,
                f"this ChainedScheduler is recursive from step {self.horizon} (a child adds to "
                f"the lr) and can be evaluated only up to step {self.horizon + MAX_SCAN}",
            )
        begin, x = self._start(self.horizon, int(t[order[0]]), state)
        pos = 0
        chunk = self._chunk
        for lo in range(begin, end, chunk):
            hi = min(lo + chunk, end)
            steps = np.arange(lo, hi, dtype=np.float64)
            a, b = self.chain_map(steps, state)
            values = scan_affine(a, b, x)
            x = values[:, -1]
            if self.stateless and hi - lo == chunk and (hi - self.horizon) % chunk == 0:
                self._record((hi - self.horizon) // chunk - 1, x)
            stop = pos + int(np.searchsorted(t[order[pos:]], hi, side="left"))
            if stop > pos:
                sel = order[pos:stop]
                out[:, sel] = values[:, t[sel].astype(np.int64) - lo]
                pos = stop
        return out

    def _record(self, i: int, x: Matrix) -> None:
        """Keep checkpoint ``i`` (see ``__init__``). Chunks are aligned on the horizon, so
        every thread computes the same bits for it; the first one stores them."""
        with self._lock:
            if len(self._checkpoints) == i:
                value = np.array(x, dtype=np.float64)
                value.setflags(write=False)
                self._checkpoints.append(value)

    def _start(self, horizon: int, first: int, state: ProgramState) -> tuple[int, Matrix]:
        """Where the scan starts and the lr just before it (from a checkpoint or the
        closed-form product at ``horizon - 1``)."""
        if self.stateless:
            # The last checkpoint at or before ``first`` (lock-free: entries never change).
            i = min(len(self._checkpoints), (first - horizon) // self._chunk) - 1
            if i >= 0:
                return horizon + (i + 1) * self._chunk, self._checkpoints[i]
        if horizon == 0:
            return 0, self.base[:, 0].copy()
        x = self.base * self.factor(np.asarray([horizon - 1], dtype=np.float64), state)
        return horizon, x[:, 0]


# --------------------------------------------------------------------------------------------
# Epochs wrapper


class Epochs(ScheduleNode):
    """A schedule written in epochs, applied per step.

    ``fractional: false`` (default): the schedule advances once per ``steps_per_epoch`` steps
    (Lightning's ``interval="epoch"``). ``fractional: true``: it is evaluated at
    ``step / steps_per_epoch`` (timm's ``step_update``, CosineAnnealingWarmRestarts'
    ``step(epoch + i / iters)``). Metric-driven nodes are refused inside (they react to
    reports at steps, not epochs).
    """

    library = "lrserve"
    type: Literal["Epochs"]
    steps_per_epoch: PosInt
    fractional: bool = Field(default=False, strict=True)
    schedule: AnySchedule

    def compile(self, ctx: CompileContext) -> Curve:
        extra = {**ctx.extra, "fractional_epochs": self.fractional}
        child = self.schedule.compile(ctx.child("schedule", in_epochs=True, extra=extra))
        for node in child.metric_nodes():
            raise SpecError(
                (*ctx.loc, "schedule"),
                f"metric-driven schedule at {node.path} cannot be inside Epochs: it reacts to "
                "reports at steps; put the Epochs wrapper around its time-driven siblings "
                "instead",
            )
        if self.fractional and _contains_chained(child):
            raise SpecError(
                (*ctx.loc, "fractional"),
                "ChainedScheduler is recursive (one step at a time) and cannot take "
                "fractional epochs; use fractional: false",
            )
        return _EpochsCurve(ctx, child, self.steps_per_epoch, self.fractional)


def _contains_chained(curve: Curve) -> bool:
    return isinstance(curve, _ChainedCurve) or any(_contains_chained(c) for c in curve.children())


class _EpochsCurve(Chainable):
    def __init__(self, ctx: CompileContext, child: Curve, spe: int, fractional: bool) -> None:
        self.n_groups = ctx.n_groups
        self.child = child
        self.chain = chainable(child)
        self.spe = spe
        self.fractional = fractional

    def children(self) -> Sequence[Curve]:
        return (self.child,)

    def _epoch(self, t: Steps) -> Steps:
        t = np.asarray(t, dtype=np.float64)
        return t / self.spe if self.fractional else np.floor_divide(t, self.spe)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.child.lr(self._epoch(t), state)

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        return self.child.momentum(self._epoch(t), state)

    def restart_lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.chain.restart_lr(self._epoch(t), state)

    def restart_map(self, state: ProgramState) -> tuple[Matrix, Matrix] | None:
        return self.chain.restart_map(state)

    def scanned(self, end: int) -> tuple[int, int]:
        return self.child.scanned(-(-end // self.spe) + 1)

    def mult_horizon(self) -> int:
        if self.fractional:
            return 0
        return min(self.chain.mult_horizon() * self.spe, MAX_STEP + 1)

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return self.chain.factor(self._epoch(t), state)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        if self.fractional:
            return super().chain_map(t, state)
        t = np.asarray(t, dtype=np.float64)
        a = np.ones((self.n_groups, len(t)))
        b = np.zeros((self.n_groups, len(t)))
        edge = np.mod(t, self.spe) == 0
        if edge.any():
            a[:, edge], b[:, edge] = self.chain.chain_map(t[edge] / self.spe, state)
        return a, b


NODES: tuple[type[ScheduleNode], ...] = (SequentialLR, ChainedScheduler, Epochs)

__all__ = ["NODES", "ChainedScheduler", "Epochs", "SequentialLR"]
