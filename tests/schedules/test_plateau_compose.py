"""ReduceLROnPlateau inside SequentialLR and ChainedScheduler (torch itself refuses both).

lrserve's definition (docs/schedules.md, "Plateau in compositions") is checked against torch
stepping real schedulers on a real optimizer:

- SequentialLR: the plateau child behaves like a torch ReduceLROnPlateau on an optimizer
  whose lr was reset to the base at the milestone (what SequentialLR does to any child),
  fed only the reports for steps inside its segment.
- ChainedScheduler: torch's ``ChainedScheduler.step()`` calls each child's ``step()`` in
  order; the plateau acts as if ``ReduceLROnPlateau.step(metric)`` were called at its place in
  that order, on the same optimizer, in the pass for step ``s + 1`` after a report at ``s``.
  torch allows calling ``ReduceLROnPlateau.step`` on an optimizer that other schedulers also
  step, so the oracle interleaves it by hand.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.schedules import Program, ScheduleSpec
from tests.schedules.conftest import assert_matches, make_optimizer

sched_mod = torch.optim.lr_scheduler
# torch's "lr_scheduler.step() before optimizer.step()" warning: no optimizer steps here.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
EXAMPLES = settings(max_examples=60, deadline=None)


def make_program(schedule: dict[str, Any], lrs: list[float]) -> Program:
    groups = [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(lrs)]
    return Program(ScheduleSpec.model_validate({"groups": groups, "schedule": schedule}))


def lr_matrix(program: Program, state: Any, start: int, count: int) -> np.ndarray:
    values = program.evaluate(state, start=start, count=count)
    return np.stack([values[name]["lr"] for name in program.group_names])


def group_lrs(opt: torch.optim.Optimizer) -> np.ndarray:
    return np.array([float(g["lr"]) for g in opt.param_groups])


def rop_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("type", "metric")}


_value = st.one_of(
    st.sampled_from([1.0, 1.0, 0.9, 0.5, 2.0, float("nan")]), st.floats(0, 3, allow_nan=False)
)


@st.composite
def rop_specs(draw: st.DrawFn, groups: int) -> dict[str, Any]:
    min_lr: Any = draw(
        st.one_of(
            st.sampled_from([0.0, 0.05, 0.3]),
            st.lists(st.sampled_from([0.0, 0.02, 0.2, 0.45]), min_size=groups, max_size=groups),
        )
    )
    return {
        "type": "ReduceLROnPlateau",
        "metric": "loss",
        "mode": draw(st.sampled_from(["min", "max"])),
        "factor": draw(st.sampled_from([0.5, 0.1, 0.8])),
        "patience": draw(st.integers(0, 2)),
        "threshold": draw(st.sampled_from([0.0, 1e-4, 0.05])),
        "threshold_mode": draw(st.sampled_from(["rel", "abs"])),
        "cooldown": draw(st.integers(0, 2)),
        "min_lr": min_lr,
        "eps": draw(st.sampled_from([1e-8, 0.0, 0.01])),
    }


@EXAMPLES
@given(st.data(), st.integers(1, 3), st.integers(1, 12))
def test_plateau_after_a_warmup_in_sequential(
    data: st.DataObject, groups: int, milestone: int
) -> None:
    lrs = [1.0, 0.5, 0.8][:groups]
    rop = data.draw(rop_specs(groups))
    warm = {"type": "LinearLR", "start_factor": 0.1, "total_iters": milestone}
    program = make_program(
        {"type": "SequentialLR", "schedulers": [warm, rop], "milestones": [milestone]}, lrs
    )
    stream = data.draw(st.lists(_value, min_size=1, max_size=40))
    n = len(stream) + 1

    # torch: the warmup on one optimizer; the plateau on an optimizer at the base lr (the
    # reset SequentialLR performs at the milestone), seeing only reports from its segment.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_w = make_optimizer(lrs)
        linear = sched_mod.LinearLR(opt_w, start_factor=0.1, total_iters=milestone)
        opt_p = make_optimizer(lrs)
        plateau = sched_mod.ReduceLROnPlateau(opt_p, **rop_kwargs(rop))
    expected = np.empty((groups, n))
    for t in range(n):
        if t > 0:
            linear.step()
        if t < milestone:
            expected[:, t] = group_lrs(opt_w)

    state = program.initial_state()
    for s, value in enumerate(stream):
        state, decision = program.observe(state, s, {"loss": value})
        if s >= milestone:
            before = group_lrs(opt_p)
            plateau.step(value)
            assert decision["reduced"] == bool(np.any(group_lrs(opt_p) != before))
        else:
            assert decision["nodes"] == []  # outside its segment the plateau sees nothing
        if s + 1 >= milestone:
            expected[:, s + 1] = group_lrs(opt_p)
        assert_matches(lr_matrix(program, state, s + 1, 1)[:, 0], expected[:, s + 1])
    assert_matches(lr_matrix(program, state, 0, n), expected)


@EXAMPLES
@given(st.data(), st.integers(1, 3), st.integers(1, 25))
def test_plateau_then_decay_in_sequential(data: st.DataObject, groups: int, milestone: int) -> None:
    lrs = [1.0, 0.5, 0.8][:groups]
    rop = data.draw(rop_specs(groups))
    decay = {"type": "ExponentialLR", "gamma": 0.9}
    program = make_program(
        {"type": "SequentialLR", "schedulers": [rop, decay], "milestones": [milestone]}, lrs
    )
    stream = data.draw(st.lists(_value, min_size=1, max_size=40))
    n = len(stream) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_p = make_optimizer(lrs)
        plateau = sched_mod.ReduceLROnPlateau(opt_p, **rop_kwargs(rop))
        opt_d = make_optimizer(lrs)
        exp = sched_mod.ExponentialLR(opt_d, gamma=0.9)
    expected = np.empty((groups, n))
    expected[:, 0] = lrs
    decay_values = [group_lrs(opt_d)]
    for _ in range(n):
        exp.step()
        decay_values.append(group_lrs(opt_d))
    state = program.initial_state()
    for s, value in enumerate(stream):
        state, _ = program.observe(state, s, {"loss": value})
        if s < milestone:
            plateau.step(value)
    # Replay for the expected curve: reports up to milestone - 1 shape [0, milestone).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_r = make_optimizer(lrs)
        replay = sched_mod.ReduceLROnPlateau(opt_r, **rop_kwargs(rop))
    for t in range(n):
        if t >= milestone:
            expected[:, t] = decay_values[t - milestone]
        elif t > 0:
            replay.step(stream[t - 1])
            expected[:, t] = group_lrs(opt_r)
    assert_matches(lr_matrix(program, state, 0, n), expected)


@EXAMPLES
@given(st.data(), st.integers(1, 3))
def test_plateau_first_in_chain_matches_rop_between_chain_steps(
    data: st.DataObject, groups: int
) -> None:
    """Oracle: torch's real ChainedScheduler([ExponentialLR, StepLR]) with
    ReduceLROnPlateau.step(metric) called between two chain steps after each report."""
    lrs = [1.0, 0.5, 0.8][:groups]
    rop = data.draw(rop_specs(groups))
    gamma = data.draw(st.sampled_from([0.97, 1.0]))
    children = [
        {"type": "ExponentialLR", "gamma": gamma},
        {"type": "StepLR", "step_size": 7, "gamma": 0.5},
    ]
    program = make_program({"type": "ChainedScheduler", "schedulers": [rop, *children]}, lrs)
    stream = data.draw(st.lists(st.one_of(_value, st.none()), min_size=1, max_size=40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(lrs)
        plateau = sched_mod.ReduceLROnPlateau(opt, **rop_kwargs(rop))
        chain = sched_mod.ChainedScheduler(
            [sched_mod.ExponentialLR(opt, gamma=gamma), sched_mod.StepLR(opt, 7, gamma=0.5)],
            optimizer=opt,
        )
    n = len(stream) + 1
    expected = np.empty((groups, n))
    expected[:, 0] = group_lrs(opt)
    state = program.initial_state()
    for s, value in enumerate(stream):
        if value is not None:
            state, decision = program.observe(state, s, {"loss": value})
            before = group_lrs(opt)
            plateau.step(value)
            assert decision["reduced"] == bool(np.any(group_lrs(opt) != before))
        chain.step()
        expected[:, s + 1] = group_lrs(opt)
        assert_matches(lr_matrix(program, state, s + 1, 1)[:, 0], expected[:, s + 1])
    assert_matches(lr_matrix(program, state, 0, n), expected)


@EXAMPLES
@given(st.data(), st.integers(1, 3), st.integers(0, 2))
def test_plateau_inside_chain_matches_interleaved_torch(
    data: st.DataObject, groups: int, position: int
) -> None:
    """Oracle: each child's step() in chain order (what ChainedScheduler.step does), with
    ReduceLROnPlateau.step(metric) at the plateau's position in the pass for step s + 1."""
    lrs = [1.0, 0.5, 0.8][:groups]
    rop = data.draw(rop_specs(groups))
    others = [
        {"type": "ExponentialLR", "gamma": 0.95},
        {"type": "MultiStepLR", "milestones": [3, 9, 9], "gamma": 0.7},
    ]
    nodes = [*others[:position], rop, *others[position:]]
    program = make_program({"type": "ChainedScheduler", "schedulers": nodes}, lrs)
    stream = data.draw(st.lists(st.one_of(_value, st.none()), min_size=1, max_size=30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(lrs)
        torch_children: list[Any] = []
        for node in nodes:  # constructed in list order, as a user builds a chain
            if node["type"] == "ReduceLROnPlateau":
                torch_children.append(sched_mod.ReduceLROnPlateau(opt, **rop_kwargs(node)))
            elif node["type"] == "ExponentialLR":
                torch_children.append(sched_mod.ExponentialLR(opt, gamma=0.95))
            else:
                torch_children.append(sched_mod.MultiStepLR(opt, [3, 9, 9], gamma=0.7))
    n = len(stream) + 1
    expected = np.empty((groups, n))
    expected[:, 0] = group_lrs(opt)
    state = program.initial_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, value in enumerate(stream):
            if value is not None:
                state, _ = program.observe(state, s, {"loss": value})
            for child in torch_children:
                if isinstance(child, sched_mod.ReduceLROnPlateau):
                    if value is not None:
                        child.step(value)
                else:
                    child.step()
            expected[:, s + 1] = group_lrs(opt)
            assert_matches(lr_matrix(program, state, s + 1, 1)[:, 0], expected[:, s + 1])
    assert_matches(lr_matrix(program, state, 0, n), expected)


def test_chain_decision_uses_the_chain_value() -> None:
    """min_lr binds on the chain's value just before the plateau (StepLR has quartered the
    lr to 0.25 by step 4), not on the plateau's own base: old 0.25 -> max(0.025, 0.1) = 0.1,
    a ratio of 0.4, exactly as torch clips it."""
    rop = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.1}
    rop["min_lr"] = 0.1
    step_lr = {"type": "StepLR", "step_size": 2, "gamma": 0.5}
    program = make_program({"type": "ChainedScheduler", "schedulers": [step_lr, rop]}, [1.0])
    state = program.initial_state()
    state, _ = program.observe(state, 2, {"loss": 1.0})
    state, decision = program.observe(state, 3, {"loss": 1.0})
    assert decision["reduced"]
    assert decision["nodes"][0]["factor"] == [0.4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer([1.0])
        step = sched_mod.StepLR(opt, 2, gamma=0.5)
        plateau = sched_mod.ReduceLROnPlateau(opt, patience=0, factor=0.1, min_lr=0.1)
        expected = [group_lrs(opt)[0]]
        for t in range(1, 8):
            step.step()
            if t in (3, 4):  # the passes after the reports at steps 2 and 3
                plateau.step(1.0)
            expected.append(group_lrs(opt)[0])
    assert expected[4] == 0.1
    assert_matches(lr_matrix(program, state, 0, 8), np.array([expected]))
