"""Hugging Face transformers' schedules (``transformers.optimization``), by function name.

Every transformers schedule here is a ``LambdaLR``: group ``g`` gets ``base_g * λ(t)``,
so each node compiles to that product with the group's own base lr. The value for step
``N`` is ``base * λ(N)``, transformers' own index (the ``Trainer`` steps once per
optimizer update, so ``N`` counts updates; warmups start at ``λ(0) = 0``).

The ``SchedulerType`` names map to these types (one name per schedule):
``constant`` → ``get_constant_schedule``, ``constant_with_warmup`` →
``get_constant_schedule_with_warmup``, ``linear`` → ``get_linear_schedule_with_warmup``,
``cosine`` → ``get_cosine_schedule_with_warmup``, ``cosine_with_restarts`` →
``get_cosine_with_hard_restarts_schedule_with_warmup``, ``polynomial`` →
``get_polynomial_decay_schedule_with_warmup``, ``inverse_sqrt`` →
``get_inverse_sqrt_schedule``, ``cosine_with_min_lr`` →
``get_cosine_with_min_lr_schedule_with_warmup``, ``cosine_warmup_with_min_lr`` →
``get_cosine_with_min_lr_schedule_with_warmup_lr_rate``, ``warmup_stable_decay`` →
``get_wsd_schedule``. (``reduce_lr_on_plateau`` and ``greedy`` are metric-driven.)

``optimizer.defaults['lr']``: the polynomial and min-lr schedules divide by it. A run has
no optimizer defaults, so those nodes take an optional ``lr_init`` (lrserve's extension):
given, it is used for every group exactly as transformers uses ``defaults['lr']``;
omitted, each group uses its own base lr, which is what transformers does for a
single-group optimizer (and for every group whose lr equals the default).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from ._libs import FnCurve, StepCount, group_column
from .base import CompileContext, Curve, Matrix, ScheduleNode, SpecError, Steps


def _warmup(t: Steps, num_warmup_steps: int) -> Steps:
    # transformers: float(current_step) / float(max(1, num_warmup_steps))
    return t / float(max(1, num_warmup_steps))


def _cosine_factor(progress: Steps, num_cycles: float) -> Steps:
    # Same operation order as transformers (math.pi * num_cycles * 2.0 * progress) so the
    # rounding matches: near the end of the decay 1 + cos(...) cancels.
    return 0.5 * (1.0 + np.cos(math.pi * float(num_cycles) * 2.0 * progress))


class _LambdaNode(ScheduleNode):
    """A transformers schedule: ``LambdaLR`` with a fixed ``λ``, per-group base lr."""

    library: ClassVar[str] = "transformers"

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        """``λ(t)``: a row ``(len(t),)`` or, for nodes that need ``lr_init``, ``(G, len(t))``."""
        raise NotImplementedError

    def _lr_init(self, ctx: CompileContext) -> Matrix:
        return group_column(ctx, getattr(self, "lr_init", None), "lr_init")

    def check(self, ctx: CompileContext, lr_init: Matrix) -> None:
        """Raise ``SpecError`` for problems that depend on the groups."""

    def compile(self, ctx: CompileContext) -> Curve:
        lr_init = self._lr_init(ctx)
        self.check(ctx, lr_init)
        base = ctx.base.lr.reshape(-1, 1)
        return FnCurve(ctx.n_groups, lambda t: base * self.factor(t, lr_init))


class TransformersConstantSchedule(_LambdaNode):
    """``get_constant_schedule(optimizer)``: the group's base lr throughout."""

    type: Literal["transformers.get_constant_schedule"]

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        return np.ones_like(t)


class ConstantScheduleWithWarmup(_LambdaNode):
    """``get_constant_schedule_with_warmup``: linear warmup from 0, then the base lr."""

    type: Literal["transformers.get_constant_schedule_with_warmup"]
    num_warmup_steps: StepCount

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        return np.where(t < self.num_warmup_steps, _warmup(t, self.num_warmup_steps), 1.0)


class LinearScheduleWithWarmup(_LambdaNode):
    """``get_linear_schedule_with_warmup``: warmup from 0, linear decay to 0 at T, then 0."""

    type: Literal["transformers.get_linear_schedule_with_warmup"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = self.num_warmup_steps, self.num_training_steps
        decay = np.maximum(0.0, (float(n) - t) / float(max(1, n - w)))
        return np.where(t < w, _warmup(t, w), decay)


class CosineScheduleWithWarmup(_LambdaNode):
    """``get_cosine_schedule_with_warmup``: warmup, then cosine; not clamped past T (it rises)."""

    type: Literal["transformers.get_cosine_schedule_with_warmup"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount
    num_cycles: float = 0.5

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = self.num_warmup_steps, self.num_training_steps
        progress = (t - float(w)) / float(max(1, n - w))
        decay = np.maximum(0.0, _cosine_factor(progress, self.num_cycles))
        return np.where(t < w, _warmup(t, w), decay)


class CosineWithHardRestartsScheduleWithWarmup(_LambdaNode):
    """``get_cosine_with_hard_restarts_schedule_with_warmup``: ``num_cycles`` cosines, 0 past T."""

    type: Literal["transformers.get_cosine_with_hard_restarts_schedule_with_warmup"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount
    num_cycles: Annotated[float, Field(ge=0)] = 1

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = self.num_warmup_steps, self.num_training_steps
        progress = (t - float(w)) / float(max(1, n - w))
        wave = np.maximum(
            0.0, 0.5 * (1.0 + np.cos(math.pi * np.mod(float(self.num_cycles) * progress, 1.0)))
        )
        decay = np.where(progress >= 1.0, 0.0, wave)
        return np.where(t < w, _warmup(t, w), decay)


class PolynomialDecayScheduleWithWarmup(_LambdaNode):
    """``get_polynomial_decay_schedule_with_warmup``: warmup, then polynomial decay to ``lr_end``.

    ``lr_end`` is absolute, relative to ``lr_init`` (transformers' ``optimizer.defaults['lr']``;
    here optional, default each group's own base lr, see the module docstring).
    """

    type: Literal["transformers.get_polynomial_decay_schedule_with_warmup"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount
    lr_end: float = 1e-7
    power: float = 1.0
    lr_init: float | list[float] | None = None

    @model_validator(mode="after")
    def _decay_length(self) -> PolynomialDecayScheduleWithWarmup:
        if self.num_training_steps == self.num_warmup_steps:
            # transformers divides by num_training_steps - num_warmup_steps at step T.
            raise ValueError("num_training_steps must differ from num_warmup_steps")
        return self

    def check(self, ctx: CompileContext, lr_init: Matrix) -> None:
        bad = [ctx.base.names[i] for i in np.flatnonzero(~(lr_init[:, 0] > self.lr_end))]
        if bad:
            field = "lr_init" if self.lr_init is not None else "lr_end"
            raise SpecError(
                (*ctx.loc, field),
                f"lr_end ({self.lr_end}) must be smaller than the initial lr of group(s) {bad} "
                "(transformers raises the same)",
            )

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = self.num_warmup_steps, self.num_training_steps
        lr_range = lr_init - self.lr_end
        pct_remaining = 1 - (t - w) / (n - w)
        decay = (lr_range * pct_remaining**self.power + self.lr_end) / lr_init
        past = self.lr_end / lr_init
        return np.where(t < w, _warmup(t, w), np.where(t > n, past, decay))


class InverseSqrtSchedule(_LambdaNode):
    """``get_inverse_sqrt_schedule``: warmup, then ``1/sqrt((t + timescale - W) / timescale)``."""

    type: Literal["transformers.get_inverse_sqrt_schedule"]
    num_warmup_steps: StepCount
    timescale: Annotated[int, Field(gt=0)] | None = None

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w = self.num_warmup_steps
        timescale = self.timescale if self.timescale is not None else (w or 10_000)
        shift = timescale - w
        decay = 1.0 / np.sqrt((t + shift) / timescale)
        return np.where(t < w, _warmup(t, w), decay)


class _MinLrMixin(_LambdaNode):
    min_lr: Annotated[float, Field(ge=0)] | None = None
    min_lr_rate: float | None = None
    lr_init: float | list[float] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> _MinLrMixin:
        if self.min_lr is not None and self.min_lr_rate is not None:
            raise ValueError("Only one of min_lr or min_lr_rate should be set")
        if self.min_lr is None and self.min_lr_rate is None:
            raise ValueError("One of min_lr or min_lr_rate should be set")
        return self

    def check(self, ctx: CompileContext, lr_init: Matrix) -> None:
        if self.min_lr is not None and not np.all(lr_init > 0):
            bad = [ctx.base.names[i] for i in np.flatnonzero(~(lr_init[:, 0] > 0))]
            raise SpecError(
                (*ctx.loc, "min_lr"),
                f"min_lr is divided by the initial lr, which is 0 for group(s) {bad}; "
                "give min_lr_rate instead",
            )

    def rate(self, lr_init: Matrix) -> Matrix | float:
        if self.min_lr is not None:
            return self.min_lr / lr_init
        assert self.min_lr_rate is not None
        return self.min_lr_rate


class CosineWithMinLrScheduleWithWarmup(_MinLrMixin):
    """``get_cosine_with_min_lr_schedule_with_warmup``: cosine to ``min_lr`` (or rate), not clamped.

    ``min_lr`` is converted to a rate with ``lr_init`` (default: each group's own base lr, so
    every group reaches ``min_lr`` itself; see the module docstring).
    """

    type: Literal["transformers.get_cosine_with_min_lr_schedule_with_warmup"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount
    num_cycles: float = 0.5

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = self.num_warmup_steps, self.num_training_steps
        rate = self.rate(lr_init)
        progress = (t - float(w)) / float(max(1, n - w))
        f = _cosine_factor(progress, self.num_cycles)
        decay = np.maximum(0, f * (1 - rate) + rate)
        return np.where(t < w, _warmup(t, w), decay)


class CosineWithMinLrScheduleWithWarmupLrRate(_MinLrMixin):
    """``get_cosine_with_min_lr_schedule_with_warmup_lr_rate``: warmup starts at ``1/W``.

    Warmup is ``(t + 1) / W`` (or ``warmup_lr_rate + (1 - warmup_lr_rate) t / (W - 1)``) and
    the decay is shifted one step earlier than the other cosines (minimum at ``T - 1``).
    """

    type: Literal["transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate"]
    num_warmup_steps: StepCount
    num_training_steps: StepCount
    num_cycles: float = 0.5
    warmup_lr_rate: float | None = None

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, n = float(self.num_warmup_steps), float(self.num_training_steps)
        rate = self.rate(lr_init)
        if self.warmup_lr_rate is None:
            warm = (t + 1.0) / max(1.0, w)
        else:
            wr = float(self.warmup_lr_rate)
            warm = wr + (1.0 - wr) * t / max(1, w - 1)
        progress = (t - w + 1.0) / max(1.0, n - w)
        f = 0.5 * (1.0 + np.cos(math.pi * self.num_cycles * 2.0 * progress))
        decay = np.maximum(0, f * (1 - rate) + rate)
        return np.where(t < w, warm, decay)


class WsdSchedule(_LambdaNode):
    """``get_wsd_schedule``: warmup–stable–decay, each phase rescaled to ``[min_lr_ratio, 1]``.

    Give ``num_training_steps`` or ``num_stable_steps``; with both, ``num_stable_steps`` wins
    (transformers warns). Past the decay the factor is ``min_lr_ratio``.
    """

    type: Literal["transformers.get_wsd_schedule"]
    num_warmup_steps: StepCount
    num_decay_steps: StepCount
    num_training_steps: StepCount | None = None
    num_stable_steps: StepCount | None = None
    warmup_type: Literal["linear", "cosine", "1-sqrt"] = "linear"
    decay_type: Literal["linear", "cosine", "1-sqrt"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0)] = 0
    num_cycles: float = 0.5

    @model_validator(mode="after")
    def _lengths(self) -> WsdSchedule:
        if self.num_training_steps is None and self.num_stable_steps is None:
            raise ValueError("Either num_training_steps or num_stable_steps must be specified.")
        return self

    def factor(self, t: Steps, lr_init: Matrix) -> Matrix:
        w, d = self.num_warmup_steps, self.num_decay_steps
        if self.num_stable_steps is not None:
            s = self.num_stable_steps
        else:
            assert self.num_training_steps is not None
            s = self.num_training_steps - w - d
        m = float(self.min_lr_ratio)
        p_w = t / float(max(1, w))
        if self.warmup_type == "linear":
            f_w = p_w
        elif self.warmup_type == "cosine":
            f_w = 0.5 * (1.0 - np.cos(math.pi * p_w))
        else:
            f_w = 1.0 - np.sqrt(1.0 - p_w)
        warm = np.maximum(0.0, f_w * (1.0 - m) + m)
        p_d = (t - w - s) / float(max(1, d))
        if self.decay_type == "linear":
            f_d = 1.0 - p_d
        elif self.decay_type == "cosine":
            f_d = 0.5 * (1.0 + np.cos(math.pi * float(self.num_cycles) * 2.0 * p_d))
        else:
            f_d = 1.0 - np.sqrt(p_d)
        decay = np.maximum(0.0, f_d * (1.0 - m) + m)
        return np.where(t < w, warm, np.where(t < w + s, 1.0, np.where(t < w + s + d, decay, m)))


NODES: tuple[type[ScheduleNode], ...] = (
    TransformersConstantSchedule,
    ConstantScheduleWithWarmup,
    LinearScheduleWithWarmup,
    CosineScheduleWithWarmup,
    CosineWithHardRestartsScheduleWithWarmup,
    PolynomialDecayScheduleWithWarmup,
    InverseSqrtSchedule,
    CosineWithMinLrScheduleWithWarmup,
    CosineWithMinLrScheduleWithWarmupLrRate,
    WsdSchedule,
)
