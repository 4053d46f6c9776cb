"""SWALR (torch.optim.swa_utils.SWALR) against torch's own scheduler, every step.

torch's SWALR is recursive on the group's lr (it rebuilds the lr it started from out of the
current one) and counts its own ``step()`` calls; SequentialLR restarts it at a milestone with
``_update_lr(0)``, which leaves the lr the previous child ended with and anneals from there.
Values must agree with torch to 1e-12 relative, per group, standalone, after a milestone,
first in a SequentialLR, inside ChainedScheduler and inside the epoch wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules import Program, ScheduleSpec, SpecError
from tests.schedules.conftest import (
    TORCH_BUILDERS,
    assert_matches,
    build_torch,
    examples,
    make_optimizer,
    run_torch,
    torch_values,
)


def _build_swalr(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    params = {k: v for k, v in spec.items() if k != "type"}
    return torch.optim.swa_utils.SWALR(opt, **params)


TORCH_BUILDERS.setdefault("SWALR", _build_swalr)

LRS = [0.1, 1e-3, 2.0]


def program(schedule: Mapping[str, Any], lrs: list[float], **group: Any) -> Program:
    groups = [{"name": f"g{i}", "lr": lr, **group} for i, lr in enumerate(lrs)]
    return Program(ScheduleSpec.model_validate({"groups": groups, "schedule": schedule}))


def ours(schedule: Mapping[str, Any], lrs: list[float], start: int, count: int) -> np.ndarray:
    values = program(schedule, lrs).evaluate({}, start, count)
    return np.stack([values[f"g{i}"]["lr"] for i in range(len(lrs))])


def check(schedule: Mapping[str, Any], lrs: list[float], n: int) -> None:
    theirs, _ = torch_values(schedule, lrs, n)
    assert_matches(ours(schedule, lrs, 0, n), theirs, what=str(schedule))


def swalr(swa_lr: Any = 0.05, epochs: int = 10, strategy: str = "cos") -> dict[str, Any]:
    return {
        "type": "SWALR",
        "swa_lr": swa_lr,
        "anneal_epochs": epochs,
        "anneal_strategy": strategy,
    }


EDGE_EPOCHS = [0, 1, 2, 10, 257]
SWA_LRS: list[Any] = [0.05, [0.05, 0.5, 1e-6], 0.0]
WARMUP = {"type": "LinearLR", "start_factor": 0.01, "total_iters": 25}
COSINE = {"type": "CosineAnnealingLR", "T_max": 60}


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("epochs", EDGE_EPOCHS)
@pytest.mark.parametrize("swa_lr", SWA_LRS, ids=["scalar", "per-group", "zero"])
def test_standalone(swa_lr: Any, epochs: int, strategy: str) -> None:
    check(swalr(swa_lr, epochs, strategy), LRS, epochs + 40)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("epochs", EDGE_EPOCHS)
@pytest.mark.parametrize("first", [WARMUP, COSINE], ids=["LinearLR", "CosineAnnealingLR"])
@pytest.mark.parametrize("milestone", [0, 1, 7, 40, 90])
def test_after_a_milestone(
    first: dict[str, Any], milestone: int, epochs: int, strategy: str
) -> None:
    schedule = {
        "type": "SequentialLR",
        "schedulers": [first, swalr([0.05, 0.5, 1e-6], epochs, strategy)],
        "milestones": [milestone],
    }
    check(schedule, LRS, milestone + epochs + 30)


def test_anneals_from_the_rate_it_finds() -> None:
    # The milestone keeps the previous child's last lr; the anneal starts from it, not from
    # the group's base (what a closed form would do) and not from the previous child's value
    # at the milestone.
    schedule = {
        "type": "SequentialLR",
        "schedulers": [COSINE, swalr(0.02, 4, "linear")],
        "milestones": [30],
    }
    got = ours(schedule, [1.0], 0, 40)[0]
    cosine = ours(COSINE, [1.0], 0, 31)[0]
    assert got[30] == cosine[29]
    np.testing.assert_allclose(
        got[31:35], 0.02 * np.arange(1, 5) / 4 + got[30] * (1 - np.arange(1, 5) / 4)
    )
    assert (got[34:] == 0.02).all()
    # anneal_epochs = 0: swa_lr at the milestone itself, standalone from step 0.
    zero = {**schedule, "schedulers": [COSINE, swalr(0.02, 0)]}
    got = ours(zero, [1.0], 0, 40)[0]
    assert got[29] == cosine[29] and (got[30:] == 0.02).all()
    assert (ours(swalr(0.02, 0), [1.0], 0, 5) == 0.02).all()


@pytest.mark.parametrize("epochs", [0, 1, 5])
def test_first_then_another(epochs: int) -> None:
    schedule = {
        "type": "SequentialLR",
        "schedulers": [swalr([0.05, 0.5, 1e-6], epochs), {"type": "ExponentialLR", "gamma": 0.9}],
        "milestones": [8],
    }
    check(schedule, LRS, 40)


def test_twice_in_a_sequence() -> None:
    # torch keeps swa_lr in the param group, so the SWALR constructed last sets every SWALR's
    # target; with equal swa_lr both follow their own anneal_epochs and strategy exactly.
    schedule = {
        "type": "SequentialLR",
        "schedulers": [WARMUP, swalr(0.5, 6), COSINE, swalr(0.5, 3, "linear")],
        "milestones": [10, 20, 50],
    }
    check(schedule, LRS, 80)


def test_each_swalr_keeps_its_own_target() -> None:
    # Deliberate difference: torch's second SWALR overwrites group["swa_lr"] for the first
    # one too; lrserve gives every node its own swa_lr (like each child's own base lr).
    schedule = {
        "type": "SequentialLR",
        "schedulers": [swalr(0.5, 2), swalr(0.01, 0)],
        "milestones": [10],
    }
    got = ours(schedule, [1.0], 0, 12)[0]
    assert (got[2:10] == 0.5).all() and (got[10:] == 0.01).all()


@pytest.mark.parametrize("epochs", [0, 1, 10])
@pytest.mark.parametrize(
    "other",
    [
        {"type": "ExponentialLR", "gamma": 0.97},
        {"type": "CosineAnnealingLR", "T_max": 15, "eta_min": 1e-4},
        {"type": "StepLR", "step_size": 4, "gamma": 0.5},
    ],
    ids=["exponential", "cosine-eta", "step"],
)
@pytest.mark.parametrize("order", ["before", "after"])
def test_chained(other: dict[str, Any], epochs: int, order: str) -> None:
    swa = swalr([0.05, 0.5, 1e-6], epochs)
    children = [swa, other] if order == "before" else [other, swa]
    check({"type": "ChainedScheduler", "schedulers": children}, LRS, 60)


def test_sequential_inside_chained() -> None:
    seq = {"type": "SequentialLR", "schedulers": [WARMUP, swalr(0.3, 12)], "milestones": [20]}
    chained = {
        "type": "ChainedScheduler",
        "schedulers": [{"type": "ExponentialLR", "gamma": 0.99}, seq],
    }
    check(chained, LRS, 60)


@pytest.mark.parametrize("epochs", [0, 1, 6])
def test_epochs_boundary(epochs: int) -> None:
    inner = {"type": "SequentialLR", "schedulers": [COSINE, swalr(0.02, epochs)], "milestones": [9]}
    check({"type": "Epochs", "steps_per_epoch": 7, "schedule": inner}, LRS, 7 * 30)


def test_fractional_epochs_refused() -> None:
    # torch's SWALR.step(epoch) ignores the epoch (it anneals once per call): nothing to match.
    spec = {"type": "Epochs", "steps_per_epoch": 7, "fractional": True, "schedule": swalr()}
    with pytest.raises(SpecError) as info:
        program(spec, LRS)
    assert info.value.loc == ("schedule", "schedule")


def test_windows_and_single_steps() -> None:
    schedule = {
        "type": "SequentialLR",
        "schedulers": [WARMUP, swalr([0.05, 0.5, 1e-6], 30)],
        "milestones": [25],
    }
    n = 120
    full = ours(schedule, LRS, 0, n)
    prog = program(schedule, LRS)
    for start, count in [(0, 1), (24, 1), (25, 1), (26, 1), (24, 3), (40, 50), (119, 1), (55, 65)]:
        got = prog.evaluate({}, start, count)
        window = np.stack([got[f"g{i}"]["lr"] for i in range(len(LRS))])
        assert_matches(window, full[:, start : start + count], rtol=0, atol=0, what=f"{start}")


def test_momentum_and_betas_untouched() -> None:
    one_cycle = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 30}
    schedule = {
        "type": "SequentialLR",
        "schedulers": [one_cycle, swalr(0.05, 5)],
        "milestones": [20],
    }
    for group in ({"momentum": 0.9}, {"betas": (0.9, 0.999)}):
        field = "momentum" if "momentum" in group else "beta1"
        opt = make_optimizer(
            LRS,
            momentum=group.get("momentum"),
            betas=group.get("betas"),  # type: ignore[arg-type]
        )
        lr, mom = run_torch(opt, build_torch(schedule, opt), 40)
        values = program(schedule, LRS, **group).evaluate({}, 0, 40)
        got_lr = np.stack([values[f"g{i}"]["lr"] for i in range(len(LRS))])
        got_mom = np.stack([values[f"g{i}"][field] for i in range(len(LRS))])
        assert_matches(got_lr, lr)
        assert_matches(got_mom, mom, what=field)
    standalone = program(swalr(), LRS, momentum=0.9).evaluate({}, 0, 20)
    assert all((standalone[f"g{i}"]["momentum"] == 0.9).all() for i in range(len(LRS)))


def test_param_schedule() -> None:
    # As a param_schedules entry it anneals the field from each group's own value.
    groups = [
        {"name": "a", "lr": 0.1, "weight_decay": 0.05},
        {"name": "b", "lr": 0.2, "weight_decay": 0.5},
    ]
    spec = {
        "groups": groups,
        "schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0},
        "param_schedules": {"weight_decay": swalr([0.01, 0.02], 4, "linear")},
    }
    values = Program(ScheduleSpec.model_validate(spec)).evaluate({}, 0, 6)
    np.testing.assert_allclose(values["a"]["weight_decay"], [0.05, 0.04, 0.03, 0.02, 0.01, 0.01])
    np.testing.assert_allclose(values["b"]["weight_decay"], [0.5, 0.38, 0.26, 0.14, 0.02, 0.02])


@pytest.mark.parametrize(
    "bad",
    [
        {"swa_lr": -0.1},
        {"swa_lr": []},
        {"swa_lr": "0.1"},
        {"swa_lr": 0.1, "anneal_epochs": -1},
        {"swa_lr": 0.1, "anneal_epochs": 2.0},
        {"swa_lr": 0.1, "anneal_epochs": True},
        {"swa_lr": 0.1, "anneal_strategy": "exp"},
        {"swa_lr": float("nan")},
        {"swa_lr": 0.1, "swa_lrs": 0.1},
    ],
)
def test_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        program({"type": "SWALR", **bad}, LRS)


def test_group_count_mismatch() -> None:
    with pytest.raises(SpecError) as info:
        program(swalr([0.1, 0.2]), LRS)
    assert info.value.loc == ("schedule", "swa_lr")


# --- random arguments (hypothesis) ----------------------------------------------------------

_lrs = st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=3)
_swa = st.floats(0.0, 5.0)
_first = st.one_of(
    st.builds(
        lambda s, e, t: {"type": "LinearLR", "start_factor": s, "end_factor": e, "total_iters": t},
        st.floats(0.01, 1.0),
        st.floats(0.0, 1.0),
        st.integers(1, 500),
    ),
    st.builds(
        lambda t, e: {"type": "CosineAnnealingLR", "T_max": t, "eta_min": e},
        st.integers(1, 500),
        st.sampled_from([0.0, 0.0, 1e-6]),
    ),
)


@st.composite
def swalr_node(draw: st.DrawFn, n_groups: int) -> dict[str, Any]:
    per_group = draw(st.booleans(), label="per_group")
    swa = draw(st.lists(_swa, min_size=n_groups, max_size=n_groups)) if per_group else draw(_swa)
    epochs = draw(st.one_of(st.integers(0, 3), st.integers(0, 2000)), label="anneal_epochs")
    return swalr(swa, epochs, draw(st.sampled_from(["cos", "linear"])))


@settings(max_examples=examples(25))
@given(data=st.data(), lrs=_lrs)
def test_random_standalone(data: st.DataObject, lrs: list[float]) -> None:
    node = data.draw(swalr_node(len(lrs)))
    check(node, lrs, node["anneal_epochs"] + 50)


@settings(max_examples=examples(25))
@given(data=st.data(), lrs=_lrs, first=_first, milestone=st.integers(0, 600))
def test_random_sequential(
    data: st.DataObject, lrs: list[float], first: dict[str, Any], milestone: int
) -> None:
    node = data.draw(swalr_node(len(lrs)))
    schedule = {"type": "SequentialLR", "schedulers": [first, node], "milestones": [milestone]}
    n = milestone + node["anneal_epochs"] + 50
    theirs, _ = torch_values(schedule, lrs, n)
    # eta_min > 0: torch's own cosine recursion noise (see test_compose.cosine_noise).
    atol = (
        8 * np.finfo(float).eps * first.get("eta_min", 0.0) * (1 + (2 * first.get("T_max", 0)) ** 2)
    )
    assert_matches(ours(schedule, lrs, 0, n), theirs, atol=max(atol, 1e-300), what=str(schedule))
    start = data.draw(st.integers(0, n - 1), label="window start")
    count = data.draw(st.integers(1, n - start), label="window count")
    assert_matches(
        ours(schedule, lrs, start, count),
        theirs[:, start : start + count],
        atol=max(atol, 1e-300),
        what="window",
    )


@settings(max_examples=examples(25))
@given(data=st.data(), lrs=_lrs, other=_first, first=st.booleans())
def test_random_chained(
    data: st.DataObject, lrs: list[float], other: dict[str, Any], first: bool
) -> None:
    node = data.draw(swalr_node(len(lrs)))
    children = [node, other] if first else [other, node]
    schedule = {"type": "ChainedScheduler", "schedulers": children}
    n = node["anneal_epochs"] + 50
    theirs, _ = torch_values(schedule, lrs, n)
    atol = (
        8 * np.finfo(float).eps * other.get("eta_min", 0.0) * (1 + (2 * other.get("T_max", 0)) ** 2)
    )
    assert_matches(ours(schedule, lrs, 0, n), theirs, atol=max(atol, 1e-300), what=str(schedule))
