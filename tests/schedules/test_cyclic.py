"""CyclicLR and OneCycleLR (learning rate and momentum/beta1) against torch 2.13.

Random arguments over 10,000+ steps, compared with torch's own schedulers stepped on a real
optimizer (SGD with momentum, or Adam whose betas[0] is cycled), to 1e-12 relative.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.base import CompileContext, Curve, GroupBase, SpecError
from service.schedules.spec import schedule_adapter
from tests.schedules.conftest import TORCH_BUILDERS, assert_matches, torch_values

_NS = {"__builtins__": {}, "min": min, "max": max, "abs": abs, "exp": math.exp, "pi": math.pi}


def _build_cyclic(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    params = {k: v for k, v in spec.items() if k != "type"}
    if params.get("scale_fn") is not None:
        params["scale_fn"] = eval(f"lambda x: {params['scale_fn']}", _NS)  # the test's oracle
    return torch.optim.lr_scheduler.CyclicLR(opt, **params)


TORCH_BUILDERS.setdefault("CyclicLR", _build_cyclic)


def compile_spec(
    spec: dict[str, Any], lrs: list[float], momentum: list[float] | None = None
) -> Curve:
    mom = np.full(len(lrs), np.nan) if momentum is None else np.asarray(momentum, dtype=float)
    base = GroupBase(
        names=tuple(f"g{i}" for i in range(len(lrs))), lr=np.asarray(lrs, dtype=float), momentum=mom
    )
    return schedule_adapter.validate_python(spec).compile(CompileContext(base=base))


def check(
    spec: dict[str, Any], lrs: list[float], n: int, use_betas: bool, cycled: bool = True
) -> None:
    g = len(lrs)
    if use_betas:
        betas = [(0.9 - 0.01 * i, 0.999) for i in range(g)]
        theirs_lr, theirs_m = torch_values(spec, lrs, n, betas=betas)
        start = [b[0] for b in betas]
    else:
        start = [0.9 - 0.01 * i for i in range(g)]
        theirs_lr, theirs_m = torch_values(spec, lrs, n, momentum=start)
    curve = compile_spec(spec, lrs, start)
    t = np.arange(n, dtype=np.float64)
    assert_matches(curve.lr(t, {}), theirs_lr)
    mom = curve.momentum(t, {})
    if cycled:
        assert mom is not None
        assert_matches(mom, theirs_m, what="momentum")
    else:
        assert mom is None
        assert_matches(np.broadcast_to(np.asarray(start)[:, None], theirs_m.shape), theirs_m)


_group_count = st.integers(1, 3)
_lr = st.floats(1e-5, 1.0)


def per_group(draw: st.DrawFn, g: int, values: st.SearchStrategy[float]) -> float | list[float]:
    if draw(st.booleans()):
        return [draw(values) for _ in range(g)]
    return draw(values)


@st.composite
def cyclic_specs(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    g = draw(_group_count)
    spec: dict[str, Any] = {
        "type": "CyclicLR",
        "base_lr": per_group(draw, g, st.floats(1e-5, 0.1)),
        "max_lr": per_group(draw, g, st.floats(0.1, 2.0)),
        "step_size_up": draw(st.one_of(st.integers(1, 3000), st.floats(0.5, 500.0))),
        "mode": draw(st.sampled_from(["triangular", "triangular2", "exp_range"])),
        "gamma": draw(st.sampled_from([1.0, 0.9999, 0.999, 0.99])),
        "cycle_momentum": draw(st.booleans()),
        "base_momentum": per_group(draw, g, st.floats(0.5, 0.85)),
        "max_momentum": per_group(draw, g, st.floats(0.85, 0.99)),
    }
    if draw(st.booleans()):
        spec["step_size_down"] = draw(st.one_of(st.integers(0, 3000), st.floats(0.0, 500.0)))
    if draw(st.booleans()):
        spec["scale_fn"] = draw(
            st.sampled_from(["1 / (x ** 0.5)", "0.9999 ** x", "max(0.1, 1 - x / 50000)"])
        )
        spec["scale_mode"] = draw(st.sampled_from(["cycle", "iterations"]))
        if spec["scale_fn"] == "1 / (x ** 0.5)":
            spec["scale_mode"] = "cycle"  # x = 0 would divide by zero in iterations mode
    elif draw(st.booleans()):
        spec["scale_mode"] = draw(st.sampled_from(["cycle", "iterations"]))  # ignored by torch
    return spec, g


@pytest.mark.slow
@given(cyclic_specs(), st.booleans())
def test_cyclic_matches_torch(case: tuple[dict[str, Any], int], use_betas: bool) -> None:
    spec, g = case
    lrs = [0.5, 0.25, 0.125][:g]
    n = 10_001
    if spec["mode"] == "triangular2" and "scale_fn" not in spec:
        # torch raises OverflowError from 2.0 ** (cycle - 1) once cycle > 1024 (see below).
        up = float(spec["step_size_up"])
        total = up + float(spec.get("step_size_down", up))
        n = min(n, math.ceil(1024 * total))
    check(spec, lrs, n, use_betas, cycled=spec["cycle_momentum"])


def test_triangular2_beyond_cycle_1024() -> None:
    """torch overflows in 1 / 2.0 ** (cycle - 1) from cycle 1025 on; we return the limit, the
    amplitude 0 (lr = base_lr, momentum = max_momentum), instead of failing."""
    spec = {
        "type": "CyclicLR",
        "base_lr": 0.1,
        "max_lr": 1.0,
        "step_size_up": 1,
        "mode": "triangular2",
    }
    theirs_lr, _ = torch_values(spec, [1.0], 2048, momentum=0.9)
    curve = compile_spec(spec, [1.0], [0.9])
    assert_matches(curve.lr(np.arange(2048.0), {}), theirs_lr)
    with pytest.raises(OverflowError):
        torch_values(spec, [1.0], 2050, momentum=0.9)
    far = np.array([2048.0, 2049.0, 1e9])
    assert_matches(curve.lr(far, {}), [[0.1, 0.1, 0.1]])
    mom = curve.momentum(far, {})
    assert mom is not None
    assert_matches(mom, [[0.9, 0.9, 0.9]])


def test_builtin_modes_ignore_scale_mode() -> None:
    """torch forces scale_mode: 'iterations' for exp_range, 'cycle' for the triangular modes."""
    for mode, given_mode in (("exp_range", "cycle"), ("triangular2", "iterations")):
        spec = {
            "type": "CyclicLR",
            "base_lr": 0.1,
            "max_lr": 1.0,
            "step_size_up": 3,
            "mode": mode,
            "gamma": 0.9,
            "scale_mode": given_mode,
        }
        theirs, _ = torch_values(spec, [1.0], 40, momentum=0.9)
        assert_matches(compile_spec(spec, [1.0], [0.9]).lr(np.arange(40.0), {}), theirs)


@st.composite
def one_cycle_specs(draw: st.DrawFn) -> tuple[dict[str, Any], int, int]:
    g = draw(_group_count)
    spec: dict[str, Any] = {
        "type": "OneCycleLR",
        "max_lr": per_group(draw, g, st.floats(1e-4, 2.0)),
        "pct_start": draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.3, 0.5, 1.0]))),
        "anneal_strategy": draw(st.sampled_from(["cos", "linear"])),
        "cycle_momentum": draw(st.booleans()),
        "base_momentum": per_group(draw, g, st.floats(0.5, 0.85)),
        "max_momentum": per_group(draw, g, st.floats(0.85, 0.99)),
        "div_factor": draw(st.sampled_from([25.0, 10.0, 1.0, 3.7])),
        "final_div_factor": draw(st.sampled_from([1e4, 100.0, 1.0])),
        "three_phase": draw(st.booleans()),
    }
    if draw(st.booleans()):
        total = draw(st.integers(10_000, 12_000))
        spec["total_steps"] = total
    else:
        spe = draw(st.integers(100, 400))
        epochs = draw(st.integers(25, 40))
        spec["epochs"], spec["steps_per_epoch"] = epochs, spe
        total = epochs * spe
        if draw(st.booleans()):
            spec["total_steps"] = total  # total_steps wins; same value keeps torch comparable
    assume(float(spec["pct_start"] * total) - 1 != 0.0)
    return spec, g, total


@pytest.mark.slow
@given(one_cycle_specs(), st.booleans())
def test_one_cycle_matches_torch(case: tuple[dict[str, Any], int, int], use_betas: bool) -> None:
    spec, g, total = case
    lrs = [0.5, 0.25, 0.125][:g]
    # torch evaluates t = 0..total (t == total extrapolates) except where the last phase has
    # zero length: then it divides by zero at t == total.
    last_phase_empty = spec["pct_start"] == 1.0 and not spec["three_phase"]
    n = total if last_phase_empty else total + 1
    check(spec, lrs, n, use_betas, cycled=spec["cycle_momentum"])


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_past_the_horizon(strategy: str) -> None:
    """t == total extrapolates like torch; t > total (torch raises) holds the value at total-1."""
    spec = {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 10, "anneal_strategy": strategy}
    theirs_lr, theirs_m = torch_values(spec, [1.0], 11, momentum=0.9)
    curve = compile_spec(spec, [1.0], [0.9])
    assert_matches(curve.lr(np.arange(11.0), {}), theirs_lr)
    if strategy == "linear":
        assert curve.lr(np.array([10.0]), {})[0, 0] < 0  # torch's own extrapolation
    far = curve.lr(np.array([11.0, 1e6]), {})
    assert_matches(far, np.repeat(theirs_lr[:, 9:10], 2, axis=1))
    mom = curve.momentum(np.array([11.0, 1e6]), {})
    assert mom is not None
    assert_matches(mom, np.repeat(theirs_m[:, 9:10], 2, axis=1))


def test_notes_vectors() -> None:
    cyc = compile_spec(
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1, "step_size_up": 2, "mode": "triangular2"},
        [1.0],
        [0.9],
    )
    t = np.arange(10.0)
    assert_matches(
        cyc.lr(t, {}), [[0.1, 0.55, 1, 0.55, 0.1, 0.325, 0.55, 0.325, 0.1, 0.2125]], rtol=1e-12
    )
    one = compile_spec(
        {"type": "OneCycleLR", "max_lr": 1, "total_steps": 10, "three_phase": True}, [1.0], [0.9]
    )
    expected = [0.04, 0.52, 1, 0.52, 0.04, 0.036181, 0.026182, 0.013822, 0.003823, 4e-6]
    assert_matches(one.lr(t, {}), [expected], rtol=1e-4)


def test_cycle_momentum_needs_momentum_or_betas() -> None:
    for spec in (
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1.0},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 100},
    ):
        with pytest.raises(SpecError, match=r"\['g1'\] have neither momentum nor betas"):
            compile_spec(spec, [1.0, 1.0], [0.9, float("nan")])
        compile_spec({**spec, "cycle_momentum": False}, [1.0, 1.0], [0.9, float("nan")])


def test_refusals() -> None:
    bad = [
        {"type": "OneCycleLR", "max_lr": 1.0},
        {"type": "OneCycleLR", "max_lr": 1.0, "epochs": 3},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 0},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 10, "pct_start": 1.5},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 10, "pct_start": 0.1},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 10, "anneal_strategy": "exp"},
        {"type": "OneCycleLR", "max_lr": 1.0, "total_steps": 10, "div_factor": 0},
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1.0, "mode": "sine"},
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1.0, "step_size_up": 0},
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1.0, "scale_fn": "__import__('os')"},
        {"type": "CyclicLR", "base_lr": 0.1, "max_lr": 1.0, "scale_fn": "x - 2"},
    ]
    for spec in bad:
        with pytest.raises(ValidationError):
            schedule_adapter.validate_python(spec)
    with pytest.raises(SpecError, match="3 entries but the run has 2"):
        compile_spec(
            {"type": "CyclicLR", "base_lr": [0.1] * 3, "max_lr": 1.0}, [1.0, 1.0], [0.9, 0.9]
        )
