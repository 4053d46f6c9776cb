"""Keras schedules against their documented formulas (scalar Python per step, transcribed from
the research notes' formula column) and the notes' vectors. Keras itself is not installed."""

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

STEPS = [*range(10_000), 2**40, 2**53 - 1]
LRS = st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3)


def ours(spec: dict[str, Any], lrs: list[float], steps: list[int] = STEPS) -> np.ndarray:
    node = schedule_adapter.validate_python(spec)
    names = tuple(f"g{i}" for i in range(len(lrs)))
    base = GroupBase(names=names, lr=np.array(lrs, float), momentum=np.full(len(lrs), np.nan))
    return node.compile(CompileContext(base=base)).lr(as_steps(steps), {})


def close(spec: dict[str, Any], lrs: list[float], f: Any) -> None:
    expect = np.array([[f(t, lr0) for t in STEPS] for lr0 in lrs])
    assert_matches(ours(spec, lrs), expect, atol=1e-14 * float(np.abs(expect).max()) + 1e-300)


@given(lrs=LRS, ds=st.floats(0.5, 5000), rate=st.floats(0, 1), stair=st.booleans())
def test_exponential(lrs: list[float], ds: float, rate: float, stair: bool) -> None:
    spec = {
        "type": "keras.ExponentialDecay",
        "decay_steps": ds,
        "decay_rate": rate,
        "staircase": stair,
    }
    close(spec, lrs, lambda t, lr0: lr0 * rate ** (math.floor(t / ds) if stair else t / ds))


@given(lrs=LRS, ds=st.floats(0.5, 5000), rate=st.floats(0, 3), stair=st.booleans())
def test_inverse_time(lrs: list[float], ds: float, rate: float, stair: bool) -> None:
    spec = {
        "type": "keras.InverseTimeDecay",
        "decay_steps": ds,
        "decay_rate": rate,
        "staircase": stair,
    }
    close(spec, lrs, lambda t, lr0: lr0 / (1 + rate * (math.floor(t / ds) if stair else t / ds)))


@given(
    lrs=LRS, ds=st.integers(1, 5000), end=st.floats(0, 1e-4), p=st.floats(0, 3), cycle=st.booleans()
)
def test_polynomial(lrs: list[float], ds: int, end: float, p: float, cycle: bool) -> None:
    def f(step: int, lr0: float) -> float:
        t = float(step)  # Keras casts the step and decay_steps to the rate's float dtype
        if cycle:
            d = float(ds) * (1.0 if t == 0 else math.ceil(t / ds))
        else:
            d, t = float(ds), min(t, ds)
        return (lr0 - end) * (1 - t / d) ** p + end

    spec = {"type": "keras.PolynomialDecay", "decay_steps": ds, "end_learning_rate": end,
            "power": p, "cycle": cycle}  # fmt: skip
    close(spec, lrs, f)


@given(lrs=LRS, ds=st.integers(1, 8000), alpha=st.floats(0, 0.5),
       warm=st.one_of(st.none(), st.tuples(st.floats(0, 1e-4), st.integers(0, 3000))))  # fmt: skip
def test_cosine(lrs: list[float], ds: int, alpha: float, warm: tuple[float, int] | None) -> None:
    def decay(t: float, start: float) -> float:
        return start * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * (t / ds))) + alpha)

    spec: dict[str, Any] = {"type": "keras.CosineDecay", "decay_steps": ds, "alpha": alpha}
    if warm is None:
        close(spec, lrs, lambda t, lr0: decay(min(t, ds), lr0))
        return
    init, w = warm
    spec |= {"initial_learning_rate": init, "warmup_target": lrs, "warmup_steps": w}
    targets = iter(lrs)

    def f_group(target: float) -> Any:
        def f(t: int, _: float) -> float:
            t = min(t, ds + w)
            return (target - init) * (t / w) + init if t < w else decay(t - w, target)

        return f

    expect = np.array([[f_group(tg)(t, 0.0) for t in STEPS] for tg in targets])
    assert_matches(ours(spec, lrs), expect, atol=1e-14 * float(np.abs(expect).max()))


@given(lrs=LRS, first=st.integers(1, 3000), t_mul=st.sampled_from([1.0, 2.0, 1.5, 3.0]),
       m_mul=st.floats(0.2, 1), alpha=st.floats(0, 0.3))  # fmt: skip
def test_cosine_restarts(lrs, first, t_mul, m_mul, alpha) -> None:  # type: ignore[no-untyped-def]
    def f(t: int, lr0: float) -> float:
        frac = t / first
        if t_mul == 1:
            i = math.floor(frac)
            frac -= i
        else:
            i = math.floor(math.log(1 - frac * (1 - t_mul)) / math.log(t_mul))
            frac = (frac - (1 - t_mul**i) / (1 - t_mul)) / t_mul**i
        return lr0 * ((1 - alpha) * 0.5 * m_mul**i * (1 + math.cos(math.pi * frac)) + alpha)

    spec = {"type": "keras.CosineDecayRestarts", "first_decay_steps": first, "t_mul": t_mul,
            "m_mul": m_mul, "alpha": alpha}  # fmt: skip
    close(spec, lrs, f)


@given(
    b=st.lists(st.integers(0, 12000), min_size=1, max_size=5, unique=True).map(sorted),
    data=st.data(),
)
def test_piecewise_constant(b: list[int], data: st.DataObject) -> None:
    values = data.draw(st.lists(st.floats(0, 1), min_size=len(b) + 1, max_size=len(b) + 1))

    def f(t: int, _: float) -> float:
        for bound, v in zip(b, values, strict=False):
            if t <= bound:
                return v
        return values[-1]

    close(
        {"type": "keras.PiecewiseConstantDecay", "boundaries": b, "values": values}, [1.0, 2.0], f
    )


def test_research_vectors() -> None:
    def row(spec: dict[str, Any], n: int) -> list[float]:
        return [round(v, 4) for v in ours(spec, [1.0], list(range(n)))[0]]

    spec = {"type": "keras.PiecewiseConstantDecay", "boundaries": [2, 4], "values": [1, 0.5, 0.1]}
    assert row(spec, 7) == [1, 1, 1, 0.5, 0.5, 0.1, 0.1]
    spec = {"type": "keras.CosineDecay", "initial_learning_rate": 0, "decay_steps": 4,
            "warmup_target": 1, "warmup_steps": 2}  # fmt: skip
    assert row(spec, 7) == [0, 0.5, 1, 0.8536, 0.5, 0.1464, 0]
    spec = {"type": "keras.CosineDecayRestarts", "first_decay_steps": 2, "m_mul": 0.5}
    assert row(spec, 9) == [1, 0.5, 0.5, 0.4268, 0.25, 0.0732, 0.25, 0.2405, 0.2134]
    spec = {
        "type": "keras.PolynomialDecay",
        "decay_steps": 4,
        "end_learning_rate": 0.1,
        "cycle": True,
    }
    assert row(spec, 10) == [1, 0.775, 0.55, 0.325, 0.1, 0.4375, 0.325, 0.2125, 0.1, 0.325]
    spec = {
        "type": "keras.ExponentialDecay",
        "decay_steps": 2,
        "decay_rate": 0.5,
        "staircase": True,
    }
    assert row(spec, 6) == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_bad_arguments() -> None:
    for bad in [
        {"type": "keras.ExponentialDecay", "decay_steps": 0, "decay_rate": 0.5},
        {"type": "keras.PiecewiseConstantDecay", "boundaries": [2, 4], "values": [1, 0.5]},
        {"type": "keras.PiecewiseConstantDecay", "boundaries": [4, 2], "values": [1, 0.5, 0.1]},
        {
            "type": "keras.PiecewiseConstantDecay",
            "boundaries": [2],
            "values": [1, 0.5],
            "initial_learning_rate": 1,
        },
        {"type": "keras.CosineDecayRestarts", "first_decay_steps": 2, "t_mul": 0.5},
        {"type": "keras.CosineDecay", "decay_steps": 10, "name": "x"},
    ]:
        with pytest.raises(ValidationError):
            schedule_adapter.validate_python(bad)
