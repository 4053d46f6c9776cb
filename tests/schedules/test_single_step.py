"""One-step evaluation (``count=1``), which serves state-independent parts from a memo.

Every answer to a metric report evaluates exactly one step, so ``Program.evaluate(state, s, 1)``
slices the parts without a metric-driven node out of a memoised block. These tests hold it to
torch at every step of a range that crosses block boundaries, in any order, and check that the
memo never leaks state or shares arrays with its callers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.schedules import Program, ScheduleSpec
from tests.schedules.conftest import assert_matches, torch_values

WARMUP_COSINE = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 100},
        {"type": "CosineAnnealingLR", "T_max": 300, "eta_min": 1e-6},
    ],
    "milestones": [100],
}
ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.01, "total_steps": 700}
PLATEAU = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.5}
N = 700  # past two 256-step blocks, and past the cosine's T_max (torch's periodic branch)


def _program(**body: Any) -> Program:
    return Program(ScheduleSpec.model_validate(body))


def _steps() -> list[int]:
    # Block edges, then every step shuffled: the memo must not depend on the order of asks.
    edges = [0, 1, 255, 256, 257, 511, 512, 513, N - 1]
    rng = np.random.default_rng(7)
    return edges + [int(s) for s in rng.permutation(N)]


@pytest.mark.parametrize(
    ("schedule", "momentum_field"),
    [(WARMUP_COSINE, "momentum"), (ONE_CYCLE, "momentum")],
    ids=["warmup-cosine", "one-cycle-momentum"],
)
def test_one_step_matches_torch(schedule: dict[str, Any], momentum_field: str) -> None:
    p = _program(
        groups=[
            {"name": "a", "lr": 1e-3, "momentum": 0.9},
            {"name": "b", "lr": 1e-2, "momentum": 0.9},
        ],
        schedule=schedule,
    )
    lr, mom = torch_values(schedule, [1e-3, 1e-2], N, momentum=0.9)
    state = p.initial_state()
    for s in _steps():
        one = p.evaluate(state, s, 1)
        assert_matches(one["a"]["lr"], lr[0, s : s + 1])
        assert_matches(one["b"]["lr"], lr[1, s : s + 1])
        assert_matches(one["a"][momentum_field], mom[0, s : s + 1], what="momentum")
        assert_matches(one["b"][momentum_field], mom[1, s : s + 1], what="momentum")


def test_one_step_with_a_plateau_group_and_a_param_schedule() -> None:
    """Mixed programs: the plateau part follows the state; the others come from the memo."""
    wd = {"type": "ExponentialLR", "gamma": 0.99}
    p = _program(
        groups=[
            {"name": "backbone", "lr": 1e-3, "weight_decay": 0.1},
            {"name": "head", "lr": 1e-2},
        ],
        schedule=WARMUP_COSINE,
        group_schedules={"head": PLATEAU},
        param_schedules={"weight_decay": wd},
    )
    lr, _ = torch_values(WARMUP_COSINE, [1e-3], N)
    wd_values, _ = torch_values(wd, [0.1], N)
    state = p.initial_state()
    for step in range(5):  # a loss that never improves after the first: a reduction each time
        state, decision = p.observe(state, step, {"loss": 1.0})
    assert decision["reduced"]
    for s in _steps():
        one = p.evaluate(state, s, 1)
        window = p.evaluate(state, s, 2) if s + 1 < N else p.evaluate(state, s - 1, 2)
        k = 0 if s + 1 < N else 1
        assert_matches(one["backbone"]["lr"], lr[0, s : s + 1])
        assert_matches(one["backbone"]["weight_decay"], wd_values[0, s : s + 1], what="wd")
        # The plateau group is evaluated from the state, exactly as a longer window does.
        assert one["head"]["lr"][0] == window["head"]["lr"][k]


def test_one_step_results_are_the_callers_own() -> None:
    p = _program(groups=[{"name": "a", "lr": 1e-3}], schedule=WARMUP_COSINE)
    state = p.initial_state()
    first = p.evaluate(state, 300, 1)
    expected = float(first["a"]["lr"][0])
    first["a"]["lr"][:] = 123.0  # a caller applying an override in place
    again = p.evaluate(state, 300, 1)
    assert float(again["a"]["lr"][0]) == expected
    assert float(p.evaluate(state, 301, 1)["a"]["lr"][0]) != 123.0
