"""optax's schedules (``optax.schedules``), by function name with their own arguments.

An optax schedule maps ``count`` (updates already applied) to a value, so the value for
step ``N`` is ``schedule(N)``. optax has one learning rate per transformation, so its
values are absolute; lrserve makes the value arguments (``init_value``, ``peak_value``,
``value``) optional, defaulting to each group's own base lr, and accepts a list with one
number per group for every value argument (``end_value`` too), so differential learning
rates work. Step arguments are shared. Values are computed in float64 (optax usually
computes in float32).

``join_schedules`` takes any lrserve schedules as children; each child sees its own time
``step - boundary``. ``sgdr_schedule`` takes ``warmup_cosine_decay_schedule`` arguments.
Every join (``join_schedules``, and the ones optax builds inside ``sgdr_schedule`` and the
``warmup_*`` schedules) is the one piecewise composite (:mod:`.piecewise`), which also carries a
child's cycled momentum: a ``OneCycleLR`` or ``CyclicLR`` child cycles momentum in its segment;
a later segment whose child does not cycle holds the last cycled value (as in SequentialLR);
before the first cycling segment the group keeps its own momentum (optax children write
nothing before they run; torch's SequentialLR shows what the cycling child's constructor
wrote there instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._libs import FnCurve, GroupFloat, PositiveSteps, SignedSteps, StepCount, group_column
from .base import (
    MAX_STEP,
    CompileContext,
    Curve,
    Matrix,
    ScheduleNode,
    SpecError,
    Steps,
)
from .piecewise import Piecewise

if TYPE_CHECKING:
    AnySchedule = Any

Fn = Callable[[Steps], Matrix]
"""A compiled optax schedule: local steps ``(N,)`` -> values broadcastable to ``(G, N)``."""


# --- the optax functions, over numpy arrays (value arguments are (G, 1) columns) -------------


def _polynomial(
    init: Matrix, end: Matrix, power: float, transition_steps: int, transition_begin: int
) -> Fn:
    if transition_steps <= 0:
        return lambda t: init + 0.0 * t
    begin = max(transition_begin, 0)

    def fn(t: Steps) -> Matrix:
        count = np.clip(t - begin, 0, transition_steps)
        frac = 1 - count / transition_steps
        return (init - end) * (frac**power) + end

    return fn


def _piecewise_constant(init: Matrix, boundaries_and_scales: dict[int, float] | None) -> Fn:
    items = sorted((boundaries_and_scales or {}).items())

    def fn(t: Steps) -> Matrix:
        v = init + 0.0 * t
        for threshold, scale in items:
            # optax: indicator = max(0, sign(threshold - count)); the scale applies at count >= b
            v = np.where(t < threshold, v, scale * v)
        return v

    return fn


def _linear_interp(start: Matrix, end: Matrix, pct: Steps) -> Matrix:
    return (end - start) * pct + start


def _cosine_interp(start: Matrix, end: Matrix, pct: Steps) -> Matrix:
    return end + (start - end) / 2.0 * (np.cos(math.pi * pct) + 1)


def _piecewise_interpolate(
    interpolate_type: str, init: Matrix, boundaries_and_scales: dict[int, float] | None
) -> Fn:
    interp = _linear_interp if interpolate_type == "linear" else _cosine_interp
    items = sorted((boundaries_and_scales or {}).items())
    bounds = [0] + [b for b, _ in items]
    values = [init]
    for _, scale in items:
        values.append(values[-1] * scale)  # jnp.cumprod

    def fn(t: Steps) -> Matrix:
        out = 0.0 * (init + t)
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            inside = (lo <= t) & (t < hi)
            pct = (t - lo) / max(hi - lo, 1)
            out = out + np.where(inside, interp(values[k], values[k + 1], pct), 0.0)
        return out + np.where(bounds[-1] <= t, values[-1], 0.0)

    return fn


def _exponential_decay(
    init: Matrix,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int,
    staircase: bool,
    end: Matrix | None,
) -> Fn:
    if transition_steps <= 0 or decay_rate == 0:
        return lambda t: init + 0.0 * t
    begin = max(transition_begin, 0)

    def fn(t: Steps) -> Matrix:
        decreased = t - begin
        p = decreased / transition_steps
        if staircase:
            p = np.floor(p)
        v = np.where(decreased <= 0, init, init * np.power(decay_rate, p))
        if end is not None:
            v = np.maximum(v, end) if decay_rate < 1.0 else np.minimum(v, end)
        return v

    return fn


def _cosine_decay(init: Matrix, decay_steps: int, alpha: Matrix | float, exponent: float) -> Fn:
    def fn(t: Steps) -> Matrix:
        count = np.minimum(t, float(decay_steps))
        cosine = 0.5 * (1 + np.cos(math.pi * count / decay_steps))
        return init * ((1 - alpha) * cosine**exponent + alpha)

    return fn


def _join(ctx: CompileContext, fns: Sequence[Fn], boundaries: Sequence[int]) -> Curve:
    """optax's ``join_schedules`` of closed forms: the piecewise composite of their curves."""
    return Piecewise(ctx.base, [FnCurve(ctx.n_groups, f) for f in fns], boundaries)


def _warmup_cosine(
    ctx: CompileContext,
    init: Matrix,
    peak: Matrix,
    warmup_steps: int,
    decay_steps: int,
    end: Matrix,
    exponent: float,
) -> Curve:
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(peak == 0.0, 0.0, end / peak)
    return _join(
        ctx,
        [
            _polynomial(init, peak, 1, warmup_steps, 0),
            _cosine_decay(peak, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


# --- nodes -------------------------------------------------------------------------------------


class _OptaxNode(ScheduleNode):
    library: ClassVar[str] = "optax"

    def fn(self, ctx: CompileContext) -> Fn:
        raise NotImplementedError

    def compile(self, ctx: CompileContext) -> Curve:
        return FnCurve(ctx.n_groups, self.fn(ctx))


def _scales_nonnegative(bs: dict[int, float] | None) -> None:
    if bs is not None and any(s < 0 for s in bs.values()):
        raise ValueError("boundaries_and_scales expects non-negative scale factors")


class OptaxConstantSchedule(_OptaxNode):
    """``optax.constant_schedule(value)``."""

    type: Literal["optax.constant_schedule"]
    value: GroupFloat | None = None

    def fn(self, ctx: CompileContext) -> Fn:
        v = group_column(ctx, self.value, "value")
        return lambda t: v + 0.0 * t


class OptaxPolynomialSchedule(_OptaxNode):
    """``optax.polynomial_schedule``: from ``init_value`` to ``end_value`` over the transition.

    ``transition_steps <= 0`` holds ``init_value``; a negative ``transition_begin`` is 0.
    """

    type: Literal["optax.polynomial_schedule"]
    init_value: GroupFloat | None = None
    end_value: GroupFloat
    power: Annotated[float, Field(ge=0)]
    transition_steps: SignedSteps
    transition_begin: SignedSteps = 0

    def fn(self, ctx: CompileContext) -> Fn:
        return _polynomial(
            group_column(ctx, self.init_value, "init_value"),
            group_column(ctx, self.end_value, "end_value"),
            self.power,
            self.transition_steps,
            self.transition_begin,
        )


class OptaxLinearSchedule(_OptaxNode):
    """``optax.linear_schedule``: ``polynomial_schedule`` with ``power=1``."""

    type: Literal["optax.linear_schedule"]
    init_value: GroupFloat | None = None
    end_value: GroupFloat
    transition_steps: SignedSteps
    transition_begin: SignedSteps = 0

    def fn(self, ctx: CompileContext) -> Fn:
        return _polynomial(
            group_column(ctx, self.init_value, "init_value"),
            group_column(ctx, self.end_value, "end_value"),
            1,
            self.transition_steps,
            self.transition_begin,
        )


class OptaxPiecewiseConstantSchedule(_OptaxNode):
    """``optax.piecewise_constant_schedule``: ``init_value`` times every scale with ``t >= b``.

    ``boundaries_and_scales`` is a JSON object ``{"step": scale}`` (keys are step numbers).
    """

    type: Literal["optax.piecewise_constant_schedule"]
    init_value: GroupFloat | None = None
    boundaries_and_scales: dict[SignedSteps, float] | None = None

    @model_validator(mode="after")
    def _scales(self) -> OptaxPiecewiseConstantSchedule:
        _scales_nonnegative(self.boundaries_and_scales)
        return self

    def fn(self, ctx: CompileContext) -> Fn:
        init = group_column(ctx, self.init_value, "init_value")
        return _piecewise_constant(init, self.boundaries_and_scales)


class OptaxPiecewiseInterpolateSchedule(_OptaxNode):
    """``optax.piecewise_interpolate_schedule``: linear or cosine between cumulative scales."""

    type: Literal["optax.piecewise_interpolate_schedule"]
    interpolate_type: Literal["linear", "cosine"]
    init_value: GroupFloat | None = None
    boundaries_and_scales: dict[StepCount, float] | None = None

    @model_validator(mode="after")
    def _scales(self) -> OptaxPiecewiseInterpolateSchedule:
        _scales_nonnegative(self.boundaries_and_scales)
        return self

    def fn(self, ctx: CompileContext) -> Fn:
        init = group_column(ctx, self.init_value, "init_value")
        return _piecewise_interpolate(self.interpolate_type, init, self.boundaries_and_scales)


class OptaxExponentialDecay(_OptaxNode):
    """``optax.exponential_decay``: ``init * rate ** ((t - begin) / T)``, bounded by ``end_value``.

    ``transition_steps <= 0`` or ``decay_rate == 0`` holds ``init_value`` (as optax does).
    """

    type: Literal["optax.exponential_decay"]
    init_value: GroupFloat | None = None
    transition_steps: SignedSteps
    decay_rate: Annotated[float, Field(ge=0)]
    transition_begin: SignedSteps = 0
    staircase: bool = False
    end_value: GroupFloat | None = None

    def fn(self, ctx: CompileContext) -> Fn:
        end = None if self.end_value is None else group_column(ctx, self.end_value, "end_value")
        return _exponential_decay(
            group_column(ctx, self.init_value, "init_value"),
            self.transition_steps,
            self.decay_rate,
            self.transition_begin,
            self.staircase,
            end,
        )


class OptaxCosineDecaySchedule(_OptaxNode):
    """``optax.cosine_decay_schedule``: to ``alpha * init_value`` in ``decay_steps``, then flat."""

    type: Literal["optax.cosine_decay_schedule"]
    init_value: GroupFloat | None = None
    decay_steps: PositiveSteps
    alpha: float = 0.0
    exponent: Annotated[float, Field(ge=0)] = 1.0

    def fn(self, ctx: CompileContext) -> Fn:
        init = group_column(ctx, self.init_value, "init_value")
        return _cosine_decay(init, self.decay_steps, self.alpha, self.exponent)


class _OneCycle(_OptaxNode):
    transition_steps: PositiveSteps
    peak_value: GroupFloat | None = None
    pct_start: Annotated[float, Field(ge=0, le=1)] = 0.3
    div_factor: Annotated[float, Field(gt=0)] = 25.0
    final_div_factor: Annotated[float, Field(gt=0)] = 1e4


class OptaxCosineOnecycleSchedule(_OneCycle):
    """``optax.cosine_onecycle_schedule``: peak at ``int(pct_start * T)``, minimum at ``T``."""

    type: Literal["optax.cosine_onecycle_schedule"]

    def fn(self, ctx: CompileContext) -> Fn:
        peak = group_column(ctx, self.peak_value, "peak_value")
        t = self.transition_steps
        scales = {
            int(self.pct_start * t): self.div_factor,
            int(t): 1.0 / (self.div_factor * self.final_div_factor),
        }
        return _piecewise_interpolate("cosine", peak / self.div_factor, scales)


class OptaxLinearOnecycleSchedule(_OneCycle):
    """``optax.linear_onecycle_schedule``: three linear phases (up, back down, to the minimum)."""

    type: Literal["optax.linear_onecycle_schedule"]
    pct_final: Annotated[float, Field(ge=0, le=1)] = 0.85

    def fn(self, ctx: CompileContext) -> Fn:
        peak = group_column(ctx, self.peak_value, "peak_value")
        t = self.transition_steps
        scales = {
            int(self.pct_start * t): self.div_factor,
            int(self.pct_final * t): 1.0 / self.div_factor,
            t: 1.0 / self.final_div_factor,
        }
        return _piecewise_interpolate("linear", peak / self.div_factor, scales)


class OptaxWarmupConstantSchedule(_OptaxNode):
    """``optax.warmup_constant_schedule``: linear warmup to ``peak_value``, then flat."""

    type: Literal["optax.warmup_constant_schedule"]
    init_value: GroupFloat
    peak_value: GroupFloat | None = None
    warmup_steps: SignedSteps

    def fn(self, ctx: CompileContext) -> Fn:
        return _polynomial(
            group_column(ctx, self.init_value, "init_value"),
            group_column(ctx, self.peak_value, "peak_value"),
            1,
            self.warmup_steps,
            0,
        )


class OptaxWarmupCosineDecayKwargs(BaseModel):
    """The arguments of ``optax.warmup_cosine_decay_schedule`` (also one ``sgdr`` segment)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    init_value: GroupFloat
    peak_value: GroupFloat | None = None
    warmup_steps: StepCount
    decay_steps: StepCount
    end_value: GroupFloat = 0.0
    exponent: Annotated[float, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _decay_after_warmup(self) -> OptaxWarmupCosineDecayKwargs:
        if not self.decay_steps > self.warmup_steps:
            # optax's cosine_decay_schedule raises for decay_steps - warmup_steps <= 0.
            raise ValueError("decay_steps (which includes the warmup) must exceed warmup_steps")
        return self

    def build(self, ctx: CompileContext) -> Curve:
        return _warmup_cosine(
            ctx,
            group_column(ctx, self.init_value, "init_value"),
            group_column(ctx, self.peak_value, "peak_value"),
            self.warmup_steps,
            self.decay_steps,
            group_column(ctx, self.end_value, "end_value"),
            self.exponent,
        )


class OptaxWarmupCosineDecaySchedule(_OptaxNode, OptaxWarmupCosineDecayKwargs):
    """``optax.warmup_cosine_decay_schedule``: ``decay_steps`` includes the warmup.

    The cosine ends at ``end_value`` through ``alpha = end_value / peak_value`` (0 when the
    peak is 0), as in optax.
    """

    type: Literal["optax.warmup_cosine_decay_schedule"]

    def compile(self, ctx: CompileContext) -> Curve:
        return self.build(ctx)


class OptaxWarmupExponentialDecaySchedule(_OptaxNode):
    """``optax.warmup_exponential_decay_schedule``: linear warmup, then ``exponential_decay``."""

    type: Literal["optax.warmup_exponential_decay_schedule"]
    init_value: GroupFloat
    peak_value: GroupFloat | None = None
    warmup_steps: StepCount
    transition_steps: SignedSteps
    decay_rate: Annotated[float, Field(ge=0)]
    transition_begin: SignedSteps = 0
    staircase: bool = False
    end_value: GroupFloat | None = None

    def compile(self, ctx: CompileContext) -> Curve:
        peak = group_column(ctx, self.peak_value, "peak_value")
        end = None if self.end_value is None else group_column(ctx, self.end_value, "end_value")
        return _join(
            ctx,
            [
                _polynomial(
                    group_column(ctx, self.init_value, "init_value"), peak, 1, self.warmup_steps, 0
                ),
                _exponential_decay(
                    peak,
                    self.transition_steps,
                    self.decay_rate,
                    self.transition_begin,
                    self.staircase,
                    end,
                ),
            ],
            [self.warmup_steps],
        )


class OptaxSgdrSchedule(_OptaxNode):
    """``optax.sgdr_schedule``: ``warmup_cosine_decay_schedule`` segments back to back.

    Each segment lasts its own ``decay_steps`` (its warmup included).
    """

    type: Literal["optax.sgdr_schedule"]
    cosine_kwargs: Annotated[
        list[OptaxWarmupCosineDecayKwargs], Field(min_length=1, max_length=4096)
    ]

    @model_validator(mode="after")
    def _horizon(self) -> OptaxSgdrSchedule:
        if sum(k.decay_steps for k in self.cosine_kwargs) > MAX_STEP:
            raise ValueError(f"the segments' decay_steps add up to more than {MAX_STEP}")
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        curves: list[Curve] = []
        boundaries: list[int] = []
        step = 0
        for i, kw in enumerate(self.cosine_kwargs):
            curves.append(kw.build(ctx.child("cosine_kwargs", i)))
            step += kw.decay_steps
            boundaries.append(step)
        return Piecewise(ctx.base, curves, boundaries[:-1])


class OptaxJoinSchedules(_OptaxNode):
    """``optax.join_schedules``: child ``i`` from ``boundaries[i - 1]`` on, in its own time.

    ``boundaries`` must be non-decreasing (optax does not check; out of order, a later
    schedule silently overrides an earlier one).
    """

    type: Literal["optax.join_schedules"]
    schedules: Annotated[list[AnySchedule], Field(min_length=1, max_length=1024)]
    boundaries: list[StepCount]

    @model_validator(mode="after")
    def _boundaries(self) -> OptaxJoinSchedules:
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError("boundaries needs exactly one entry fewer than schedules")
        if any(a > b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ValueError("boundaries must be in non-decreasing order")
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        starts = [0, *self.boundaries]
        ends: list[int | None] = [*self.boundaries, None]
        curves = []
        for i, child in enumerate(self.schedules):
            end = ends[i]
            child_ctx = ctx.child(
                "schedules",
                i,
                step_offset=ctx.step_offset + starts[i],
                active_from=max(ctx.active_from, ctx.step_offset + starts[i]),
                active_until=ctx.active_until if end is None else ctx.step_offset + end,
            )
            if not isinstance(child, ScheduleNode):
                raise SpecError(child_ctx.loc, "is not a schedule")
            curves.append(child.compile(child_ctx))
        return Piecewise(ctx.base, curves, list(self.boundaries))


NODES: tuple[type[ScheduleNode], ...] = (
    OptaxConstantSchedule,
    OptaxPolynomialSchedule,
    OptaxLinearSchedule,
    OptaxPiecewiseConstantSchedule,
    OptaxPiecewiseInterpolateSchedule,
    OptaxExponentialDecay,
    OptaxCosineDecaySchedule,
    OptaxCosineOnecycleSchedule,
    OptaxLinearOnecycleSchedule,
    OptaxWarmupConstantSchedule,
    OptaxWarmupCosineDecaySchedule,
    OptaxWarmupExponentialDecaySchedule,
    OptaxSgdrSchedule,
    OptaxJoinSchedules,
)
