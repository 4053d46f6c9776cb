"""The one piecewise composite (SequentialLR, optax.join_schedules, optax's own joins).

torch is the oracle: momentum follows one rule in every piecewise schedule (a cycling child
cycles it in its segment; a later non-cycling segment holds the last cycled value, exactly as
torch's SequentialLR does), so optax.join_schedules with a OneCycleLR child must cycle momentum
the way torch's OneCycleLR does in that segment.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.schedules import Program, ScheduleSpec, SpecError
from service.schedules.base import CompileContext, GroupBase
from service.schedules.spec import schedule_adapter
from tests.schedules.conftest import (
    assert_matches,
    build_torch,
    make_optimizer,
    run_torch,
    torch_values,
)

LRS = [0.1, 0.02]
ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.05, "total_steps": 300}
WARMUP = {"type": "optax.linear_schedule", "init_value": 0.0, "end_value": 0.1,
          "transition_steps": 100}  # fmt: skip
JOIN = {
    "type": "optax.join_schedules",
    "schedules": [WARMUP, ONE_CYCLE, {"type": "optax.constant_schedule"}],
    "boundaries": [100, 400],
}
N = 600


def _groups(betas: bool) -> list[dict[str, Any]]:
    extra: dict[str, Any] = {"betas": [0.9, 0.999]} if betas else {"momentum": 0.9}
    return [{"name": f"g{i}", "lr": lr, **extra} for i, lr in enumerate(LRS)]


def _torch_kw(betas: bool) -> dict[str, Any]:
    return {"betas": (0.9, 0.999)} if betas else {"momentum": 0.9}


def _ours(schedule: dict[str, Any], betas: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    program = Program(ScheduleSpec.model_validate({"groups": _groups(betas), "schedule": schedule}))
    field = "beta1" if betas else "momentum"
    values = program.evaluate(None, 0, n)
    names = program.group_names
    return (
        np.stack([values[g]["lr"] for g in names]),
        np.stack([values[g][field] for g in names]),
    )


@pytest.mark.parametrize("betas", [False, True], ids=["momentum", "betas"])
def test_join_cycles_momentum_like_torch(betas: bool) -> None:
    """Regression: optax.join_schedules dropped a OneCycleLR child's momentum (held 0.9)."""
    lr, mom = _ours(JOIN, betas, N)
    # The OneCycleLR segment is torch's OneCycleLR in its own time, lr and momentum.
    opt = make_optimizer(LRS, **_torch_kw(betas))
    one_lr, one_mom = run_torch(opt, build_torch(ONE_CYCLE, opt), 300)
    assert_matches(lr[:, 100:400], one_lr)
    assert_matches(mom[:, 100:400], one_mom, what="momentum")
    assert np.ptp(mom[:, 100:400]) > 0.05  # it really cycles
    # From the OneCycleLR segment on, momentum is what torch's SequentialLR does with the same
    # children: cycled, then held at the last cycled value.
    sequential = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.5, "total_iters": 10},
            ONE_CYCLE,
            {"type": "ConstantLR", "factor": 1.0, "total_iters": 0},
        ],
        "milestones": [100, 400],
    }
    _, seq_mom = torch_values(sequential, LRS, N, **_torch_kw(betas))
    assert_matches(mom[:, 100:], seq_mom[:, 100:], what="momentum")
    assert_matches(mom[:, 400:], np.repeat(one_mom[:, -1:], N - 400, axis=1), what="held")
    # Before any cycling segment has run the group keeps its own momentum (documented: optax
    # children write nothing before they run, unlike torch's eagerly built schedulers).
    assert np.all(mom[:, :100] == 0.9)
    # The lr is unchanged: absolute children, each in its own time.
    assert_matches(lr[:, :100], np.outer(np.ones(2), np.arange(100) / 100 * 0.1))
    assert_matches(lr[:, 400:], np.repeat(np.asarray(LRS).reshape(-1, 1), N - 400, axis=1))


def test_join_momentum_conflicts_with_param_schedule() -> None:
    """Like SequentialLR: a cycled momentum cannot also be scheduled by param_schedules."""
    body = {
        "groups": _groups(False),
        "schedule": JOIN,
        "param_schedules": {"momentum": {"type": "optax.constant_schedule", "value": 0.8}},
    }
    with pytest.raises(SpecError, match="already has its momentum cycled"):
        Program(ScheduleSpec.model_validate(body))


@pytest.mark.parametrize("betas", [False, True], ids=["momentum", "betas"])
def test_sequential_momentum_with_an_empty_segment_and_two_cyclers(betas: bool) -> None:
    """Held momentum skips an empty cycling segment; before any cycler has run it is what the
    last cycling child's constructor wrote (torch builds every child first)."""
    schedule = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "ConstantLR", "factor": 0.5, "total_iters": 10},
            {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 80},  # zero-length segment
            {"type": "StepLR", "step_size": 10, "gamma": 0.5},
            {"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 15},
            {"type": "ExponentialLR", "gamma": 0.99},
        ],
        "milestones": [40, 40, 120, 200],
    }
    theirs_lr, theirs_mom = torch_values(schedule, LRS, 300, **_torch_kw(betas))
    lr, mom = _ours(schedule, betas, 300)
    assert_matches(mom, theirs_mom, what="momentum")
    # lr on the absolute child's segment (torch's OneCycleLR constructor rewrites the other
    # children's base, a documented difference; see test_compose).
    assert_matches(lr[:, 120:200], theirs_lr[:, 120:200])


def test_sequential_many_segments_after_a_cycler() -> None:
    """Momentum held across hundreds of non-cycling segments (used to recurse once per
    segment and hit Python's recursion limit)."""
    n = 700
    schedule = {
        "type": "SequentialLR",
        "schedulers": [{"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 20}]
        + [{"type": "ConstantLR", "factor": 1.0, "total_iters": 0}] * n,
        "milestones": list(range(10, 10 + 2 * n, 2)),
    }
    steps = 2 * n + 20
    _, theirs_mom = torch_values(schedule, [0.1], steps, momentum=0.9)
    program = Program(
        ScheduleSpec.model_validate(
            {"groups": [{"name": "g", "lr": 0.1, "momentum": 0.9}], "schedule": schedule}
        )
    )
    assert_matches(program.evaluate(None, 0, steps)["g"]["momentum"], theirs_mom[0])
    assert program.at(None, steps - 1)["g"]["momentum"] == theirs_mom[0, -1]


def test_unsorted_steps() -> None:
    """Any order of steps gives the sorted evaluation's values (segments grouped either way)."""
    node = schedule_adapter.validate_python(JOIN)
    base = GroupBase(("a", "b"), np.asarray(LRS), np.asarray([0.9, 0.9]))
    curve = node.compile(CompileContext(base=base))
    t = np.arange(N, dtype=np.float64)
    perm = np.random.default_rng(0).permutation(N)
    sorted_lr, sorted_mom = curve.lr(t, {}), curve.momentum(t, {})
    assert sorted_mom is not None
    assert np.array_equal(curve.lr(t[perm], {}), sorted_lr[:, perm])
    assert np.array_equal(curve.momentum(t[perm], {}), sorted_mom[:, perm])


def test_a_window_in_one_segment_is_never_an_array_a_child_keeps() -> None:
    """Within one segment the piecewise composite hands out its child's own array (no copy)
    unless that array is one the child keeps (read-only, as every cached array is): then a
    copy, which the caller may write to. Either way the values are the child's."""
    from service.schedules.base import Curve
    from service.schedules.piecewise import Piecewise

    kept = np.full((2, 50), 0.5)
    kept.setflags(write=False)

    class Kept(Curve):
        n_groups = 2

        def lr(self, t: Any, state: Any) -> Any:
            return kept[:, : len(t)]

    class Fresh(Curve):
        n_groups = 2

        def lr(self, t: Any, state: Any) -> Any:
            return np.outer([1.0, 2.0], np.asarray(t, dtype=np.float64))

    base = GroupBase(names=("a", "b"), lr=np.array([0.1, 0.2]), momentum=np.full(2, np.nan))
    curve = Piecewise(base, [Kept(), Fresh()], [100])
    early = curve.lr(np.arange(0, 50, dtype=np.float64), {})
    assert early.flags.writeable and np.array_equal(early, kept)
    early[:] = 7.0  # the caller's to change: the child's array is untouched
    assert (kept == 0.5).all()
    late = curve.lr(np.arange(100, 150, dtype=np.float64), {})
    assert np.array_equal(late, np.outer([1.0, 2.0], np.arange(0, 50)))
    mixed = curve.lr(np.arange(90, 110, dtype=np.float64), {})
    assert np.array_equal(mixed[:, :10], kept[:, :10]) and mixed[0, 10] == 0.0
