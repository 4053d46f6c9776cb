"""Program: groups, per-group and per-field schedules, windows, reports, validation."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service.schedules import Program, ScheduleSpec, SpecError
from tests.schedules.conftest import assert_matches, make_optimizer, run_torch, torch_values

WARMUP_COSINE = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
        {"type": "CosineAnnealingLR", "T_max": 9500, "eta_min": 1e-6},
    ],
    "milestones": [500],
}


def program(**body: Any) -> Program:
    return Program(ScheduleSpec.model_validate(body))


def test_api_example_end_to_end() -> None:
    """The run body of API.md: a shared schedule, a per-group override, momentum."""
    p = program(
        groups=[
            {"name": "backbone", "lr": 1e-4, "momentum": 0.9},
            {"name": "head", "lr": 1e-3},
        ],
        schedule=WARMUP_COSINE,
        group_schedules={"head": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}},
    )
    assert p.group_names == ("backbone", "head")
    assert p.fields == {"backbone": ("lr", "momentum"), "head": ("lr",)}
    assert p.metric_names == frozenset()
    state = p.initial_state()
    assert json.loads(json.dumps(state)) == state
    values = p.evaluate(state, 0, 10_000)
    backbone_lr, _ = torch_values(WARMUP_COSINE, [1e-4], 10_000)
    head_lr, _ = torch_values(
        {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}, [1e-3], 10_000
    )
    assert_matches(values["backbone"]["lr"], backbone_lr[0])
    assert_matches(values["head"]["lr"], head_lr[0])
    np.testing.assert_array_equal(values["backbone"]["momentum"], np.full(10_000, 0.9))
    one = p.at(state, 1200)
    assert one == {
        "backbone": {"lr": float(values["backbone"]["lr"][1200]), "momentum": 0.9},
        "head": {"lr": float(values["head"]["lr"][1200])},
    }
    empty = p.evaluate(state, 5, 0)
    assert empty["backbone"]["lr"].shape == (0,)


def test_param_schedules_use_each_groups_own_value() -> None:
    """weight_decay scheduled with each group's weight_decay as base (torch schedules only lr,
    so the oracle is torch's scheduler on an optimizer whose lrs are the weight decays)."""
    wd_schedule = {"type": "CosineAnnealingLR", "T_max": 300}
    p = program(
        groups=[
            {"name": "a", "lr": 0.1, "weight_decay": 0.05},
            {"name": "b", "lr": 0.2},
            {"name": "c", "lr": 0.3, "weight_decay": 0.01, "betas": [0.9, 0.99]},
        ],
        schedule={"type": "StepLR", "step_size": 100},
        param_schedules={"weight_decay": wd_schedule},
    )
    assert p.fields == {"a": ("lr", "weight_decay"), "b": ("lr",), "c": ("lr", "beta1")} | {
        "c": ("lr", "beta1", "weight_decay")
    }
    values = p.evaluate({}, 0, 700)
    theirs, _ = torch_values(wd_schedule, [0.05, 0.01], 700)
    assert_matches(values["a"]["weight_decay"], theirs[0])
    assert_matches(values["c"]["weight_decay"], theirs[1])
    np.testing.assert_array_equal(values["c"]["beta1"], np.full(700, 0.9))


def test_extra_hyperparameters_can_be_scheduled() -> None:
    p = program(
        groups=[{"name": "a", "lr": 0.1, "eps": 1e-3}, {"name": "b", "lr": 0.1}],
        schedule={"type": "StepLR", "step_size": 10},
        param_schedules={"eps": {"type": "ExponentialLR", "gamma": 0.5}},
    )
    assert p.fields["a"] == ("lr", "eps")
    theirs, _ = torch_values({"type": "ExponentialLR", "gamma": 0.5}, [1e-3], 20)
    assert_matches(p.evaluate({}, 0, 20)["a"]["eps"], theirs[0])


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"groups": []}, ("groups",), "at least 1"),
        ({"groups": [{"name": "a", "lr": 0.1}] * 2}, ("groups",), "used twice"),
        ({"groups": [{"name": "a", "lr": -0.1}]}, ("groups", 0, "lr"), "greater than or equal"),
        ({"groups": [{"name": "a", "lr": "0.1"}]}, ("groups", 0, "lr"), "valid number"),
        ({"groups": [{"name": "a", "lr": float("nan")}]}, ("groups", 0, "lr"), "finite"),
        ({"groups": [{"name": "", "lr": 0.1}]}, ("groups", 0, "name"), "pattern"),
        (
            {"groups": [{"name": "a", "lr": 0.1, "momentum": 0.9, "betas": [0.9, 0.99]}]},
            ("groups", 0),
            "not both",
        ),
        ({"groups": [{"name": "a", "lr": 0.1, "betas": [1.0, 0.99]}]}, ("groups", 0), "[0, 1)"),
        ({"groups": [{"name": "a", "lr": 0.1, "eps": "x"}]}, ("groups", 0, "eps"), "number"),
        (
            {"group_schedules": {"nope": {"type": "StepLR", "step_size": 1}}},
            ("group_schedules",),
            "unknown group name(s) ['nope']",
        ),
        (
            {"param_schedules": {"weight_decay": {"type": "StepLR", "step_size": 1}}},
            ("param_schedules",),
            "no group has the hyperparameter(s) ['weight_decay']",
        ),
        (
            {"param_schedules": {"lr": {"type": "StepLR", "step_size": 1}}},
            ("param_schedules",),
            "not param_schedules",
        ),
        ({"extra": 1}, ("extra",), "not permitted"),
    ],
)
def test_spec_validation(body: dict[str, Any], loc: tuple[Any, ...], words: str) -> None:
    full = {
        "groups": [{"name": "a", "lr": 0.1}],
        "schedule": {"type": "StepLR", "step_size": 3},
        **body,
    }
    with pytest.raises(ValidationError) as info:
        ScheduleSpec.model_validate(full)
    errors = info.value.errors()
    assert any(tuple(e["loc"][: len(loc)]) == loc and words in e["msg"] for e in errors), errors


def test_too_many_groups() -> None:
    groups = [{"name": f"g{i}", "lr": 0.1} for i in range(1025)]
    with pytest.raises(ValidationError, match="at most 1024"):
        ScheduleSpec.model_validate(
            {"groups": groups, "schedule": {"type": "StepLR", "step_size": 1}}
        )
    Program(
        ScheduleSpec.model_validate(
            {"groups": groups[:1024], "schedule": {"type": "StepLR", "step_size": 1}}
        )
    )


def test_per_group_list_of_wrong_length_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        program(
            groups=[{"name": "a", "lr": 0.1, "momentum": 0.9}, {"name": "b", "lr": 0.1}],
            schedule={
                "type": "SequentialLR",
                "milestones": [10],
                "schedulers": [
                    {"type": "StepLR", "step_size": 3},
                    {
                        "type": "CyclicLR",
                        "base_lr": [0.1, 0.2, 0.3],
                        "max_lr": 1.0,
                        "cycle_momentum": False,
                    },
                ],
            },
        )
    assert info.value.loc == ("schedule", "schedulers", 1, "base_lr")
    assert "3 entries" in info.value.msg


# -- reports -----------------------------------------------------------------------------------


def _torch_plateau_with_exponential(
    metrics: dict[int, float], n: int, gamma: float, **rop: Any
) -> np.ndarray:
    """torch's values for ExponentialLR and ReduceLROnPlateau on one optimizer (what a
    ChainedScheduler [ExponentialLR, ReduceLROnPlateau] means): the report at step s is
    fed to ReduceLROnPlateau after step s, so a reduction applies from s + 1."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", "Detected call of", UserWarning)
    opt = make_optimizer([0.1, 0.05])
    exp = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **rop)
    out = np.empty((2, n))
    for k in range(n):
        if k > 0:
            exp.step()
        out[:, k] = [g["lr"] for g in opt.param_groups]
        if k in metrics:
            plateau.step(metrics[k])
    return out


def test_observe_chained_plateau_against_torch() -> None:
    schedule = {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "ExponentialLR", "gamma": 0.999},
            {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 2, "factor": 0.5},
        ],
    }
    p = program(groups=[{"name": "a", "lr": 0.1}, {"name": "b", "lr": 0.05}], schedule=schedule)
    assert p.metric_names == frozenset({"val_loss"})
    reports = {s: 1.0 for s in range(50, 1000, 50)}
    state = p.initial_state()
    decisions = []
    for step, value in reports.items():
        state, decision = p.observe(state, step, {"val_loss": value, "other": 3.0})
        decisions.append(decision)
        assert json.loads(json.dumps(state)) == state
    assert any(d["reduced"] for d in decisions)
    assert decisions[0]["nodes"][0]["path"] == "schedule.schedulers.1"
    assert decisions[0]["nodes"][0]["metric"] == "val_loss"
    theirs = _torch_plateau_with_exponential(reports, 1000, 0.999, patience=2, factor=0.5)
    values = p.evaluate(state, 0, 1000)
    assert_matches(np.stack([values["a"]["lr"], values["b"]["lr"]]), theirs)


def test_observe_respects_sequential_segments() -> None:
    """A plateau child of SequentialLR sees only reports inside its segment, and its
    reductions are keyed by global step."""
    schedule = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": 100},
            {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.5},
        ],
        "milestones": [100],
    }
    p = program(groups=[{"name": "a", "lr": 1.0}], schedule=schedule)
    state = p.initial_state()
    state, d1 = p.observe(state, 50, {"loss": 1.0})
    assert d1 == {"reduced": False, "nodes": []}  # before its segment: not observed
    state, _ = p.observe(state, 150, {"loss": 1.0})  # first value: best
    state, d3 = p.observe(state, 200, {"loss": 2.0})  # worse, patience 0: reduce
    assert d3["reduced"]
    values = p.evaluate(state, 0, 300)["a"]["lr"]
    assert values[200] == 1.0 and values[201] == 0.5
    assert values[99] == pytest.approx(0.991)


def test_observe_skips_missing_metrics_and_checks_step() -> None:
    schedule = {"type": "ReduceLROnPlateau", "metric": "val_loss"}
    p = program(groups=[{"name": "a", "lr": 1.0}], schedule=schedule)
    state = p.initial_state()
    same, decision = p.observe(state, 3, {"acc": 0.5, "val_loss": None})
    assert same == state and decision == {"reduced": False, "nodes": []}
    with pytest.raises(SpecError):
        p.observe(state, -1, {"val_loss": 1.0})


def test_state_round_trips_and_partial_state_is_completed() -> None:
    schedule = {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0}
    p = program(groups=[{"name": "a", "lr": 1.0}], schedule=schedule)
    state = p.initial_state()
    for step, value in enumerate([3.0, 4.0, 5.0]):
        state, _ = p.observe(state, step, {"val_loss": value})
    restored = json.loads(json.dumps(state))
    assert_matches(p.evaluate(restored, 0, 10)["a"]["lr"], p.evaluate(state, 0, 10)["a"]["lr"])
    # An empty state is the initial state (the service may store nothing before reports).
    assert_matches(p.evaluate({}, 0, 5)["a"]["lr"], np.ones(5))


def test_run_torch_helper_counts_steps() -> None:
    """The shared helper's convention: column k = after k step() calls."""
    import torch

    opt = make_optimizer([1.0])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lr, _ = run_torch(opt, sched, 5)
    np.testing.assert_array_equal(lr[0], [1, 1, 0.5, 0.5, 0.25])
