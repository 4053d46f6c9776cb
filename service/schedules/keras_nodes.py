"""Keras 3's learning-rate schedules (``keras.optimizers.schedules``), by class name.

Keras evaluates ``schedule(optimizer.iterations)``, the number of updates already applied,
so the value for step ``N`` is ``schedule(N)``. Arguments are the classes' constructor
arguments (their ``get_config()`` keys, less ``name``). A Keras optimizer has a single
learning rate, so values are absolute; ``initial_learning_rate`` is optional here and
defaults to each group's own base lr, and every value argument (``initial_learning_rate``,
``end_learning_rate``, ``warmup_target``, each entry of ``values``) also takes a list with
one number per group. Values are computed in float64 (Keras computes in the dtype of
``initial_learning_rate``, usually float32).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from ._libs import FnCurve, GroupFloat, StepCount, floor_log_ratio, group_column
from .base import MAX_STEP, CompileContext, Curve, Matrix, ScheduleNode, Steps

DecaySteps = Annotated[float, Field(gt=0, le=MAX_STEP)]
"""Keras casts ``decay_steps`` to the learning rate's float dtype, so it may be fractional."""


class _KerasNode(ScheduleNode):
    library: ClassVar[str] = "keras"

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        raise NotImplementedError

    def compile(self, ctx: CompileContext) -> Curve:
        lr0 = group_column(
            ctx, getattr(self, "initial_learning_rate", None), "initial_learning_rate"
        )
        return FnCurve(ctx.n_groups, lambda t: self.evaluate(t, lr0, ctx))


class _WithInitial(_KerasNode):
    initial_learning_rate: GroupFloat | None = None


class KerasExponentialDecay(_WithInitial):
    """``ExponentialDecay``: ``lr0 * decay_rate ** (t / decay_steps)`` (floored if staircase)."""

    type: Literal["keras.ExponentialDecay"]
    decay_steps: DecaySteps
    decay_rate: Annotated[float, Field(ge=0)]
    staircase: bool = False

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        p = t / self.decay_steps
        if self.staircase:
            p = np.floor(p)
        return lr0 * np.power(self.decay_rate, p)


class KerasPiecewiseConstantDecay(_KerasNode):
    """``PiecewiseConstantDecay``: ``values[i]`` for ``boundaries[i-1] < t <= boundaries[i]``.

    The change lands one step *after* each boundary (``t > b``), unlike torch and optax.
    There is no ``initial_learning_rate`` (Keras has none either).
    """

    type: Literal["keras.PiecewiseConstantDecay"]
    boundaries: Annotated[list[StepCount], Field(min_length=1, max_length=10_000)]
    values: Annotated[list[GroupFloat], Field(min_length=2)]

    @model_validator(mode="after")
    def _lengths(self) -> KerasPiecewiseConstantDecay:
        if len(self.boundaries) != len(self.values) - 1:
            raise ValueError("The length of boundaries should be 1 less than the length of values")
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ValueError("boundaries must be strictly increasing")
        return self

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        cols = [ctx.per_group(v, f"values.{i}") for i, v in enumerate(self.values)]
        index = np.searchsorted(np.asarray(self.boundaries, dtype=np.float64), t, side="left")
        return np.concatenate(cols, axis=1)[:, index]


class KerasPolynomialDecay(_WithInitial):
    """``PolynomialDecay``: to ``end_learning_rate`` over ``decay_steps``; ``cycle`` stretches it.

    With ``cycle`` the horizon becomes the first multiple of ``decay_steps`` not below ``t``
    (it does not restart from the initial rate).
    """

    type: Literal["keras.PolynomialDecay"]
    decay_steps: DecaySteps
    end_learning_rate: GroupFloat = 0.0001
    power: Annotated[float, Field(ge=0)] = 1.0
    cycle: bool = False

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        end = ctx.per_group(self.end_learning_rate, "end_learning_rate")
        ds = float(self.decay_steps)
        if self.cycle:
            multiplier = np.where(t == 0, 1.0, np.ceil(t / ds))
            steps, horizon = t, ds * multiplier
        else:
            steps, horizon = np.minimum(t, ds), np.full_like(t, ds)
        p = steps / horizon
        return (lr0 - end) * np.power(1 - p, self.power) + end


class KerasInverseTimeDecay(_WithInitial):
    """``InverseTimeDecay``: ``lr0 / (1 + decay_rate * t / decay_steps)`` (floored if staircase)."""

    type: Literal["keras.InverseTimeDecay"]
    decay_steps: DecaySteps
    decay_rate: Annotated[float, Field(ge=0)]
    staircase: bool = False

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        p = t / self.decay_steps
        if self.staircase:
            p = np.floor(p)
        return lr0 / (1 + self.decay_rate * p)


class KerasCosineDecay(_WithInitial):
    """``CosineDecay``: optional linear warmup to ``warmup_target``, then cosine to ``alpha``.

    Without ``warmup_target`` there is no warmup (``warmup_steps`` is ignored, as in Keras).
    With it, the warmup goes from ``initial_learning_rate`` to ``warmup_target`` and the
    cosine then lasts ``decay_steps`` *after* the warmup; ``alpha`` is a fraction of the
    rate the cosine starts from.
    """

    type: Literal["keras.CosineDecay"]
    decay_steps: DecaySteps
    alpha: float = 0.0
    warmup_target: GroupFloat | None = None
    warmup_steps: Annotated[float, Field(ge=0, le=MAX_STEP)] = 0

    def _decay(self, step: Steps, start: Matrix) -> Matrix:
        fraction = step / self.decay_steps
        cosine = 0.5 * (1.0 + np.cos(math.pi * fraction))
        return start * ((1 - self.alpha) * cosine + self.alpha)

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        ds = float(self.decay_steps)
        if self.warmup_target is None:
            return self._decay(np.minimum(t, ds), lr0)
        target = ctx.per_group(self.warmup_target, "warmup_target")
        w = float(self.warmup_steps)
        step = np.minimum(t, ds + w)
        with np.errstate(divide="ignore", invalid="ignore"):
            warm = (target - lr0) * (step / w) + lr0
        return np.where(step < w, warm, self._decay(step - w, target))


class KerasCosineDecayRestarts(_WithInitial):
    """``CosineDecayRestarts`` (SGDR): cycle ``i`` lasts ``first_decay_steps * t_mul**i`` steps.

    Cycle ``i`` starts at ``m_mul**i`` times the initial rate; ``alpha`` is not scaled by
    ``m_mul``. ``t_mul`` must be at least 1 (below 1 the cycles run out and Keras gives NaN).
    """

    type: Literal["keras.CosineDecayRestarts"]
    first_decay_steps: DecaySteps
    t_mul: Annotated[float, Field(ge=1)] = 2.0
    m_mul: Annotated[float, Field(ge=0)] = 1.0
    alpha: float = 0.0

    def evaluate(self, t: Steps, lr0: Matrix, ctx: CompileContext) -> Matrix:
        fraction = t / self.first_decay_steps
        t_mul = self.t_mul
        if t_mul == 1.0:
            i = np.floor(fraction)
            fraction = fraction - i
        else:
            i = floor_log_ratio(1.0 - fraction * (1.0 - t_mul), t_mul)
            sum_r = (1.0 - np.power(t_mul, i)) / (1.0 - t_mul)
            fraction = (fraction - sum_r) / np.power(t_mul, i)
        m_fac = np.power(self.m_mul, i)
        cosine = 0.5 * m_fac * (1.0 + np.cos(math.pi * fraction))
        return lr0 * ((1 - self.alpha) * cosine + self.alpha)


NODES: tuple[type[ScheduleNode], ...] = (
    KerasExponentialDecay,
    KerasPiecewiseConstantDecay,
    KerasPolynomialDecay,
    KerasInverseTimeDecay,
    KerasCosineDecay,
    KerasCosineDecayRestarts,
)
