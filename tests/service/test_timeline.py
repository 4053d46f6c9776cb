"""Amendments against torch: a run's schedule changed from a step on (service.runs.timeline).

The oracle for ``restart: true, base: "current"`` is what a person does in torch: train with the
first scheduler up to ``from_step - 1``, then build the new scheduler on the same optimizer
(which holds the values of ``from_step - 1``; ``initial_lr`` removed, so the new scheduler takes
them as its base values), and go on stepping it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from service.runs.errors import InvalidArgument
from service.runs.timeline import timeline
from service.schedules import ScheduleSpec, SpecError
from tests.schedules.conftest import assert_matches, build_torch, make_optimizer, run_torch

GROUPS_SGD = [
    {"name": "backbone", "lr": 0.05, "momentum": 0.9},
    {"name": "head", "lr": 0.5, "momentum": 0.9},
]
N = 160


def _spec(schedule: dict[str, Any], **more: Any) -> ScheduleSpec:
    return ScheduleSpec.model_validate({"groups": GROUPS_SGD, "schedule": schedule, **more})


def _amend(n: int, from_step: int, **body: Any) -> dict[str, Any]:
    return {"n": n, "from_step": from_step, "restart": False, "base": "initial", **body}


def _torch_switch(
    first: dict[str, Any], second: dict[str, Any], from_step: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """torch: ``first`` for steps < from_step, then ``second`` built on the optimizer."""
    opt = make_optimizer([0.05, 0.5], momentum=[0.9, 0.9])
    lr1, mom1 = run_torch(opt, build_torch(first, opt), from_step)
    for group in opt.param_groups:
        group.pop("initial_lr", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # One optimizer step between the schedulers, as in training (silences torch's
        # "scheduler.step() before optimizer.step()" check; the lr is what it is).
        opt.step()
    lr2, mom2 = run_torch(opt, build_torch(second, opt), n - from_step)
    return np.concatenate([lr1, lr2], axis=1), np.concatenate([mom1, mom2], axis=1)


FIRSTS = [
    {"type": "CosineAnnealingLR", "T_max": 120, "eta_min": 1e-4},
    {"type": "OneCycleLR", "max_lr": [0.1, 1.0], "total_steps": 200},
    {"type": "StepLR", "step_size": 7, "gamma": 0.7},
]
SECONDS = [
    {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 50},
    {"type": "CosineAnnealingLR", "T_max": 40},
    {"type": "ExponentialLR", "gamma": 0.97},
    {"type": "OneCycleLR", "max_lr": 0.3, "total_steps": 200},
    {"type": "MultiStepLR", "milestones": [5, 30], "gamma": 0.5},
]


@pytest.mark.parametrize("first", FIRSTS, ids=lambda s: s["type"])
@pytest.mark.parametrize("second", SECONDS, ids=lambda s: s["type"])
@pytest.mark.parametrize("from_step", [1, 37])
def test_restart_from_current_values_is_torchs_new_scheduler(
    first: dict[str, Any], second: dict[str, Any], from_step: int
) -> None:
    spec = _spec(first)
    plain = timeline(spec, []).evaluate({}, 0, N)
    amended = timeline(spec, [_amend(1, from_step, schedule=second, restart=True, base="current")])
    ours = amended.evaluate(amended.initial_state(), 0, N)
    lr, mom = _torch_switch(first, second, from_step, N)
    for i, name in enumerate(("backbone", "head")):
        assert_matches(ours[name]["lr"], lr[i])
    for i, name in enumerate(("backbone", "head")):
        assert_matches(ours[name]["momentum"], mom[i])
    # Values before from_step are the unamended run's, bit for bit.
    for name in ("backbone", "head"):
        for fld, series in plain[name].items():
            assert ours[name][fld][:from_step].tobytes() == series[:from_step].tobytes()


def test_absolute_steps_and_initial_base_are_the_new_schedule_from_the_start() -> None:
    first, second = FIRSTS[0], {"type": "CosineAnnealingLR", "T_max": 300, "eta_min": 0.0}
    amended = timeline(_spec(first), [_amend(1, 50, schedule=second)])
    ours = amended.evaluate({}, 0, N)
    lr, _ = _torch_switch(first, first, N, N)  # (the first schedule alone)
    lr2, _ = _torch_switch(second, second, N, N)
    for i, name in enumerate(("backbone", "head")):
        assert_matches(ours[name]["lr"][:50], lr[i][:50])
        assert_matches(ours[name]["lr"][50:], lr2[i][50:])


def test_a_group_amendment_leaves_the_other_groups_exactly_as_they_were() -> None:
    spec = _spec(FIRSTS[1])
    plain = timeline(spec, []).evaluate({}, 0, N)
    head = {"type": "ConstantLR", "factor": 0.1, "total_iters": 10}
    amended = timeline(spec, [_amend(1, 60, group_schedules={"head": head}, restart=True)])
    ours = amended.evaluate({}, 0, N)
    for fld in ("lr", "momentum"):
        assert ours["backbone"][fld].tobytes() == plain["backbone"][fld].tobytes()
    assert ours["head"]["lr"][:60].tobytes() == plain["head"]["lr"][:60].tobytes()
    assert not np.allclose(ours["head"]["lr"][60:], plain["head"]["lr"][60:])
    # A window that starts inside the amended span is the same as the long one's tail.
    tail = amended.evaluate({}, 75, 20)
    assert tail["head"]["lr"].tobytes() == ours["head"]["lr"][75:95].tobytes()


def test_later_amendments_take_precedence_and_chain_their_base_values() -> None:
    spec = _spec(FIRSTS[0])
    a1 = _amend(1, 40, schedule=SECONDS[2], restart=True, base="current")
    a2 = _amend(2, 90, schedule=SECONDS[0], restart=True, base="current")
    ours = timeline(spec, [a1, a2]).evaluate({}, 0, N)
    # torch: cosine to 39, exponential (on its values) to 89, then linear (on those).
    opt = make_optimizer([0.05, 0.5], momentum=[0.9, 0.9])
    parts = []
    for sched_spec, steps in ((FIRSTS[0], 40), (SECONDS[2], 50), (SECONDS[0], N - 90)):
        for group in opt.param_groups:
            group.pop("initial_lr", None)
        parts.append(run_torch(opt, build_torch(sched_spec, opt), steps)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            opt.step()
    lr = np.concatenate(parts, axis=1)
    for i, name in enumerate(("backbone", "head")):
        assert_matches(ours[name]["lr"], lr[i])


def test_a_plateau_in_an_amendment_starts_fresh_and_sees_reports_from_from_step() -> None:
    spec = _spec({"type": "ExponentialLR", "gamma": 0.99})
    plateau = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 1, "factor": 0.5}
    amended = timeline(spec, [_amend(1, 20, schedule=plateau, restart=True, base="current")])
    rng = np.random.default_rng(7)
    losses = list(1.0 + rng.random(N))
    state = amended.initial_state()
    for step in range(N - 1):
        state, _ = amended.observe(state, step, {"loss": losses[step]})
    ours = amended.evaluate(state, 0, N)
    # torch: ExponentialLR for steps 0..19, then ReduceLROnPlateau on those values, fed the
    # losses of steps 20.. (a report at s decides the lr of s + 1).
    opt = make_optimizer([0.05, 0.5], momentum=[0.9, 0.9])
    exp = torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)
    lr = np.empty((2, N))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for step in range(20):
            lr[:, step] = [g["lr"] for g in opt.param_groups]
            if step < 19:
                exp.step()
        red = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
        for step in range(20, N):
            lr[:, step] = [g["lr"] for g in opt.param_groups]
            red.step(losses[step])
    for i, name in enumerate(("backbone", "head")):
        assert_matches(ours[name]["lr"], lr[i])


def test_a_param_schedule_amendment_adds_the_field_from_its_step() -> None:
    groups = [{**g, "weight_decay": 0.01} for g in GROUPS_SGD]
    spec = ScheduleSpec.model_validate({"groups": groups, "schedule": FIRSTS[0]})
    wd = {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 10}
    amended = timeline(spec, [_amend(1, 30, param_schedules={"weight_decay": wd}, restart=True)])
    ours = amended.evaluate({}, 0, 60)
    opt = make_optimizer([0.01, 0.01])
    lr, _ = run_torch(opt, build_torch(wd, opt), 30)
    assert (ours["head"]["weight_decay"][:30] == 0.01).all()
    assert_matches(ours["head"]["weight_decay"][30:60], np.concatenate([lr[1], lr[1][-1:]])[:30])
    plain = timeline(spec, []).evaluate({}, 0, 60)
    assert ours["head"]["lr"].tobytes() == plain["head"]["lr"].tobytes()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"group_schedules": {"nope": {"type": "ConstantLR"}}}, InvalidArgument),
        ({"param_schedules": {"eps": {"type": "ConstantLR"}}}, InvalidArgument),
        ({"schedule": {"type": "OneCycleLR", "max_lr": [1, 2, 3], "total_steps": 9}}, SpecError),
    ],
)
def test_an_amendment_that_does_not_fit_the_run_is_refused(
    body: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        timeline(_spec(FIRSTS[0]), [_amend(1, 10, **body)]).evaluate({}, 10, 1)


def test_an_amended_scanning_chain_is_priced_from_the_checkpoints_of_its_programs() -> None:
    """Far into a run whose scanning ChainedScheduler was amended (restarted on the current
    values), a window is priced as it is evaluated: the amendment's rebased program from its
    own checkpoints, and the one step of the spec's program before it (the base values)."""
    from service.schedules.cost import WorkLimitExceeded, check_work

    chain = {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "ExponentialLR", "gamma": 0.999999},
            {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-5},
        ],
    }
    start = 60_000
    amendment = _amend(1, start, restart=True, base="current", schedule=chain)
    run = timeline(_spec(chain), [amendment])
    far, count = start + 100_000, 1_000
    cold = run.work(far, count)
    # Nothing computed yet: the spec's program scans to the amendment, the amendment's from
    # its start, about what the cold price says.
    assert run.resumed_work(far, count, {}) > cold / 2
    values = run.evaluate({}, far, count)
    resumed = run.resumed_work(far, count, {})
    assert resumed < cold / 20
    budget = (resumed + cold) // 2
    with pytest.raises(WorkLimitExceeded):
        check_work(run, far, count, budget, "this window")
    assert check_work(run, far, count, budget, "w", resume=True, state={}) == resumed
    # The timeline built again over the same spec program (compiled programs are shared in
    # a process) prices and evaluates the same: the rebased program is the one compiled.
    again = timeline(_spec(chain), [amendment], run.base)
    assert again.resumed_work(far, count, {}) == resumed
    for group, fields in again.evaluate({}, far, count).items():
        for name, series in fields.items():
            assert np.array_equal(series, values[group][name])


def test_current_values_a_spec_refuses_are_named_by_group_and_value() -> None:
    """An amendment on the current values, where those values are not valid base values (a
    lambda that went negative): refused with the groups, fields and values, and what to do
    instead; not pydantic's report (with its links) verbatim."""
    first = {"type": "LambdaLR", "lr_lambda": "1 - epoch / 50"}
    amendment = _amend(1, 101, restart=True, base="current", schedule=FIRSTS[2])
    run = timeline(_spec(first), [amendment])
    expected = run.evaluate({}, 100, 1)  # (the steps before the amendment: the spec's own)
    with pytest.raises(SpecError) as caught:
        run.evaluate({}, 101, 1)
    message = str(caught.value)
    for group in ("backbone", "head"):
        assert f"group {group!r} lr = {float(expected[group]['lr'][0])!r}" in message
    assert 'base "initial"' in message and "http" not in message
