"""torch's ``LambdaLR`` and ``MultiplicativeLR`` with safe string expressions for ``lr_lambda``.

``lr_lambda`` is an expression in ``epoch`` (see :mod:`service.schedules.expr`), or a list
with one expression per parameter group, as torch accepts a list of functions.

- ``LambdaLR``: ``lr(t) = base * lambda(t)`` (absolute; torch's ``base_lr * lmbda(last_epoch)``).
- ``MultiplicativeLR``: ``lr(0) = base``, ``lr(t) = lr(t-1) * lambda(t)`` for ``t >= 1``. The
  closed form is ``base * prod(lambda(1..t))``, accumulated left to right in float64 exactly in
  torch's order (``((base * l1) * l2) * ...``), so the values are torch's bit for bit rather
  than an approximation that drifts with ``t``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import field_validator

from .base import (
    MAX_STEP,
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    ProgramState,
    ScanResume,
    ScheduleNode,
    SpecError,
    Steps,
)
from .expr import Expr, ExprError, parse

MULTIPLICATIVE_EXACT_STEPS = 2**26
"""MultiplicativeLR is accumulated step by step up to this step. Beyond it a constant lambda
continues as ``lr(L) * lambda ** (t - L)``; a lambda that depends on ``epoch`` holds ``lr(L)``
(64M steps of one schedule is far beyond any real run; the bound keeps a query cheap)."""

_CHUNK = 1 << 16
_CHUNK_CELLS = 1 << 21
"""A chunk holds at most this many values (groups x steps; 16 MB): 1,024 groups accumulate
2,048 steps at a time, not 65,536 (512 MB a matrix). The product is the same bits."""


def chunk_steps(n_groups: int, most: int, cells: int = _CHUNK_CELLS) -> int:
    """Steps per chunk for ``n_groups`` rows: ``most``, or the largest power of two (at least
    256) whose chunk holds at most ``cells`` values."""
    steps = most
    while steps > 256 and steps * max(n_groups, 1) > cells:
        steps //= 2
    return steps


def _check_expressions(value: str | list[str], first_epoch: int) -> str | list[str]:
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("give one expression, or a non-empty list with one per parameter group")
    for i, source in enumerate(items):
        try:
            parse(source, check_at={"epoch": float(first_epoch)})
        except ExprError as exc:
            prefix = f"entry {i}: " if isinstance(value, list) else ""
            raise ValueError(f"{prefix}{exc}") from None
    return value


def _compile_expressions(
    value: str | list[str], ctx: CompileContext, first_epoch: int
) -> list[Expr]:
    loc = (*ctx.loc, "lr_lambda")
    if isinstance(value, list):
        if len(value) != ctx.n_groups:
            raise SpecError(
                loc,
                f"has {len(value)} expressions but the run has {ctx.n_groups} parameter group(s) "
                f"{list(ctx.base.names)}; give one per group or a single expression",
            )
        sources = list(value)
    else:
        sources = [value] * ctx.n_groups
    out = []
    for i, source in enumerate(sources):
        try:
            out.append(parse(source, check_at={"epoch": float(first_epoch)}))
        except ExprError as exc:  # already checked by the model; kept for direct callers
            raise SpecError((*loc, i) if isinstance(value, list) else loc, str(exc)) from None
    return out


def _eval_rows(exprs: Sequence[Expr], t: Steps) -> Matrix:
    if not exprs:
        return np.empty((0, len(t)))
    # Each distinct expression once: a run usually gives one for every group (1,024 groups
    # cost one evaluation, not 1,024; the rows are the same bits either way).
    rows: dict[str, np.ndarray] = {}
    for e in exprs:
        if e.source not in rows:
            rows[e.source] = e(epoch=t)
    return np.stack([rows[e.source] for e in exprs])


class LambdaCurve(Curve):
    """``base * lambda_g(t)`` per group."""

    def __init__(self, base: np.ndarray, exprs: Sequence[Expr]) -> None:
        self.n_groups = len(exprs)
        self.base = np.asarray(base, dtype=np.float64).reshape(-1, 1)
        self.exprs = list(exprs)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        return self.base * _eval_rows(self.exprs, t)


class MultiplicativeCurve(Chainable):
    """``lr_t = lr_{t-1} * lambda(t)``, evaluated from cached running products."""

    def __init__(self, base: np.ndarray, exprs: Sequence[Expr]) -> None:
        self.n_groups = len(exprs)
        self.base = np.asarray(base, dtype=np.float64)
        self.exprs = list(exprs)
        # _checkpoints[k] = lr at step k * chunk per group (k = 0 is the base): a pure
        # function of the spec, filled lazily in order (each needs the one before) under
        # _lock and read without it (append-only, so an entry never changes or moves once
        # there). At most MULTIPLICATIVE_EXACT_STEPS // chunk + 1 entries.
        first = self.base.copy()
        first.setflags(write=False)
        self._checkpoints: list[np.ndarray] = [first]
        self._lock = threading.Lock()
        self._chunk_steps = chunk_steps(self.n_groups, _CHUNK)
        # The same recursion from 1 (ChainedScheduler's factor), built now, not on first use.
        unit = bool(np.all(self.base == 1.0))
        self._unit = self if unit else MultiplicativeCurve(np.ones(self.n_groups), self.exprs)

    def _factors(self, start: int, stop: int) -> Matrix:
        steps = np.arange(start, stop, dtype=np.float64)
        return _eval_rows(self.exprs, steps)

    def _checkpoint(self, k: int) -> np.ndarray:
        """The lr at step ``k * chunk`` (filling the checkpoints up to ``k`` if needed)."""
        checkpoints = self._checkpoints
        if k < len(checkpoints):
            return checkpoints[k]
        with self._lock:
            while len(checkpoints) <= k:
                j = len(checkpoints) - 1
                value = self._accumulate(j, checkpoints[j])[:, -1].copy()
                value.setflags(write=False)
                checkpoints.append(value)
        return checkpoints[k]

    def _chunk(self, k: int) -> Matrix:
        """Values at steps ``k*chunk .. (k+1)*chunk`` (inclusive), shape ``(G, chunk+1)``."""
        return self._accumulate(k, self._checkpoint(k))

    def _accumulate(self, k: int, start_lr: np.ndarray) -> Matrix:
        start = k * self._chunk_steps
        factors = self._factors(start + 1, start + self._chunk_steps + 1)
        seq = np.concatenate([start_lr.reshape(-1, 1), factors], axis=1)
        with np.errstate(all="ignore"):
            return np.multiply.accumulate(seq, axis=1)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        out = np.empty((self.n_groups, len(t)))
        if len(t) == 0:
            return out
        idx = np.clip(t, 0, None)
        capped = np.minimum(idx, MULTIPLICATIVE_EXACT_STEPS).astype(np.int64)
        chunks = capped // self._chunk_steps
        for k in np.unique(chunks):
            sel = chunks == k
            block = self._chunk(int(k))
            out[:, sel] = block[:, capped[sel] - int(k) * self._chunk_steps]
        beyond = idx > MULTIPLICATIVE_EXACT_STEPS
        if beyond.any():
            last = out[:, beyond]
            extra = idx[beyond] - MULTIPLICATIVE_EXACT_STEPS
            for g, e in enumerate(self.exprs):
                if e.constant:
                    with np.errstate(all="ignore"):
                        last[g] = last[g] * np.power(float(e(epoch=0.0)), extra)
            out[:, beyond] = last
        return out

    def mult_horizon(self) -> int:
        return MAX_STEP

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        # lr(t) accumulates every step from the last checkpoint (0 when cold) to t. (Its
        # checkpoints live in this process only: priced cold, resumed or not.)
        steps = min(max(end, 0), MULTIPLICATIVE_EXACT_STEPS + 1)
        return steps, min(steps, self._chunk_steps)

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return self._unit.lr(t, state)

    def restart_map(self, state: ProgramState) -> tuple[Matrix, Matrix] | None:
        # SequentialLR restarts a child with _update_lr(0); MultiplicativeLR has no closed
        # form, so torch computes lr * lambda(0) from the lr the previous child left.
        a = _eval_rows(self.exprs, np.zeros(1))
        return a, np.zeros_like(a)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        # Recursive in torch: lr_t = lr_{t-1} * lambda(t); the constructor's step (t = 0)
        # leaves the lr as it is.
        t = np.asarray(t, dtype=np.float64)
        a = _eval_rows(self.exprs, t)
        a[:, t == 0] = 1.0
        return a, np.zeros_like(a)


class LambdaLR(ScheduleNode):
    """torch.optim.lr_scheduler.LambdaLR with ``lr_lambda`` as a safe expression in ``epoch``."""

    type: Literal["LambdaLR"]
    lr_lambda: str | list[str]
    """``"0.95 ** epoch"``, or one expression per parameter group."""

    library: ClassVar[str] = "torch"

    @field_validator("lr_lambda")
    @classmethod
    def _valid_expressions(cls, value: str | list[str]) -> str | list[str]:
        return _check_expressions(value, first_epoch=0)

    def compile(self, ctx: CompileContext) -> Curve:
        return LambdaCurve(ctx.base.lr, _compile_expressions(self.lr_lambda, ctx, 0))


class MultiplicativeLR(ScheduleNode):
    """torch.optim.lr_scheduler.MultiplicativeLR: ``lr_t = lr_{t-1} * lambda(t)`` for t >= 1."""

    type: Literal["MultiplicativeLR"]
    lr_lambda: str | list[str]
    """Per-step factor as an expression in ``epoch``; first evaluated at ``epoch = 1``."""

    library: ClassVar[str] = "torch"

    @field_validator("lr_lambda")
    @classmethod
    def _valid_expressions(cls, value: str | list[str]) -> str | list[str]:
        return _check_expressions(value, first_epoch=1)

    def compile(self, ctx: CompileContext) -> Curve:
        return MultiplicativeCurve(ctx.base.lr, _compile_expressions(self.lr_lambda, ctx, 1))


NODES: tuple[type[ScheduleNode], ...] = (LambdaLR, MultiplicativeLR)

__all__ = ["NODES", "LambdaCurve", "LambdaLR", "MultiplicativeCurve", "MultiplicativeLR"]
