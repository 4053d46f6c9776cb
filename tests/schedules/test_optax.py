"""optax schedules against their documented formulas (scalar Python per step, transcribed from
the research notes' formula column) and the notes' vectors. optax itself needs jax."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.base import CompileContext, GroupBase, as_steps
from service.schedules.spec import schedule_adapter
from tests.schedules.conftest import assert_matches

N = 10_000
STEPS = [*range(N), 2**40, 2**53 - 1]


def ours(spec: dict[str, Any], lrs: list[float], steps: list[int] = STEPS) -> np.ndarray:
    node = schedule_adapter.validate_python(spec)
    names = tuple(f"g{i}" for i in range(len(lrs)))
    base = GroupBase(names=names, lr=np.array(lrs, float), momentum=np.full(len(lrs), np.nan))
    return node.compile(CompileContext(base=base)).lr(as_steps(steps), {})


# --- the documented formulas, one step at a time -------------------------------------------------


def polynomial(t: int, i: float, e: float, p: float, tt: int, b: int = 0) -> float:
    if tt <= 0:
        return i
    c = min(max(t - max(b, 0), 0), tt)
    return (i - e) * (1 - c / tt) ** p + e


def exponential(t: int, i: float, tt: int, rate: float, b: int, stair: bool, end: float | None):
    if tt <= 0 or rate == 0:
        return i
    d = t - max(b, 0)
    if d <= 0:
        v = i
    else:
        p = d / tt
        try:
            v = i * rate ** (math.floor(p) if stair else p)
        except OverflowError:  # optax (jnp) gives inf, which end_value then bounds
            v = math.inf
    if end is not None:
        v = max(v, end) if rate < 1 else min(v, end)
    return v


def cosine(t: int, i: float, d: int, alpha: float, exponent: float) -> float:
    c = min(t, d)
    return i * ((1 - alpha) * (0.5 * (1 + math.cos(math.pi * c / d))) ** exponent + alpha)


def warmup_cosine(t: int, i: float, peak: float, w: int, d: int, end: float, ex: float) -> float:
    if t < w:
        return polynomial(t, i, peak, 1, w)
    alpha = 0.0 if peak == 0 else end / peak
    return cosine(t - w, peak, d - w, alpha, ex)


def piecewise_constant(t: int, i: float, bs: dict[int, float]) -> float:
    v = i
    for b, s in sorted(bs.items()):
        if t >= b:
            v *= s
    return v


def piecewise_interp(t: int, kind: str, i: float, bs: dict[int, float]) -> float:
    items = sorted(bs.items())
    bounds = [0] + [b for b, _ in items]
    vals = [i]
    for _, s in items:
        vals.append(vals[-1] * s)
    for k in range(len(items)):
        lo, hi = bounds[k], bounds[k + 1]
        if lo <= t < hi:
            pct = (t - lo) / max(hi - lo, 1)
            s, e = vals[k], vals[k + 1]
            if kind == "linear":
                return (e - s) * pct + s
            return e + (s - e) / 2 * (math.cos(math.pi * pct) + 1)
    return vals[-1] if bounds[-1] <= t else 0.0


def ref(fn: Any, lrs: list[float], per_group: Any) -> np.ndarray:
    return np.array([[fn(t, *per_group(g)) for t in STEPS] for g in range(len(lrs))])


LRS = st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3)
TOL = 1e-14  # ulp differences between numpy and math cos/pow, scaled by the peak


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert_matches(a, b, atol=TOL * float(np.abs(b).max()) + 1e-300)


@given(lrs=LRS, end=st.floats(0, 1e-3), p=st.floats(0, 3), tt=st.integers(-5, 12000),
       b=st.integers(-5, 3000), default_init=st.booleans())  # fmt: skip
def test_polynomial(lrs: list[float], end: float, p: float, tt: int, b: int, default_init: bool):
    spec: dict[str, Any] = {"type": "optax.polynomial_schedule", "end_value": end, "power": p}
    spec |= {"transition_steps": tt, "transition_begin": b}
    init = lrs if default_init else [0.5 * x for x in lrs]
    if not default_init:
        spec["init_value"] = init
    close(ours(spec, lrs), ref(polynomial, lrs, lambda g: (init[g], end, p, tt, b)))


@given(lrs=LRS, tt=st.integers(-2, 3000), rate=st.floats(0, 1.2), b=st.integers(-5, 3000),
       stair=st.booleans(), end=st.one_of(st.none(), st.floats(1e-5, 1e-2)))  # fmt: skip
def test_exponential_decay(lrs, tt, rate, b, stair, end) -> None:  # type: ignore[no-untyped-def]
    if rate > 1 and end is None:
        end = 10.0  # keep growth finite over 2**53 steps
    spec = {"type": "optax.exponential_decay", "transition_steps": tt, "decay_rate": rate,
            "transition_begin": b, "staircase": stair, "end_value": end}  # fmt: skip
    close(ours(spec, lrs), ref(exponential, lrs, lambda g: (lrs[g], tt, rate, b, stair, end)))


@given(lrs=LRS, d=st.integers(1, 12000), alpha=st.floats(0, 0.5), ex=st.floats(0.5, 3))
def test_cosine_decay(lrs: list[float], d: int, alpha: float, ex: float) -> None:
    spec = {"type": "optax.cosine_decay_schedule", "decay_steps": d, "alpha": alpha, "exponent": ex}
    close(ours(spec, lrs), ref(cosine, lrs, lambda g: (lrs[g], d, alpha, ex)))


@given(lrs=LRS, w=st.integers(0, 3000), extra=st.integers(1, 9000), end=st.floats(0, 1e-4),
       init=st.floats(0, 1e-4), ex=st.floats(0.5, 2))  # fmt: skip
def test_warmup_cosine_decay(lrs, w, extra, end, init, ex) -> None:  # type: ignore[no-untyped-def]
    spec = {"type": "optax.warmup_cosine_decay_schedule", "init_value": init, "warmup_steps": w,
            "decay_steps": w + extra, "end_value": end, "exponent": ex}  # fmt: skip
    expect = ref(warmup_cosine, lrs, lambda g: (init, lrs[g], w, w + extra, end, ex))
    close(ours(spec, lrs), expect)


BS = st.dictionaries(st.integers(0, 12000), st.floats(0, 2), max_size=5)


@given(lrs=LRS, bs=BS)
def test_piecewise_constant(lrs: list[float], bs: dict[int, float]) -> None:
    spec = {
        "type": "optax.piecewise_constant_schedule",
        "boundaries_and_scales": {str(k): v for k, v in bs.items()},
    }
    close(ours(spec, lrs), ref(piecewise_constant, lrs, lambda g: (lrs[g], bs)))


@given(lrs=LRS, bs=BS, kind=st.sampled_from(["linear", "cosine"]))
def test_piecewise_interpolate(lrs: list[float], bs: dict[int, float], kind: str) -> None:
    spec = {"type": "optax.piecewise_interpolate_schedule", "interpolate_type": kind,
            "boundaries_and_scales": bs}  # fmt: skip
    close(ours(spec, lrs), ref(piecewise_interp, lrs, lambda g: (kind, lrs[g], bs)))


@given(lrs=LRS, tt=st.integers(1, 12000), pct=st.floats(0, 1), div=st.floats(1, 100))
def test_onecycles(lrs: list[float], tt: int, pct: float, div: float) -> None:
    spec = {"type": "optax.cosine_onecycle_schedule", "transition_steps": tt, "pct_start": pct,
            "div_factor": div}  # fmt: skip
    bs = {int(pct * tt): div, tt: 1 / (div * 1e4)}
    close(ours(spec, lrs), ref(piecewise_interp, lrs, lambda g: ("cosine", lrs[g] / div, bs)))
    spec = {**spec, "type": "optax.linear_onecycle_schedule", "pct_final": max(pct, 0.85)}
    bs = {int(pct * tt): div, int(max(pct, 0.85) * tt): 1 / div, tt: 1e-4}
    close(ours(spec, lrs), ref(piecewise_interp, lrs, lambda g: ("linear", lrs[g] / div, bs)))


def test_sgdr_and_join() -> None:
    seg = {"init_value": 0.0, "warmup_steps": 100, "decay_steps": 1000, "end_value": 1e-5}
    got = ours(
        {"type": "optax.sgdr_schedule", "cosine_kwargs": [seg, {**seg, "decay_steps": 3000}]},
        [0.1, 0.2],
    )
    for g, peak in enumerate([0.1, 0.2]):
        expect = [
            warmup_cosine(t, 0.0, peak, 100, 1000, 1e-5, 1.0)
            if t < 1000
            else warmup_cosine(t - 1000, 0.0, peak, 100, 3000, 1e-5, 1.0)
            for t in STEPS
        ]
        close(got[g], np.array(expect))
    join = {"type": "optax.join_schedules", "boundaries": [500, 500, 2000], "schedules": [
        {"type": "optax.constant_schedule"},
        {"type": "optax.constant_schedule", "value": 5.0},
        {"type": "optax.linear_schedule", "end_value": 0.0, "transition_steps": 1000},
        {"type": "StepLR", "step_size": 10, "gamma": 0.5},
    ]}  # fmt: skip
    try:
        got = ours(join, [1.0])
    except ValidationError:
        join["schedules"][3] = {"type": "optax.exponential_decay", "transition_steps": 10,
                                "decay_rate": 0.5, "staircase": True}  # fmt: skip
        got = ours(join, [1.0])
    expect = [1.0 if t < 500 else polynomial(t - 500, 1.0, 0.0, 1, 1000) if t < 2000
              else 0.5 ** ((t - 2000) // 10) for t in STEPS]  # fmt: skip
    close(got[0], np.array(expect))


def test_research_vectors() -> None:
    def row(spec: dict[str, Any], n: int) -> list[float]:
        return [round(v, 4) for v in ours(spec, [1.0], list(range(n)))[0]]

    spec = {"type": "optax.cosine_onecycle_schedule", "transition_steps": 10, "peak_value": 1.0}
    assert row(spec, 11) == [0.04, 0.28, 0.76, 1, 0.9505, 0.8117, 0.6113, 0.3887, 0.1883, 0.0495, 0]
    spec = {"type": "optax.warmup_cosine_decay_schedule", "init_value": 0, "peak_value": 1,
            "warmup_steps": 2, "decay_steps": 6, "end_value": 0.1}  # fmt: skip
    assert row(spec, 8) == [0, 0.5, 1, 0.8682, 0.55, 0.2318, 0.1, 0.1]
    spec = {"type": "optax.exponential_decay", "init_value": 1, "transition_steps": 2,
            "decay_rate": 0.5, "transition_begin": 2, "staircase": True}  # fmt: skip
    assert row(spec, 9) == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]
    spec = {
        "type": "optax.piecewise_constant_schedule",
        "boundaries_and_scales": {"2": 0.5, "4": 0.2},
    }
    assert row(spec, 6) == [1, 1, 0.5, 0.5, 0.1, 0.1]
    spec = {"type": "optax.piecewise_interpolate_schedule", "interpolate_type": "linear",
            "boundaries_and_scales": {"4": 0.1, "8": 0.01}}  # fmt: skip
    assert row(spec, 11)[::2] == [1, 0.55, 0.1, 0.0505, 0.001, 0.001]
    seg = {"init_value": 0, "peak_value": 1, "warmup_steps": 1, "decay_steps": 3}
    assert row({"type": "optax.sgdr_schedule", "cosine_kwargs": [seg, seg]}, 7) == [
        0,
        1,
        0.5,
        0,
        1,
        0.5,
        0,
    ]
    spec = {"type": "optax.cosine_decay_schedule", "decay_steps": 4, "alpha": 0.1, "exponent": 2}
    assert row(spec, 5) == [1, 0.7557, 0.325, 0.1193, 0.1]


def test_bad_arguments() -> None:
    for bad in [
        {"type": "optax.cosine_decay_schedule", "decay_steps": 0},
        {"type": "optax.piecewise_constant_schedule", "boundaries_and_scales": {"2": -1}},
        {
            "type": "optax.warmup_cosine_decay_schedule",
            "init_value": 0,
            "warmup_steps": 5,
            "decay_steps": 5,
        },
        {
            "type": "optax.join_schedules",
            "schedules": [{"type": "optax.constant_schedule"}],
            "boundaries": [3],
        },
        {"type": "optax.sgdr_schedule", "cosine_kwargs": []},
        {"type": "optax.exponential_decay", "transition_steps": 2, "decay_rate": -0.5},
    ]:
        with pytest.raises(ValidationError):
            schedule_adapter.validate_python(bad)
    from service.schedules.base import SpecError

    with pytest.raises(SpecError) as err:
        ours({"type": "optax.constant_schedule", "value": [1.0, 2.0]}, [1.0])
    assert err.value.loc == ("schedule", "value")
