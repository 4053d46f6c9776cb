"""Helpers shared by the other libraries' schedule nodes (transformers, timm, optax, Keras).

Kept out of ``base.py`` because nothing torch-flavoured needs them: a curve defined by a
closed-form function of ``t``, argument types that accept a number or one number per
parameter group, and the one piece of arithmetic where numpy and CPython's ``math`` may
disagree by an ulp in a way that matters (the floor of a logarithm at a cycle boundary).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
from pydantic import Field

from .base import MAX_STEP, CompileContext, Curve, Matrix, ProgramState, Steps

StepCount = Annotated[int, Field(ge=0, le=MAX_STEP)]
"""A non-negative number of steps no larger than the engine's horizon."""
PositiveSteps = Annotated[int, Field(gt=0, le=MAX_STEP)]
SignedSteps = Annotated[int, Field(ge=-MAX_STEP, le=MAX_STEP)]
"""Libraries that accept a negative step count (and treat it as 0 or as "disabled")."""
GroupFloat = float | list[float]
"""A number shared by every group, or a list with one number per group (torch's rule)."""


class FnCurve(Curve):
    """A curve given by a closed-form, vectorised function of the local step ``t``.

    ``fn`` returns anything that broadcasts to ``(n_groups, len(t))``: per-group
    arguments are ``(G, 1)`` columns, shared ones scalars or ``(len(t),)`` rows.
    """

    def __init__(self, n_groups: int, fn: Callable[[Steps], Matrix]) -> None:
        self.n_groups = n_groups
        self._fn = fn

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            values = self._fn(t)
        return np.array(np.broadcast_to(values, (self.n_groups, t.shape[0])), dtype=np.float64)


def group_column(ctx: CompileContext, value: float | Sequence[float] | None, name: str) -> Matrix:
    """``value`` as a ``(G, 1)`` column; ``None`` means each group's own base lr."""
    if value is None:
        return ctx.base.lr.reshape(-1, 1).astype(np.float64)
    return ctx.per_group(value, name)


def floor_log_ratio(x: Steps, base: float) -> Steps:
    """``floor(log(x) / log(base))`` exactly as CPython's ``math.log`` computes it.

    numpy's vectorised ``log`` may differ from the C library's by an ulp; that only
    matters where the ratio is (nearly) an integer, i.e. at a cycle boundary, where an
    ulp decides which cycle a step falls in. Those few points are recomputed with
    ``math.log`` (at most one per cycle boundary in the window, not one per step).
    """
    x = np.asarray(x, dtype=np.float64)
    log_base = math.log(base)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.log(x) / log_base
    out = np.floor(q)
    finite = np.isfinite(q)
    near = finite & (np.abs(q - np.rint(q)) <= 1e-9 * np.maximum(1.0, np.abs(q)))
    for idx in np.flatnonzero(near):
        out[idx] = math.floor(math.log(float(x[idx])) / log_base)
    return out
