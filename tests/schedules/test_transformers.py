"""transformers schedules against the installed transformers (its own LambdaLR lambdas)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.base import CompileContext, GroupBase, SpecError, as_steps
from service.schedules.spec import schedule_adapter
from tests.schedules.conftest import assert_matches, make_optimizer, run_torch

hf = pytest.importorskip("transformers.optimization")

N = 10_000
FAR = [2**31, 2**40 + 3, 2**53 - 1]  # the engine's whole step range, far past every horizon


def ours(spec: dict[str, Any], lrs: list[float], steps: list[int]) -> np.ndarray:
    node = schedule_adapter.validate_python(spec)
    names = tuple(f"g{i}" for i in range(len(lrs)))
    base = GroupBase(names=names, lr=np.array(lrs, float), momentum=np.full(len(lrs), np.nan))
    return node.compile(CompileContext(base=base)).lr(as_steps(steps), {})


def theirs(spec: dict[str, Any], lrs: list[float], steps: list[int]) -> np.ndarray:
    """base_g * λ(N) from the scheduler transformers builds (what LambdaLR writes at step N)."""
    opt = make_optimizer(lrs)
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "lr_init")}
    sched = getattr(hf, spec["type"].removeprefix("transformers."))(opt, **kwargs)
    lam = sched.lr_lambdas[0]
    factors = np.array([float(lam(n)) for n in steps])
    return np.array(sched.base_lrs, float)[:, None] * factors[None, :]


def check(spec: dict[str, Any], lrs: list[float]) -> None:
    steps = [*range(N), *FAR]
    assert_matches(ours(spec, lrs, steps), theirs(spec, lrs, steps))


LRS = st.lists(st.floats(1e-5, 1.0), min_size=1, max_size=3)
W = st.integers(0, 3000)
T = st.integers(0, 12_000)


@given(lrs=LRS)
def test_constant(lrs: list[float]) -> None:
    check({"type": "transformers.get_constant_schedule"}, lrs)


@given(lrs=LRS, w=W)
def test_constant_with_warmup(lrs: list[float], w: int) -> None:
    check({"type": "transformers.get_constant_schedule_with_warmup", "num_warmup_steps": w}, lrs)


@given(lrs=LRS, w=W, t=T)
def test_linear(lrs: list[float], w: int, t: int) -> None:
    spec = {"type": "transformers.get_linear_schedule_with_warmup"}
    check({**spec, "num_warmup_steps": w, "num_training_steps": t}, lrs)


@given(lrs=LRS, w=W, t=T, c=st.floats(0, 4))
def test_cosine(lrs: list[float], w: int, t: int, c: float) -> None:
    spec = {"type": "transformers.get_cosine_schedule_with_warmup", "num_cycles": c}
    check({**spec, "num_warmup_steps": w, "num_training_steps": t}, lrs)


@given(lrs=LRS, w=W, t=T, c=st.integers(0, 6))
def test_cosine_hard_restarts(lrs: list[float], w: int, t: int, c: int) -> None:
    spec = {"type": "transformers.get_cosine_with_hard_restarts_schedule_with_warmup"}
    check({**spec, "num_warmup_steps": w, "num_training_steps": t, "num_cycles": c}, lrs)


@given(lrs=LRS, w=W, t=T, end=st.floats(0, 0.9), power=st.floats(0.1, 3))
def test_polynomial(lrs: list[float], w: int, t: int, end: float, power: float) -> None:
    if t == w:
        t += 1
    lr_end = end * min(lrs)
    spec = {"type": "transformers.get_polynomial_decay_schedule_with_warmup", "power": power}
    spec |= {"num_warmup_steps": w, "num_training_steps": t, "lr_end": lr_end}
    # transformers divides by optimizer.defaults['lr'] (make_optimizer: the first group's lr).
    check({**spec, "lr_init": lrs[0]}, lrs)
    check(spec, lrs[:1])  # one group: the default lr_init is that group's lr


@given(lrs=LRS, w=W, ts=st.one_of(st.none(), st.integers(1, 5000)))
def test_inverse_sqrt(lrs: list[float], w: int, ts: int | None) -> None:
    spec: dict[str, Any] = {"type": "transformers.get_inverse_sqrt_schedule", "num_warmup_steps": w}
    check(spec if ts is None else {**spec, "timescale": ts}, lrs)


@given(lrs=LRS, w=W, t=T, c=st.floats(0, 2), rate=st.floats(0, 1), use_abs=st.booleans())
def test_cosine_with_min_lr(
    lrs: list[float], w: int, t: int, c: float, rate: float, use_abs: bool
) -> None:
    spec: dict[str, Any] = {"type": "transformers.get_cosine_with_min_lr_schedule_with_warmup"}
    spec |= {"num_warmup_steps": w, "num_training_steps": t, "num_cycles": c}
    if use_abs:
        check({**spec, "min_lr": rate * lrs[0], "lr_init": lrs[0]}, lrs)
        check({**spec, "min_lr": rate * lrs[0]}, lrs[:1])
    else:
        check({**spec, "min_lr_rate": rate}, lrs)


@given(lrs=LRS, w=W, t=T, rate=st.floats(0, 1), wr=st.one_of(st.none(), st.floats(0, 1)))
def test_cosine_warmup_with_min_lr(
    lrs: list[float], w: int, t: int, rate: float, wr: float | None
) -> None:
    spec: dict[str, Any] = {
        "type": "transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        "num_warmup_steps": w,
        "num_training_steps": t,
        "min_lr_rate": rate,
    }
    check(spec if wr is None else {**spec, "warmup_lr_rate": wr}, lrs)


KINDS = st.sampled_from(["linear", "cosine", "1-sqrt"])


@given(
    lrs=LRS,
    w=W,
    d=st.integers(0, 4000),
    s=st.integers(0, 4000),
    by_total=st.booleans(),
    wt=KINDS,
    dt=KINDS,
    m=st.floats(0, 0.5),
    c=st.floats(0, 2),
)
def test_wsd(
    lrs: list[float], w: int, d: int, s: int, by_total: bool, wt: str, dt: str, m: float, c: float
) -> None:
    spec: dict[str, Any] = {"type": "transformers.get_wsd_schedule", "num_warmup_steps": w}
    spec |= {"num_decay_steps": d, "warmup_type": wt, "decay_type": dt, "min_lr_ratio": m}
    spec |= {"num_cycles": c}
    if by_total:
        spec["num_training_steps"] = w + s + d
    else:
        spec["num_stable_steps"] = s
    check(spec, lrs)


def test_stepping_the_real_scheduler() -> None:
    """The values after N step() calls of transformers' own scheduler, two groups."""
    lrs = [0.1, 0.02]
    spec = {"type": "transformers.get_cosine_schedule_with_warmup"}
    spec |= {"num_warmup_steps": 100, "num_training_steps": 1500}
    opt = make_optimizer(lrs)
    sched = hf.get_cosine_schedule_with_warmup(opt, 100, 1500)
    lr, _ = run_torch(opt, sched, 2000)
    assert_matches(ours(spec, lrs, list(range(2000))), lr)


def test_research_vectors() -> None:
    def row(spec: dict[str, Any], n: int) -> list[float]:
        return [round(v, 4) for v in ours(spec, [1.0], list(range(n)))[0]]

    wt = {"num_warmup_steps": 2, "num_training_steps": 10}
    assert row({"type": "transformers.get_linear_schedule_with_warmup", **wt}, 12) == [
        0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0, 0
    ]  # fmt: skip
    assert row({"type": "transformers.get_cosine_schedule_with_warmup", **wt}, 12) == [
        0, 0.5, 1, 0.9619, 0.8536, 0.6913, 0.5, 0.3087, 0.1464, 0.0381, 0, 0.0381
    ]  # fmt: skip
    spec = {"type": "transformers.get_inverse_sqrt_schedule", "num_warmup_steps": 2}
    assert row(spec, 9) == [0, 0.5, 1, 0.8165, 0.7071, 0.6325, 0.5774, 0.5345, 0.5]


def test_bad_arguments() -> None:
    min_lr = {"type": "transformers.get_cosine_with_min_lr_schedule_with_warmup"}
    min_lr |= {"num_warmup_steps": 1, "num_training_steps": 5}
    with pytest.raises(ValidationError, match="min_lr"):
        schedule_adapter.validate_python(min_lr)
    with pytest.raises(ValidationError, match="Only one"):
        schedule_adapter.validate_python({**min_lr, "min_lr": 0.1, "min_lr_rate": 0.1})
    with pytest.raises(ValidationError):
        schedule_adapter.validate_python(
            {"type": "transformers.get_linear_schedule_with_warmup", "num_warmup_steps": -1,
             "num_training_steps": 5}
        )  # fmt: skip
    with pytest.raises(ValidationError):
        schedule_adapter.validate_python({"type": "transformers.get_wsd_schedule",
                                          "num_warmup_steps": 1, "num_decay_steps": 5})  # fmt: skip
    poly = {"type": "transformers.get_polynomial_decay_schedule_with_warmup"}
    poly |= {"num_warmup_steps": 1, "num_training_steps": 5, "lr_end": 0.5}
    with pytest.raises(SpecError, match="lr_end") as err:
        ours(poly, [1.0, 0.1], [0])
    assert err.value.loc == ("schedule", "lr_end")
    with pytest.raises(SpecError, match="min_lr"):
        ours({**min_lr, "min_lr": 0.1}, [0.0], [0])
