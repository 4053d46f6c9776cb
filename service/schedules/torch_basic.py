"""torch's time-driven schedulers: StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR,
PolynomialLR, CosineAnnealingLR, CosineAnnealingWarmRestarts.

torch computes all but CosineAnnealingWarmRestarts recursively (``lr_t = lr_{t-1} * ratio``,
see ``get_lr`` in torch/optim/lr_scheduler.py). Every curve here evaluates a closed form that
telescopes that recursion with the *same* floating-point sub-expressions torch uses (e.g.
``1 + cos(pi * t / T)``), so values agree to rounding (~1e-15 relative) rather than only
mathematically; ``chain_map`` gives torch's per-step ratio exactly, for ChainedScheduler.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from .base import (
    MAX_STEP,
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    NonNegInt,
    NonNegReal,
    PosInt,
    ProgramState,
    Real,
    ScheduleNode,
    Steps,
)


def _row(values: Matrix, n_groups: int) -> Matrix:
    return np.broadcast_to(values, (n_groups, values.shape[-1])).copy()


class _FactorCurve(Chainable):
    """A purely multiplicative torch scheduler: ``lr = base * F(t)``.

    Subclasses give ``_cumulative(t)`` (``F``: the product of torch's ratios from the
    constructor's initial step through ``t``) and ``_ratio(t)`` (torch's ``get_lr`` factor at
    integer ``t``, the initial step at ``t = 0``), both as ``(len(t),)`` arrays.
    """

    def __init__(self, ctx: CompileContext) -> None:
        self.n_groups = ctx.n_groups
        self.base = ctx.base.lr.reshape(-1, 1)

    def _cumulative(self, t: Steps) -> Steps:
        raise NotImplementedError

    def _ratio(self, t: Steps) -> Steps:
        raise NotImplementedError

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.base * self._cumulative(np.asarray(t, dtype=np.float64))[None, :]

    def mult_horizon(self) -> int:
        return MAX_STEP + 1

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return _row(self._cumulative(np.asarray(t, dtype=np.float64))[None, :], self.n_groups)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        a = _row(self._ratio(np.asarray(t, dtype=np.float64))[None, :], self.n_groups)
        return a, np.zeros_like(a)


# --------------------------------------------------------------------------------------------
# StepLR


class StepLR(ScheduleNode):
    """``torch.optim.lr_scheduler.StepLR``: multiply by ``gamma`` every ``step_size`` steps."""

    type: Literal["StepLR"]
    step_size: PosInt
    gamma: NonNegReal = 0.1

    def compile(self, ctx: CompileContext) -> Curve:
        return _StepCurve(ctx, self.step_size, self.gamma)


class _StepCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, step_size: int, gamma: float) -> None:
        super().__init__(ctx)
        self.step_size = step_size
        self.gamma = gamma

    def _cumulative(self, t: Steps) -> Steps:
        return np.power(self.gamma, np.floor_divide(t, self.step_size))

    def _ratio(self, t: Steps) -> Steps:
        hit = (t > 0) & (np.mod(t, self.step_size) == 0)
        return np.where(hit, self.gamma, 1.0)


# --------------------------------------------------------------------------------------------
# MultiStepLR


class MultiStepLR(ScheduleNode):
    """``torch.optim.lr_scheduler.MultiStepLR``: multiply by ``gamma`` at each milestone.

    A milestone listed twice multiplies twice (torch keeps a Counter); order does not matter.
    """

    type: Literal["MultiStepLR"]
    milestones: list[NonNegInt] = Field(max_length=100_000)
    gamma: NonNegReal = 0.1

    def compile(self, ctx: CompileContext) -> Curve:
        return _MultiStepCurve(ctx, self.milestones, self.gamma)


class _MultiStepCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, milestones: list[int], gamma: float) -> None:
        super().__init__(ctx)
        self.sorted = np.asarray(sorted(milestones), dtype=np.float64)
        counts = Counter(milestones)
        self.keys = np.asarray(sorted(counts), dtype=np.float64)
        # torch multiplies by gamma ** count once per distinct milestone.
        self.powers = np.asarray([gamma ** counts[k] for k in sorted(counts)], dtype=np.float64)
        self.gamma = gamma

    def _cumulative(self, t: Steps) -> Steps:
        return np.power(self.gamma, np.searchsorted(self.sorted, t, side="right"))

    def _ratio(self, t: Steps) -> Steps:
        if len(self.keys) == 0:
            return np.ones_like(t)
        idx = np.clip(np.searchsorted(self.keys, t), 0, len(self.keys) - 1)
        return np.where(self.keys[idx] == t, self.powers[idx], 1.0)


# --------------------------------------------------------------------------------------------
# ConstantLR


class ConstantLR(ScheduleNode):
    """``torch.optim.lr_scheduler.ConstantLR``: ``base * factor`` until ``total_iters``."""

    type: Literal["ConstantLR"]
    factor: NonNegReal = Field(default=1.0 / 3, le=1.0)
    total_iters: NonNegInt = 5

    @model_validator(mode="after")
    def _no_division_by_zero(self) -> ConstantLR:
        if self.factor == 0 and self.total_iters > 0:
            # torch accepts it but divides by the factor at t == total_iters
            # (ZeroDivisionError), so the schedule could never reach its end.
            raise ValueError(
                "factor must be > 0 when total_iters > 0 (torch divides by factor at "
                "t == total_iters)"
            )
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        return _ConstantCurve(ctx, self.factor, self.total_iters)


class _ConstantCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, factor: float, total_iters: int) -> None:
        super().__init__(ctx)
        self.f = factor
        self.total = total_iters

    def _cumulative(self, t: Steps) -> Steps:
        if self.total == 0:
            # torch: x factor at the initial step and t == 0 is never revisited, so the
            # factor stays for ever (the closed form would say 1).
            return np.full_like(t, self.f)
        return np.where(t < self.total, self.f, self.f * (1.0 / self.f))

    def _ratio(self, t: Steps) -> Steps:
        inv = 1.0 / self.f if self.f != 0 else 1.0
        return np.where(t == 0, self.f, np.where(t == self.total, inv, 1.0))

    def restart_lr(self, t: Steps, state: ProgramState) -> Matrix:
        # SequentialLR's restart uses the closed form (factor + (t >= T)(1 - factor)).
        closed = np.where(
            np.asarray(t) >= self.total, self.f + (1 - self.f), self.f + 0 * (1 - self.f)
        )
        return self.base * closed[None, :]


# --------------------------------------------------------------------------------------------
# LinearLR


class LinearLR(ScheduleNode):
    """``torch.optim.lr_scheduler.LinearLR``: factor from ``start_factor`` to ``end_factor``."""

    type: Literal["LinearLR"]
    start_factor: Real = Field(default=1.0 / 3, gt=0.0, le=1.0)
    end_factor: Real = Field(default=1.0, ge=0.0, le=1.0)
    total_iters: NonNegInt = 5

    def compile(self, ctx: CompileContext) -> Curve:
        return _LinearCurve(ctx, self.start_factor, self.end_factor, self.total_iters)


class _LinearCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, start: float, end: float, total: int) -> None:
        super().__init__(ctx)
        self.s = start
        self.e = end
        self.total = total

    def _cumulative(self, t: Steps) -> Steps:
        if self.total == 0:
            return np.full_like(t, self.s)
        # torch's ratios telescope to the closed form s + (e - s) t / T. The last ratio
        # (t = T) can cancel catastrophically (end_factor = 0 leaves rounding noise of either
        # sign), so the value from T on is torch's own product: F(T - 1) * ratio(T).
        tt = np.minimum(t, self.total - 1)
        closed = self.s + (self.e - self.s) * tt / self.total
        last = self._ratio(np.asarray([float(self.total)]))[0]
        return np.where(t >= self.total, closed * last, closed)

    def _ratio(self, t: Steps) -> Steps:
        d = self.e - self.s
        with np.errstate(divide="ignore", invalid="ignore"):
            r = 1.0 + d / (self.total * self.s + (t - 1) * d)
        return np.where(t == 0, self.s, np.where(t > self.total, 1.0, r))


# --------------------------------------------------------------------------------------------
# ExponentialLR


class ExponentialLR(ScheduleNode):
    """``torch.optim.lr_scheduler.ExponentialLR``: multiply by ``gamma`` every step."""

    type: Literal["ExponentialLR"]
    gamma: NonNegReal

    def compile(self, ctx: CompileContext) -> Curve:
        return _ExponentialCurve(ctx, self.gamma)


class _ExponentialCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, gamma: float) -> None:
        super().__init__(ctx)
        self.gamma = gamma

    def _cumulative(self, t: Steps) -> Steps:
        return np.power(self.gamma, t)

    def _ratio(self, t: Steps) -> Steps:
        return np.where(t == 0, 1.0, self.gamma)


# --------------------------------------------------------------------------------------------
# PolynomialLR


class PolynomialLR(ScheduleNode):
    """``torch.optim.lr_scheduler.PolynomialLR``: ``base * (1 - t/total_iters) ** power``."""

    type: Literal["PolynomialLR"]
    total_iters: NonNegInt = 5
    power: NonNegReal = 1.0

    def compile(self, ctx: CompileContext) -> Curve:
        return _PolynomialCurve(ctx, self.total_iters, self.power)


class _PolynomialCurve(_FactorCurve):
    def __init__(self, ctx: CompileContext, total: int, power: float) -> None:
        super().__init__(ctx)
        self.total = total
        self.power = power

    def _cumulative(self, t: Steps) -> Steps:
        if self.total == 0:
            return np.ones_like(t)
        return np.power(1.0 - np.minimum(t, self.total) / self.total, self.power)

    def _ratio(self, t: Steps) -> Steps:
        if self.total == 0:
            return np.ones_like(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.power((1.0 - t / self.total) / (1.0 - (t - 1) / self.total), self.power)
        return np.where((t == 0) | (t > self.total), 1.0, r)


# --------------------------------------------------------------------------------------------
# CosineAnnealingLR


class CosineAnnealingLR(ScheduleNode):
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` (periodic past ``T_max``, like torch)."""

    type: Literal["CosineAnnealingLR"]
    T_max: PosInt
    eta_min: NonNegReal = 0.0

    def compile(self, ctx: CompileContext) -> Curve:
        return _CosineCurve(ctx, self.T_max, self.eta_min)


class _CosineCurve(Chainable):
    """torch's recursion: ``eta + (lr - eta) * n_t / n_{t-1}`` with ``n_t = 1 + cos(pi t / T)``.

    It telescopes to ``eta + (base - eta) * n_t / 2`` up to ``T_max``. At ``t = T_max + 1``
    (mod ``2 T_max``) torch takes a special branch, ``lr + (base - eta)(1 - cos(pi / T)) / 2``,
    whose rounding differs from the closed form by up to ~1e-10 relative for large ``T_max``;
    after it the ratios telescope again from that anchor. Reproducing the anchors keeps every
    value within rounding of torch's.
    """

    def __init__(self, ctx: CompileContext, t_max: int, eta_min: float) -> None:
        self.n_groups = ctx.n_groups
        self.base = ctx.base.lr.reshape(-1, 1)
        self.T = t_max
        self.eta = eta_min
        self.bump = (self.base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2

    def _n(self, t: Steps) -> Steps:
        return 1 + np.cos(np.pi * t / self.T)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        first = (self.base - self.eta) * (self._n(t) / 2)[None, :]
        later = t > self.T
        if not later.any():
            # In place: at 256 groups x 4,096 steps a second array is 8 MB more to fill. (With
            # eta 0 not at all: adding +0.0 to these values, never -0.0, changes no bit.)
            if self.eta:
                first += self.eta
            return first
        anchor = (
            self.T + 1 + 2 * self.T * np.floor_divide(np.maximum(t - self.T - 1, 0), 2 * self.T)
        )
        # The anchor value is eta (exact: n is 0 at odd multiples of T) plus the bump.
        anchor_lr = self.eta + self.bump
        with np.errstate(divide="ignore", invalid="ignore"):
            rest = (anchor_lr - self.eta) * (self._n(t) / self._n(anchor))[None, :]
        out = np.where(later[None, :], rest, first)
        out += self.eta
        return out

    def mult_horizon(self) -> int:
        return self.T + 1 if self.eta == 0 else 0

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return _row((self._n(np.asarray(t, dtype=np.float64)) / 2)[None, :], self.n_groups)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self._n(t) / self._n(t - 1)
        special = np.mod(t - 1 - self.T, 2 * self.T) == 0
        initial = t == 0
        a = np.where(initial | special, 1.0, ratio)
        a = _row(a[None, :], self.n_groups)
        b = np.where(special[None, :], self.bump, self.eta * (1 - a))
        b = np.where(initial[None, :], 0.0, b)
        return a, b


# --------------------------------------------------------------------------------------------
# CosineAnnealingWarmRestarts


class CosineAnnealingWarmRestarts(ScheduleNode):
    """``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` (absolute, accepts fractional
    epochs inside an ``Epochs`` wrapper with ``fractional: true``)."""

    type: Literal["CosineAnnealingWarmRestarts"]
    T_0: PosInt
    T_mult: PosInt = 1
    eta_min: NonNegReal = 0.0

    def compile(self, ctx: CompileContext) -> Curve:
        fractional = bool(ctx.extra.get("fractional_epochs", False))
        return _WarmRestartsCurve(ctx, self.T_0, self.T_mult, self.eta_min, fractional)


class _WarmRestartsCurve(Curve):
    def __init__(
        self, ctx: CompileContext, t0: int, t_mult: int, eta_min: float, fractional: bool
    ) -> None:
        self.n_groups = ctx.n_groups
        # Driven by step(epoch) (inside a fractional Epochs wrapper): torch's float formula,
        # even at whole epochs, where its log can land just below a restart (at epoch 121
        # with T_0=1, T_mult=3 torch gives eta_min, not the restart value).
        self.fractional = fractional
        self.base = ctx.base.lr.reshape(-1, 1)
        self.T0 = t0
        self.mult = t_mult
        self.eta = eta_min
        # Restart steps S_k = T0 (mult^k - 1) / (mult - 1), k >= 1, up to past MAX_STEP:
        # integers, so stepping through them is exact (torch's integer T_cur/T_i bookkeeping).
        starts = [0]
        length = t0
        while starts[-1] <= MAX_STEP:
            starts.append(starts[-1] + length)
            length *= t_mult
            if t_mult == 1:
                break
        self.starts = starts

    def _cycle(self, t: Steps) -> tuple[Steps, Steps]:
        """``(T_cur, T_i)`` as torch's ``step()`` / ``step(epoch)`` computes them."""
        if self.mult == 1:
            return np.mod(t, self.T0), np.full_like(t, float(self.T0))
        if not self.fractional:
            k = np.searchsorted(np.asarray(self.starts, dtype=np.float64), t, side="right") - 1
            start = np.asarray(self.starts, dtype=np.float64)[k]
            return t - start, self.T0 * np.power(float(self.mult), k)
        # Fractional epochs: torch's step(epoch) formula, float log included.
        x = t / self.T0 * (self.mult - 1) + 1
        n = np.floor(np.log(x) / math.log(self.mult))
        # np.log may differ from math.log by an ulp; redo the near-integer cases exactly
        # like torch (int(math.log(x, mult))) so the cycle index matches.
        near = np.abs(np.log(x) / math.log(self.mult) - np.rint(np.log(x) / math.log(self.mult)))
        for i in np.nonzero(near < 1e-9)[0]:
            n[i] = int(math.log(float(x[i]), self.mult))
        n = np.where(t >= self.T0, n, 0)
        t_i = self.T0 * np.power(float(self.mult), n)
        t_cur = np.where(
            t >= self.T0, t - self.T0 * (np.power(float(self.mult), n) - 1) / (self.mult - 1), t
        )
        return t_cur, t_i

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        t_cur, t_i = self._cycle(t)
        return self.eta + (self.base - self.eta) * ((1 + np.cos(np.pi * t_cur / t_i)) / 2)[None, :]


NODES: tuple[type[ScheduleNode], ...] = (
    StepLR,
    MultiStepLR,
    ConstantLR,
    LinearLR,
    ExponentialLR,
    PolynomialLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
)

__all__ = [
    "NODES",
    "ConstantLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ExponentialLR",
    "LinearLR",
    "MultiStepLR",
    "PolynomialLR",
    "StepLR",
]
