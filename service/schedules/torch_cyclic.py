"""torch's ``CyclicLR`` and ``OneCycleLR``, learning rate and momentum, as closed forms.

Both are absolute in torch (computed from their own endpoints every step, never from the
current lr), so they do not implement ``Chainable``: ``ChainedScheduler`` sees them through
``chainable()``'s absolute default (``A = 0, B = lr(t)``). Both *ignore the group's lr*:
CyclicLR starts from ``base_lr``, OneCycleLR from ``max_lr / div_factor``. Both cycle
momentum (written to ``momentum``, or to ``betas[0]`` for Adam-style groups) unless
``cycle_momentum`` is false; torch raises for an optimizer without momentum or betas, and so
do we, naming the group.

CyclicLR ``triangular2`` from cycle 1025 on: torch's ``1 / 2.0 ** (cycle - 1)`` raises
``OverflowError``; we return the limit (amplitude 0: ``lr = base_lr``, momentum
``max_momentum``), which is what the schedule has converged to long before.

The arithmetic repeats torch 2.13's ``get_lr`` operation for operation (same order, same
association) so that the values agree to the last few ulps.

Past the horizon (OneCycleLR): at ``t == total_steps`` torch extrapolates the last phase (cos
rises again; linear goes below the minimum and can turn negative) and we return the same. For
``t > total_steps`` torch raises ``ValueError("Tried to step ...")``; a service cannot raise into
a training loop, so we hold the schedule's final value, the one at ``t = total_steps - 1``
(``max_lr / div_factor / final_div_factor``, momentum ``max_momentum``), not the extrapolated
one. Where the last phase has zero length (``pct_start = 1``) torch divides by zero at
``t == total_steps``; there too we return the value at ``total_steps - 1``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from .base import (
    MAX_STEP,
    CompileContext,
    Curve,
    Matrix,
    ProgramState,
    ScheduleNode,
    SpecError,
    Steps,
    non_empty_per_group,
)
from .expr import Expr, ExprError, parse

GroupFloat = float | list[float]
PositiveSteps = Annotated[int, Field(gt=0, le=MAX_STEP)]


def _require_momentum(ctx: CompileContext, node: str) -> None:
    missing = [n for n, m in zip(ctx.base.names, ctx.base.momentum, strict=True) if np.isnan(m)]
    if missing:
        raise SpecError(
            (*ctx.loc, "cycle_momentum"),
            f"parameter group(s) {missing} have neither momentum nor betas, and torch's {node} "
            "refuses cycle_momentum for an optimizer without them; give those groups "
            "'momentum' or 'betas', or set cycle_momentum to false",
        )


class CyclicCurve(Curve):
    """torch's ``CyclicLR.get_lr`` vectorised over ``t``."""

    def __init__(
        self,
        base_lr: Matrix,
        max_lr: Matrix,
        total_size: float,
        step_ratio: float,
        scale: Expr | str,
        scale_mode: str,
        gamma: float,
        base_momentum: Matrix | None,
        max_momentum: Matrix | None,
    ) -> None:
        self.n_groups = base_lr.shape[0]
        self.base_lr = base_lr
        self.max_lr = max_lr
        self.total_size = total_size
        self.step_ratio = step_ratio
        self.scale = scale
        self.scale_mode = scale_mode
        self.gamma = gamma
        self.base_momentum = base_momentum
        self.max_momentum = max_momentum
        # torch's constructor sets lr = base_lr and then group.setdefault("initial_lr", lr):
        # schedulers constructed after it (and SequentialLR's reset) see base_lr as the base.
        self.initial_lr_effect: tuple[str, Matrix] = ("setdefault", base_lr[:, 0].copy())

    def _scale_fn(self, x: Steps) -> Steps:
        if isinstance(self.scale, Expr):
            return self.scale(x=x)
        if self.scale == "triangular":
            return np.ones_like(x)
        if self.scale == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return np.power(self.gamma, x)  # exp_range

    def _shape(self, t: Steps) -> tuple[Steps, Steps]:
        """``(scale_factor, scale_fn(cycle or t))`` per step, as torch computes them."""
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(all="ignore"):
            cycle = np.floor(1 + t / self.total_size)
            x = 1.0 + t / self.total_size - cycle
            scale_factor = np.where(
                x <= self.step_ratio, x / self.step_ratio, (x - 1) / (self.step_ratio - 1)
            )
            sf = self._scale_fn(cycle if self.scale_mode == "cycle" else t)
        return scale_factor, sf

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        scale_factor, sf = self._shape(t)
        with np.errstate(all="ignore"):
            base_height = (self.max_lr - self.base_lr) * scale_factor
            return self.base_lr + base_height * sf

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        if self.base_momentum is None or self.max_momentum is None:
            return None
        scale_factor, sf = self._shape(t)
        with np.errstate(all="ignore"):
            base_height = (self.max_momentum - self.base_momentum) * scale_factor
            return self.max_momentum - base_height * sf


class CyclicLR(ScheduleNode):
    """torch.optim.lr_scheduler.CyclicLR (per-batch cyclical lr and inverse momentum).

    ``scale_fn`` (lrserve extension of torch's callable) is a safe expression in ``x``; with it
    ``mode`` is ignored and ``scale_mode`` says whether ``x`` is the cycle number (from 1) or
    the step, exactly as in torch. Without it torch forces ``scale_mode`` to ``cycle`` for the
    triangular modes and to ``iterations`` for ``exp_range``, whatever was given.
    """

    type: Literal["CyclicLR"]
    base_lr: GroupFloat
    max_lr: GroupFloat
    step_size_up: float = Field(default=2000, gt=0, le=MAX_STEP)
    step_size_down: float | None = Field(default=None, ge=0, le=MAX_STEP)
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0
    scale_fn: str | None = None
    scale_mode: Literal["cycle", "iterations"] = "cycle"
    cycle_momentum: bool = True
    base_momentum: GroupFloat = 0.8
    max_momentum: GroupFloat = 0.9

    library: ClassVar[str] = "torch"

    @model_validator(mode="after")
    def _check_scale_fn(self) -> CyclicLR:
        if self.scale_fn is not None:
            first = 1.0 if self.scale_mode == "cycle" else 0.0
            try:
                parse(self.scale_fn, ("x",), check_at={"x": first}, what="scale_fn")
            except ExprError as exc:
                raise ValueError(f"scale_fn: {exc}") from None
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        up = float(self.step_size_up)
        down = float(self.step_size_down) if self.step_size_down is not None else up
        total_size = up + down
        step_ratio = up / total_size
        scale: Expr | str
        if self.scale_fn is not None:
            first = 1.0 if self.scale_mode == "cycle" else 0.0
            scale = parse(self.scale_fn, ("x",), check_at={"x": first}, what="scale_fn")
            scale_mode = self.scale_mode
        else:
            scale = self.mode
            scale_mode = "iterations" if self.mode == "exp_range" else "cycle"
        base_m = max_m = None
        if self.cycle_momentum:
            _require_momentum(ctx, "CyclicLR")
            base_m = ctx.per_group(self.base_momentum, "base_momentum")
            max_m = ctx.per_group(self.max_momentum, "max_momentum")
        return CyclicCurve(
            base_lr=ctx.per_group(self.base_lr, "base_lr"),
            max_lr=ctx.per_group(self.max_lr, "max_lr"),
            total_size=total_size,
            step_ratio=step_ratio,
            scale=scale,
            scale_mode=scale_mode,
            gamma=float(self.gamma),
            base_momentum=base_m,
            max_momentum=max_m,
        )


# One phase of OneCycleLR: (end_step, start_lr, end_lr, start_momentum, end_momentum), where
# the endpoint names are the param-group keys torch reads them from.
_Phase = tuple[float, str, str, str, str]


class OneCycleCurve(Curve):
    """torch's ``OneCycleLR.get_lr`` vectorised over ``t`` (see the module doc for t >= T)."""

    def __init__(
        self,
        endpoints: dict[str, Matrix],
        phases: list[_Phase],
        total_steps: int,
        anneal: str,
        cycle_momentum: bool,
    ) -> None:
        self.n_groups = endpoints["initial_lr"].shape[0]
        self.endpoints = endpoints
        self.phases = phases
        self.total_steps = total_steps
        self.anneal = anneal
        self.cycle_momentum = cycle_momentum
        # torch's constructor overwrites group["initial_lr"] = max_lr / div_factor, the base
        # every scheduler constructed after it (and SequentialLR's reset) then uses.
        self.initial_lr_effect: tuple[str, Matrix] = (
            "overwrite",
            endpoints["initial_lr"][:, 0].copy(),
        )
        # torch divides by zero at t == total_steps when the last phase has zero length.
        last_start = phases[-2][0] if len(phases) > 1 else 0.0
        self.last_defined = total_steps if phases[-1][0] != last_start else total_steps - 1

    def _anneal(self, start: Matrix, end: Matrix, pct: Steps) -> Matrix:
        if self.anneal == "cos":
            cos_out = np.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _values(self, t: Steps, which: int) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        step = np.where(t > self.last_defined, float(self.total_steps - 1), t)
        out = np.empty((self.n_groups, len(step)))
        todo = np.ones(len(step), dtype=bool)
        start_step = 0.0
        with np.errstate(all="ignore"):
            for i, phase in enumerate(self.phases):
                end_step = phase[0]
                last = i == len(self.phases) - 1
                sel = todo & ((step <= end_step) | last)
                if sel.any():
                    pct = (step[sel] - start_step) / (end_step - start_step)
                    start = self.endpoints[str(phase[1 + 2 * which])]
                    end = self.endpoints[str(phase[2 + 2 * which])]
                    out[:, sel] = self._anneal(start, end, pct)
                    todo &= ~sel
                start_step = end_step
        return out

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self._values(t, 0)

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        return self._values(t, 1) if self.cycle_momentum else None


class OneCycleLR(ScheduleNode):
    """torch.optim.lr_scheduler.OneCycleLR (per-batch one-cycle lr and inverse momentum)."""

    type: Literal["OneCycleLR"]
    max_lr: GroupFloat
    total_steps: PositiveSteps | None = None
    epochs: PositiveSteps | None = None
    steps_per_epoch: PositiveSteps | None = None
    pct_start: float = Field(default=0.3, ge=0.0, le=1.0)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: GroupFloat = 0.85
    max_momentum: GroupFloat = 0.95
    div_factor: float = Field(default=25.0, gt=0)
    final_div_factor: float = Field(default=1e4, gt=0)
    three_phase: bool = False

    library: ClassVar[str] = "torch"

    @field_validator("max_lr", "base_momentum", "max_momentum")
    @classmethod
    def _non_empty(cls, value: GroupFloat) -> GroupFloat:
        return non_empty_per_group(value)

    @model_validator(mode="after")
    def _check_horizon(self) -> OneCycleLR:
        steps = self.horizon
        if steps is None:
            raise ValueError("give total_steps, or both epochs and steps_per_epoch")
        if steps > MAX_STEP:
            raise ValueError(f"epochs * steps_per_epoch exceeds the largest step ({MAX_STEP})")
        if float(self.pct_start * steps) - 1 == 0.0:
            raise ValueError(
                "pct_start * total_steps is 1, so the warm-up phase has zero length and torch's "
                "OneCycleLR divides by zero at step 0; change pct_start or total_steps"
            )
        return self

    @property
    def horizon(self) -> int | None:
        """torch's ``total_steps`` (``total_steps`` wins over ``epochs * steps_per_epoch``)."""
        if self.total_steps is not None:
            return self.total_steps
        if self.epochs is not None and self.steps_per_epoch is not None:
            return self.epochs * self.steps_per_epoch
        return None

    def compile(self, ctx: CompileContext) -> Curve:
        total = self.horizon
        assert total is not None  # checked by the model validator
        pct = float(self.pct_start)
        phases: list[_Phase]
        if self.three_phase:
            phases = [
                (float(pct * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                (
                    float(2 * pct * total) - 2,
                    "max_lr",
                    "initial_lr",
                    "base_momentum",
                    "max_momentum",
                ),
                (float(total - 1), "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            phases = [
                (float(pct * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                (float(total - 1), "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]
        max_lr = ctx.per_group(self.max_lr, "max_lr")
        initial_lr = max_lr / self.div_factor
        endpoints: dict[str, npt.NDArray[np.float64]] = {
            "initial_lr": initial_lr,
            "max_lr": max_lr,
            "min_lr": initial_lr / self.final_div_factor,
        }
        if self.cycle_momentum:
            _require_momentum(ctx, "OneCycleLR")
            endpoints["max_momentum"] = ctx.per_group(self.max_momentum, "max_momentum")
            endpoints["base_momentum"] = ctx.per_group(self.base_momentum, "base_momentum")
        return OneCycleCurve(endpoints, phases, total, self.anneal_strategy, self.cycle_momentum)


NODES: tuple[type[ScheduleNode], ...] = (CyclicLR, OneCycleLR)

__all__ = ["NODES", "CyclicCurve", "CyclicLR", "OneCycleCurve", "OneCycleLR"]
