"""torch's ``torch.optim.swa_utils.SWALR``: anneal each group's lr to ``swa_lr``, then hold it.

torch's ``get_lr`` is recursive on the group's current lr: at its ``k``-th step (``k`` counts
``step()`` calls, the constructor's included, from 0; never ``last_epoch``) it rebuilds the
lr it started from, ``(lr - alpha(k-1) * swa_lr) / (1 - alpha(k-1))``, and returns
``swa_lr * alpha(k) + start * (1 - alpha(k))`` with ``alpha(k) = f(clip(k / E, 0, 1))``,
``f = (1 - cos(pi x)) / 2`` (``"cos"``) or ``x`` (``"linear"``), ``E = anneal_epochs``
(``E = 0``: ``k`` counts from 1, so the constructor already sets ``swa_lr``).

- Standalone (or first in a SequentialLR) it starts from the group's base ``b``: ``lr(k) =
  swa_lr * alpha(k) + b * (1 - alpha(k))``, the recursion telescoped (torch's rebuilt start
  drifts from ``b`` by rounding only), exactly ``swa_lr`` from ``k = E`` on.
- SequentialLR restarts it at a milestone with ``_update_lr(0)``, which does not advance its
  step count (still 1 from its constructor): the lr is left as the previous child ended it
  (``E = 0``: set to ``swa_lr``), and it anneals from there (``restart_map`` + ``chain_map``).
- In a ChainedScheduler it rebuilds its start from whatever lr the chain hands it: the
  affine ``chain_map`` below.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from .base import (
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    NonNegInt,
    NonNegReal,
    ProgramState,
    ScheduleNode,
    SpecError,
    Steps,
    non_empty_per_group,
)


class SWALRCurve(Chainable):
    """Recursive in torch (its start is rebuilt from the current lr): a :class:`Chainable`."""

    def __init__(self, base: np.ndarray, swa_lr: Matrix, anneal_epochs: int, strategy: str) -> None:
        self.n_groups = len(base)
        self.base = np.asarray(base, dtype=np.float64).reshape(-1, 1)
        self.swa_lr = swa_lr
        self.epochs = anneal_epochs
        self.cos = strategy == "cos"

    def _alpha(self, k: Steps) -> Steps:
        # torch: t = max(0, min(1, k / max(1, E))); alpha = (1 - cos(pi t)) / 2 or t.
        x = np.clip(k / max(1, self.epochs), 0.0, 1.0)
        return (1 - np.cos(np.pi * x)) / 2 if self.cos else x

    def _step(self, t: Steps) -> Steps:
        k = np.asarray(t, dtype=np.float64)
        return np.maximum(k, 1.0) if self.epochs == 0 else k

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        alpha = self._alpha(self._step(t))[None, :]
        with np.errstate(invalid="ignore"):
            return self.swa_lr * alpha + self.base * (1 - alpha)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        # lr -> swa * a + (1 - a) (lr - a_prev swa) / (1 - a_prev): A = (1 - a) / (1 - a_prev),
        # B = swa (a - a_prev) / (1 - a_prev) (both >= 0: no cancellation); a = 1: A = 0, B = swa.
        k = self._step(t)
        alpha, prev = self._alpha(k), self._alpha(k - 1)
        done = alpha == 1.0
        keep = np.where(done, 1.0, 1 - prev)
        a = np.where(done, 0.0, (1 - alpha) / keep)[None, :]
        b = self.swa_lr * np.where(done, 1.0, (alpha - prev) / keep)[None, :]
        return np.broadcast_to(a, b.shape).copy(), b

    def restart_map(self, state: ProgramState) -> tuple[Matrix, Matrix] | None:
        # SequentialLR's _update_lr(0) runs get_lr at SWALR's step 0 (its count is not
        # advanced): the lr the previous child left is kept (E = 0: swa_lr).
        return self.chain_map(np.zeros(1), state)


class SWALR(ScheduleNode):
    """``torch.optim.swa_utils.SWALR``: anneal to ``swa_lr`` over ``anneal_epochs`` steps."""

    type: Literal["SWALR"]
    swa_lr: NonNegReal | list[NonNegReal]
    """The rate annealed to: one number, or one per parameter group."""
    anneal_epochs: NonNegInt = 10
    anneal_strategy: Literal["cos", "linear"] = Field(default="cos")

    @field_validator("swa_lr")
    @classmethod
    def _non_empty(cls, value: float | list[float]) -> float | list[float]:
        return non_empty_per_group(value)

    def compile(self, ctx: CompileContext) -> Curve:
        if ctx.extra.get("fractional_epochs", False):
            raise SpecError(
                ctx.loc,
                "SWALR cannot take fractional epochs: torch's SWALR.step(epoch) ignores the "
                "epoch and anneals once per call; use fractional: false",
            )
        swa_lr = ctx.per_group(self.swa_lr, "swa_lr")
        return SWALRCurve(ctx.base.lr, swa_lr, self.anneal_epochs, self.anneal_strategy)


NODES: tuple[type[ScheduleNode], ...] = (SWALR,)

__all__ = ["NODES", "SWALR", "SWALRCurve"]
