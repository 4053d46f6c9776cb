"""timm's schedulers (``timm.scheduler``), by class name with their constructor arguments.

timm is stateless: the trainer passes the time index (``step_update(num_updates)`` after
each update, ``step(epoch)`` at each epoch end) and timm computes ``f(t)`` from each
group's ``initial_lr`` (its ``base_values``). The value for step ``N`` here is ``f(N)`` in
that index, i.e. what ``step_update(N)`` writes. For per-epoch use (``t_in_epochs=True``),
wrap the node in the epoch wrapper so that ``t`` counts epochs.

Groups: ``lr_max`` of a cycle is ``base_g * cycle_decay**i`` per group, but ``lr_min`` and
``warmup_lr_init`` are single absolute numbers shared by every group, as in timm (so the
curve is not a per-group factor). timm's ``lr_scale`` group key is not modelled (give the
scaled base lr instead).

Noise reproduces timm exactly without torch: timm seeds a fresh ``torch.Generator`` with
``noise_seed + t`` and draws ``torch.randn(1)`` (resampled while ``|n| >= noise_pct``) or
``torch.rand(1)``. torch's CPU generator is MT19937 seeded with the low 32 bits of the seed;
``randn`` on one float32 element is a Box–Muller pair from two 53-bit uniforms (the second
value cached for the next draw), rounded to float32; ``rand`` is 24 bits of one output.
Those draws are done here in numpy for every seed of the window at once.

Not reproduced: the value timm writes at construction (``warmup_lr_init``, or the base lr
with no warmup) before the first ``step_update``; lrserve's step 0 is ``f(0)``.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from ._libs import FnCurve, PositiveSteps, StepCount, floor_log_ratio
from .base import MAX_STEP, CompileContext, Curve, Matrix, ScheduleNode, Steps

# --------------------------------------------------------------------------------------------
# torch's CPU generator (MT19937) for many seeds at once
# --------------------------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)
_UPPER = np.uint64(0x80000000)
_LOWER = np.uint64(0x7FFFFFFF)
_MATRIX_A = np.uint64(0x9908B0DF)
_CHUNK = 4096
"""Seeds per block: a block's full MT state is ``_CHUNK * 624 * 8`` bytes (20 MiB)."""


def _mt_init(seeds: np.ndarray) -> np.ndarray:
    """The standard 32-bit MT19937 seeding (torch's ``mt19937(seed)``), one row per seed."""
    state = np.empty((seeds.shape[0], 624), dtype=np.uint64)
    cur = seeds & _M32
    state[:, 0] = cur
    mult = np.uint64(1812433253)
    for j in range(1, 624):
        cur = (mult * (cur ^ (cur >> np.uint64(30))) + np.uint64(j)) & _M32
        state[:, j] = cur
    return state


def _mt_twist(state: np.ndarray) -> np.ndarray:
    """The next 624-word state, in three blocks (the in-place recurrence reads new words)."""
    new = np.empty_like(state)
    y = (state[:, :623] & _UPPER) | (state[:, 1:] & _LOWER)
    mag = np.where((y & np.uint64(1)) == 1, _MATRIX_A, np.uint64(0))
    part = (y >> np.uint64(1)) ^ mag
    new[:, :227] = state[:, 397:624] ^ part[:, :227]
    new[:, 227:454] = new[:, 0:227] ^ part[:, 227:454]
    new[:, 454:623] = new[:, 227:396] ^ part[:, 454:623]
    y_last = (state[:, 623] & _UPPER) | (new[:, 0] & _LOWER)
    mag_last = np.where((y_last & np.uint64(1)) == 1, _MATRIX_A, np.uint64(0))
    new[:, 623] = new[:, 396] ^ (y_last >> np.uint64(1)) ^ mag_last
    return new


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint64(11))
    y = y ^ ((y << np.uint64(7)) & np.uint64(0x9D2C5680))
    y = y ^ ((y << np.uint64(15)) & np.uint64(0xEFC60000))
    y = y ^ (y >> np.uint64(18))
    return y & _M32


def _uniform53(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """torch's double uniform: ``random64() & (2**53 - 1)`` scaled to [0, 1)."""
    bits = ((hi << np.uint64(32)) | lo) & np.uint64((1 << 53) - 1)
    return bits.astype(np.float64) * 2.0**-53


def _normals(outputs: np.ndarray) -> np.ndarray:
    """torch.randn(1) draws in order from 32-bit outputs: ``(n, k)`` -> ``(n, k // 2)``."""
    k = outputs.shape[1] // 4 * 4
    u1 = _uniform53(outputs[:, 0:k:4], outputs[:, 1:k:4])
    u2 = _uniform53(outputs[:, 2:k:4], outputs[:, 3:k:4])
    r = np.sqrt(-2.0 * np.log1p(-u2))
    theta = 2.0 * math.pi * u1
    pairs = np.empty((outputs.shape[0], u1.shape[1], 2))
    pairs[:, :, 0] = r * np.cos(theta)
    pairs[:, :, 1] = r * np.sin(theta)  # cached by torch, returned by the next draw
    # randn writes a float32 tensor; .item() gives that float32 value back as a double.
    return pairs.reshape(outputs.shape[0], -1).astype(np.float32).astype(np.float64)


def timm_noise(
    seeds: np.ndarray, noise_type: str, noise_pct: float, noise_std: float
) -> np.ndarray:
    """timm's ``Scheduler._calculate_noise`` for each seed (``noise_seed + t``), as float64."""
    out = np.empty(seeds.shape[0], dtype=np.float64)
    for start in range(0, seeds.shape[0], _CHUNK):
        block = seeds[start : start + _CHUNK]
        state = _mt_twist(_mt_init(block))
        if noise_type != "normal":
            first = _temper(state[:, 0])
            u = ((first & np.uint64(0xFFFFFF)).astype(np.float64)) * 2.0**-24
            out[start : start + block.shape[0]] = 2 * (u - 0.5) * noise_pct
            continue
        result = np.full(block.shape[0], np.nan)
        pending = np.arange(block.shape[0])
        while pending.size:
            # 624 words = 156 Box-Muller pairs = 312 draws per round (624 % 4 == 0, so no
            # draw straddles two rounds).
            z = _normals(_temper(state[pending])) * noise_std
            ok = np.abs(z) < noise_pct
            hit = ok.any(axis=1)
            first = np.argmax(ok, axis=1)
            result[pending[hit]] = z[hit, first[hit]]
            still = pending[~hit]
            state[still] = _mt_twist(state[still])
            pending = still
        out[start : start + block.shape[0]] = result
    return out


# --------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------


class _TimmNode(ScheduleNode):
    """Arguments shared by every timm scheduler (warmup and noise)."""

    library: ClassVar[str] = "timm"
    default_warmup_prefix: ClassVar[bool] = False

    warmup_t: StepCount = 0
    warmup_lr_init: Annotated[float, Field(ge=0)] = 0.0
    warmup_prefix: bool | None = None
    """timm's default differs per class: False for Cosine/Tanh/Poly, True for Step/MultiStep."""
    noise_range_t: StepCount | list[StepCount] | None = None
    noise_pct: Annotated[float, Field(ge=0)] = 0.67
    noise_std: Annotated[float, Field(ge=0)] = 1.0
    noise_seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] = 42
    noise_type: Literal["normal", "uniform"] = "normal"

    @model_validator(mode="after")
    def _noise_args(self) -> _TimmNode:
        if isinstance(self.noise_range_t, list) and len(self.noise_range_t) != 2:
            raise ValueError("noise_range_t is a step (noise from it on) or [start, end)")
        # timm resamples randn until |n| < noise_pct: with noise_pct 0 it never ends, and a
        # tiny noise_pct / noise_std makes it draw for a very long time.
        tiny = self.noise_pct <= 0 or (
            self.noise_std > 0 and self.noise_pct / self.noise_std < 0.01
        )
        if self.noise_range_t is not None and self.noise_type == "normal" and tiny:
            raise ValueError(
                "normal noise needs noise_pct > 0 and noise_pct / noise_std >= 0.01 "
                "(timm resamples until |noise| < noise_pct)"
            )
        return self

    @property
    def prefix(self) -> bool:
        return self.default_warmup_prefix if self.warmup_prefix is None else self.warmup_prefix

    def schedule(self, t: Steps, base: Matrix) -> Matrix:
        """Post-warmup values ``(G, len(t))`` at (already prefix-shifted) ``t``."""
        raise NotImplementedError

    def warmup_target(self, base: Matrix) -> Matrix:
        return base

    def values(self, t: Steps, base: Matrix) -> Matrix:
        """timm's ``_get_lr(t)`` for every ``t``: ``(G, len(t))``."""
        g = base.shape[0]
        out = np.empty((g, t.shape[0]))
        warm = t < self.warmup_t
        if self.warmup_t:
            steps = (self.warmup_target(base) - self.warmup_lr_init) / self.warmup_t
            out[:, warm] = self.warmup_lr_init + t[warm] * steps
        rest = ~warm
        if rest.any():
            tr = t[rest] - self.warmup_t if self.prefix else t[rest]
            out[:, rest] = self.schedule(tr, base)
        return out

    def noise(self, t: Steps) -> tuple[np.ndarray, Steps] | None:
        """Where timm applies noise and its value there; ``None`` without noise."""
        r = self.noise_range_t
        if r is None:
            return None
        apply = (r[0] <= t) & (t < r[1]) if isinstance(r, list) else t >= r
        seeds = (np.uint64(self.noise_seed % 2**32) + t[apply].astype(np.uint64)) & _M32
        return apply, timm_noise(seeds, self.noise_type, self.noise_pct, self.noise_std)

    def compile(self, ctx: CompileContext) -> Curve:
        base = ctx.base.lr.reshape(-1, 1).astype(np.float64)

        def fn(t: Steps) -> Matrix:
            lrs = self.values(t, base)
            noise = self.noise(t)
            if noise is not None:
                apply, n = noise
                # timm: v + v * noise (not v * (1 + noise): the rounding differs).
                lrs[:, apply] = lrs[:, apply] + lrs[:, apply] * n
            return lrs

        return FnCurve(ctx.n_groups, fn)


class _CycleNode(_TimmNode):
    """Cosine/Tanh/Poly: cycles of ``t_initial * cycle_mul**i`` steps, ``cycle_limit`` of them."""

    t_initial: PositiveSteps
    lr_min: Annotated[float, Field(ge=0)] = 0.0
    cycle_mul: Annotated[float, Field(gt=0)] = 1.0
    cycle_decay: Annotated[float, Field(ge=0)] = 1.0
    cycle_limit: Annotated[int, Field(ge=0, le=MAX_STEP)] = 1

    def cycles(self, t: Steps) -> tuple[Steps, Steps, Steps]:
        """``(i, t_i, t_curr)`` per step; ``i = inf`` where timm's log has no value."""
        mul, t0 = self.cycle_mul, float(self.t_initial)
        if mul != 1:
            x = 1 - t / t0 * (1 - mul)
            valid = x > 0  # cycle_mul < 1: cycles shrink to nothing; timm raises past there
            i = np.full_like(t, np.inf)
            i[valid] = floor_log_ratio(x[valid], mul)
            t_i = mul**i * t0
            t_curr = t - (1 - mul**i) / (1 - mul) * t0
        else:
            i = t // t0
            t_i = np.full_like(t, t0)
            t_curr = t - (t0 * i)
        return i, t_i, t_curr

    def shape(self, t_curr: Steps, t_i: Steps, lr_max: Matrix) -> Matrix:
        raise NotImplementedError

    def schedule(self, t: Steps, base: Matrix) -> Matrix:
        i, t_i, t_curr = self.cycles(t)
        live = i < self.cycle_limit
        out = np.full((base.shape[0], t.shape[0]), float(self.lr_min))
        if live.any():
            lr_max = base * self.cycle_decay ** i[live]
            out[:, live] = self.shape(t_curr[live], t_i[live], lr_max)
        return out


class CosineLRScheduler(_CycleNode):
    """``timm.scheduler.CosineLRScheduler``: cosine cycles with k-decay, warmup and noise."""

    type: Literal["timm.CosineLRScheduler"]
    k_decay: float = 1.0

    def shape(self, t_curr: Steps, t_i: Steps, lr_max: Matrix) -> Matrix:
        k = self.k_decay
        lr_min = self.lr_min
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + np.cos(math.pi * t_curr**k / t_i**k))


class TanhLRScheduler(_CycleNode):
    """``timm.scheduler.TanhLRScheduler``: ``1 - tanh`` from ``lb`` to ``ub`` per cycle.

    Without ``warmup_prefix`` the warmup ramps to the schedule's own value at ``warmup_t``
    (continuous), as in timm.
    """

    type: Literal["timm.TanhLRScheduler"]
    lb: float = -7.0
    ub: float = 3.0

    @model_validator(mode="after")
    def _bounds(self) -> TanhLRScheduler:
        if not self.lb < self.ub:
            raise ValueError("lb must be smaller than ub")
        return self

    def warmup_target(self, base: Matrix) -> Matrix:
        if self.prefix:
            return base
        # timm: _get_lr(warmup_t), i.e. the schedule at t = warmup_t with no prefix shift.
        return self.schedule(np.array([float(self.warmup_t)]), base)

    def shape(self, t_curr: Steps, t_i: Steps, lr_max: Matrix) -> Matrix:
        tr = t_curr / t_i
        lr_min = self.lr_min
        return lr_min + 0.5 * (lr_max - lr_min) * (1 - np.tanh(self.lb * (1.0 - tr) + self.ub * tr))


class PolyLRScheduler(_CycleNode):
    """``timm.scheduler.PolyLRScheduler``: ``(1 - t^k / T^k)^power`` cycles."""

    type: Literal["timm.PolyLRScheduler"]
    power: float = 0.5
    k_decay: float = 1.0

    def shape(self, t_curr: Steps, t_i: Steps, lr_max: Matrix) -> Matrix:
        k = self.k_decay
        lr_min = self.lr_min
        return lr_min + (lr_max - lr_min) * (1 - t_curr**k / t_i**k) ** self.power


class StepLRScheduler(_TimmNode):
    """``timm.scheduler.StepLRScheduler``: ``base * decay_rate ** (t // decay_t)``."""

    type: Literal["timm.StepLRScheduler"]
    default_warmup_prefix: ClassVar[bool] = True
    decay_t: Annotated[float, Field(gt=0, le=MAX_STEP)]
    decay_rate: Annotated[float, Field(ge=0)] = 1.0

    def schedule(self, t: Steps, base: Matrix) -> Matrix:
        return base * self.decay_rate ** (t // self.decay_t)


class MultiStepLRScheduler(_TimmNode):
    """``timm.scheduler.MultiStepLRScheduler``: decays ``bisect_right(decay_t, t + 1)`` times.

    timm's ``t + 1`` makes every decay land one step before its milestone (kept as is).
    ``decay_t`` must be sorted (timm assumes it and gives meaningless values otherwise).
    """

    type: Literal["timm.MultiStepLRScheduler"]
    default_warmup_prefix: ClassVar[bool] = True
    decay_t: list[Annotated[int, Field(ge=-MAX_STEP, le=MAX_STEP)]]
    decay_rate: Annotated[float, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _sorted(self) -> MultiStepLRScheduler:
        if any(a > b for a, b in zip(self.decay_t, self.decay_t[1:], strict=False)):
            raise ValueError("decay_t must be in non-decreasing order")
        return self

    def schedule(self, t: Steps, base: Matrix) -> Matrix:
        n = np.searchsorted(np.asarray(self.decay_t, dtype=np.float64), t + 1, side="right")
        return base * self.decay_rate ** n.astype(np.float64)


NODES: tuple[type[ScheduleNode], ...] = (
    CosineLRScheduler,
    TanhLRScheduler,
    StepLRScheduler,
    MultiStepLRScheduler,
    PolyLRScheduler,
)
