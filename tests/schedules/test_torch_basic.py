"""torch's time-driven schedulers against torch itself (CPU 2.13), every step.

Every test builds a random spec, evaluates it with lrserve for >= 10,000 steps and every
group, and compares with torch's scheduler stepped the same number of times, at 1e-12
relative (absolute floor 1e-300, for values torch computes as exactly 0 or denormal).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules import Program, ScheduleSpec, SpecError
from tests.schedules.conftest import assert_matches, examples, torch_values

N = int(os.environ.get("LRSERVE_TORCH_STEPS", "10000"))

bases = st.lists(
    st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=4
)
unit = st.floats(0.0, 1.0)
horizon = st.integers(0, N + N // 4)


def program_for(schedule: dict[str, Any], lrs: list[float], **group_extra: Any) -> Program:
    groups = [{"name": f"g{i}", "lr": lr, **group_extra} for i, lr in enumerate(lrs)]
    return Program(ScheduleSpec.model_validate({"groups": groups, "schedule": schedule}))


def lrserve_lr(schedule: dict[str, Any], lrs: list[float], start: int, count: int) -> np.ndarray:
    values = program_for(schedule, lrs).evaluate({}, start, count)
    return np.stack([values[f"g{i}"]["lr"] for i in range(len(lrs))])


def check(
    schedule: dict[str, Any],
    lrs: list[float],
    n: int = N,
    rtol: float = 1e-12,
    atol: float | np.ndarray = 1e-300,
) -> None:
    theirs, _ = torch_values(schedule, lrs, n)
    ours = lrserve_lr(schedule, lrs, 0, n)
    assert_matches(ours, theirs, rtol=rtol, atol=atol, what=str(schedule))
    # Any window equals the same slice of the full evaluation (no hidden state).
    start, count = n // 3, n // 5
    window = lrserve_lr(schedule, lrs, start, count)
    if isinstance(atol, np.ndarray):
        atol = atol[start : start + count]
    assert_matches(window, theirs[:, start : start + count], rtol=rtol, atol=atol)


@settings(max_examples=examples(25))
@given(lrs=bases, step_size=st.integers(1, N), gamma=unit)
def test_step_lr(lrs: list[float], step_size: int, gamma: float) -> None:
    check({"type": "StepLR", "step_size": step_size, "gamma": gamma}, lrs)


@settings(max_examples=examples(25))
@given(lrs=bases, milestones=st.lists(st.integers(0, N), max_size=12), gamma=unit)
def test_multi_step_lr(lrs: list[float], milestones: list[int], gamma: float) -> None:
    check({"type": "MultiStepLR", "milestones": milestones, "gamma": gamma}, lrs)


@settings(max_examples=examples(25))
@given(lrs=bases, factor=st.floats(1e-3, 1.0), total=horizon)
def test_constant_lr(lrs: list[float], factor: float, total: int) -> None:
    check({"type": "ConstantLR", "factor": factor, "total_iters": total}, lrs)


@settings(max_examples=examples(25))
@given(lrs=bases, start=st.floats(1e-4, 1.0), end=unit, total=horizon)
def test_linear_lr(lrs: list[float], start: float, end: float, total: int) -> None:
    check({"type": "LinearLR", "start_factor": start, "end_factor": end, "total_iters": total}, lrs)


@settings(max_examples=examples(25))
@given(lrs=bases, gamma=st.one_of(st.floats(0.999, 1.0), unit))
def test_exponential_lr(lrs: list[float], gamma: float) -> None:
    check({"type": "ExponentialLR", "gamma": gamma}, lrs)


@settings(max_examples=examples(25))
@given(lrs=bases, total=horizon, power=st.floats(0.0, 5.0))
def test_polynomial_lr(lrs: list[float], total: int, power: float) -> None:
    check({"type": "PolynomialLR", "total_iters": total, "power": power}, lrs)


def cosine_noise(t_max: int, eta_min: float, n: int) -> np.ndarray:
    """The absolute rounding noise of torch's own CosineAnnealingLR recursion, per step.

    torch computes ``eta_min + (lr - eta_min) * ratio`` each step, so every step adds an
    absolute error of a few ulps of ``eta_min``; past ``T_max`` the ratios grow like
    ``(t - anchor)^2`` from the trough, amplifying the errors made just after it. lrserve
    returns the exactly telescoped value, so where ``eta_min > 0`` the comparison allows
    ``8 eps eta_min (1 + d^2)`` with ``d`` the distance from the last trough (0 up to T_max).
    Where ``eta_min = 0`` this is 0 and only the 1e-300 floor applies.
    """
    t = np.arange(n, dtype=np.float64)
    d = np.where(t > t_max, np.mod(t - t_max - 1, 2 * t_max) + 1, 0.0)
    return np.maximum(1e-300, 8 * np.finfo(float).eps * eta_min * (1 + d**2))


@settings(max_examples=examples(25))
@given(
    lrs=bases,
    t_max=st.one_of(st.integers(1, 50), st.integers(1, N)),
    eta_min=st.one_of(st.just(0.0), st.floats(0.0, 1e-2)),
)
def test_cosine_annealing_lr(lrs: list[float], t_max: int, eta_min: float) -> None:
    # Small T_max runs many periods past T_max: torch's recursion, not the closed form.
    schedule = {"type": "CosineAnnealingLR", "T_max": t_max, "eta_min": eta_min}
    check(schedule, lrs, atol=cosine_noise(t_max, eta_min, N))


@settings(max_examples=examples(25))
@given(
    lrs=bases,
    t0=st.one_of(st.integers(1, 20), st.integers(1, N)),
    t_mult=st.integers(1, 4),
    eta_min=st.one_of(st.just(0.0), st.floats(0.0, 1e-2)),
)
def test_cosine_annealing_warm_restarts(
    lrs: list[float], t0: int, t_mult: int, eta_min: float
) -> None:
    schedule = {"type": "CosineAnnealingWarmRestarts", "T_0": t0, "T_mult": t_mult}
    check({**schedule, "eta_min": eta_min}, lrs)


def test_reference_vectors() -> None:
    """The research notes' torch vectors (base 1), as a readable sanity check."""
    cases = {
        "StepLR": ({"step_size": 3, "gamma": 0.5}, [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]),
        "ConstantLR": ({"factor": 0.5, "total_iters": 3}, [0.5, 0.5, 0.5, 1, 1, 1]),
        "PolynomialLR": ({"total_iters": 4, "power": 2}, [1, 0.5625, 0.25, 0.0625, 0, 0]),
    }
    for name, (args, expected) in cases.items():
        ours = lrserve_lr({"type": name, **args}, [1.0], 0, len(expected))[0]
        theirs, _ = torch_values({"type": name, **args}, [1.0], len(expected))
        assert_matches(ours, theirs[0])
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_cosine_past_one_million_steps() -> None:
    """CosineAnnealingLR over 1.2M steps (T_max = 1M, then into the second period)."""
    schedule = {"type": "CosineAnnealingLR", "T_max": 1_000_000, "eta_min": 1e-6}
    n = 1_200_000
    check(schedule, [0.1, 3e-4], n=n, rtol=1e-11, atol=cosine_noise(1_000_000, 1e-6, n))


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "field", "words"),
    [
        ({"type": "StepLR", "step_size": 0}, "step_size", "greater than or equal to 1"),
        ({"type": "StepLR", "step_size": 2.5}, "step_size", "integer"),
        ({"type": "StepLR", "step_size": "3"}, "step_size", "integer"),
        ({"type": "StepLR", "step_size": 3, "gamma": -0.1}, "gamma", "greater than or equal"),
        ({"type": "LinearLR", "start_factor": 0}, "start_factor", "greater than 0"),
        ({"type": "LinearLR", "start_factor": 1.5}, "start_factor", "less than or equal to 1"),
        ({"type": "LinearLR", "end_factor": -0.5}, "end_factor", "greater than or equal to 0"),
        ({"type": "ConstantLR", "factor": 1.5}, "factor", "less than or equal to 1"),
        ({"type": "ConstantLR", "factor": 0.0, "total_iters": 3}, None, "factor must be > 0"),
        ({"type": "CosineAnnealingLR", "T_max": 0}, "T_max", "greater than or equal to 1"),
        ({"type": "CosineAnnealingWarmRestarts", "T_0": 0}, "T_0", "greater than or equal"),
        ({"type": "CosineAnnealingWarmRestarts", "T_0": 2, "T_mult": 1.5}, "T_mult", "integer"),
        ({"type": "CosineAnnealingWarmRestarts", "T_0": 2, "T_mult": 0}, "T_mult", "greater"),
        ({"type": "PolynomialLR", "power": -1.0}, "power", "greater than or equal to 0"),
        ({"type": "MultiStepLR", "milestones": [3, -1]}, "milestones", "greater than or equal"),
        ({"type": "ExponentialLR", "gamma": math.inf}, "gamma", "finite"),
        ({"type": "ExponentialLR", "gamma": math.nan}, "gamma", "finite"),
        ({"type": "ExponentialLR"}, "gamma", "required"),
        ({"type": "ExponentialLR", "gamma": 0.5, "gama": 1}, "gama", "not permitted"),
        ({"type": "StepLR", "step_size": 2**53 + 1}, "step_size", "less than or equal"),
        ({"type": "NoSuchLR"}, None, "does not match any of the expected tags"),
    ],
)
def test_validation_names_field_and_constraint(
    schedule: dict[str, Any], field: str | None, words: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ScheduleSpec.model_validate({"groups": [{"name": "g", "lr": 0.1}], "schedule": schedule})
    errors = info.value.errors()
    assert any(words in e["msg"] for e in errors), errors
    if field is not None:
        assert any(field in e["loc"] for e in errors), errors


def test_torch_refuses_what_we_refuse() -> None:
    """The torch-derived checks above mirror torch's own constructor errors."""
    import torch

    from tests.schedules.conftest import make_optimizer

    opt = make_optimizer([0.1])
    sched = torch.optim.lr_scheduler
    for build in (
        lambda: sched.LinearLR(opt, start_factor=0),
        lambda: sched.LinearLR(opt, end_factor=1.5),
        lambda: sched.ConstantLR(opt, factor=1.5),
        lambda: sched.CosineAnnealingWarmRestarts(opt, T_0=0),
        lambda: sched.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=1.5),
    ):
        with pytest.raises(ValueError):
            build()


def test_window_bounds_are_checked() -> None:
    program = program_for({"type": "StepLR", "step_size": 3}, [0.1])
    for start, count, loc in ((-1, 3, "start"), (0, -2, "count"), (2**53, 1, "count")):
        with pytest.raises(SpecError) as info:
            program.evaluate({}, start, count)
        assert info.value.loc == (loc,)
    assert program.evaluate({}, 2**53 - 5, 5)["g0"]["lr"].shape == (5,)
