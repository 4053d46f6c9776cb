"""``service.schedules.horizon``: where a schedule's definition says it ends (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.runs.listing import run_horizon, run_status, run_tags, search_text
from service.schedules.horizon import horizon
from service.schedules.spec import schedule_adapter

WARMUP = {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500}
COSINE = {"type": "CosineAnnealingLR", "T_max": 9500}


def h(node: dict[str, Any]) -> int | None:
    return horizon(schedule_adapter.validate_python(node))


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 1234}, 1234),
        ({"type": "OneCycleLR", "max_lr": 0.1, "epochs": 3, "steps_per_epoch": 100}, 300),
        (COSINE, 9500),
        (WARMUP, 500),
        ({"type": "PolynomialLR", "total_iters": 40}, 40),
        ({"type": "ConstantLR", "factor": 0.5, "total_iters": 7}, 7),
        # Constant from step 0: no end known (0 would call every run finished at once).
        ({"type": "ConstantLR", "factor": 1.0, "total_iters": 0}, None),
        ({"type": "SequentialLR", "schedulers": [WARMUP, COSINE], "milestones": [500]}, 10000),
        (
            {
                "type": "SequentialLR",
                "schedulers": [WARMUP, {"type": "ExponentialLR", "gamma": 0.9}],
                "milestones": [500],
            },
            None,
        ),
        ({"type": "ChainedScheduler", "schedulers": [WARMUP, COSINE]}, 9500),
        (
            {
                "type": "ChainedScheduler",
                "schedulers": [WARMUP, {"type": "StepLR", "step_size": 10}],
            },
            None,
        ),
        (
            {
                "type": "transformers.get_cosine_schedule_with_warmup",
                "num_warmup_steps": 10,
                "num_training_steps": 777,
            },
            777,
        ),
        (
            {
                "type": "optax.warmup_cosine_decay_schedule",
                "init_value": 0.0,
                "peak_value": 1.0,
                "warmup_steps": 10,
                "decay_steps": 300,
            },
            300,
        ),
        (
            {
                "type": "optax.linear_schedule",
                "init_value": 1.0,
                "end_value": 0.0,
                "transition_steps": 50,
                "transition_begin": 20,
            },
            70,
        ),
        (
            {
                "type": "keras.CosineDecay",
                "initial_learning_rate": 0.1,
                "decay_steps": 1000,
                "warmup_steps": 100,
                "warmup_target": 0.2,
            },
            1100,
        ),
        (
            {
                "type": "keras.ExponentialDecay",
                "initial_learning_rate": 0.1,
                "decay_steps": 10,
                "decay_rate": 0.9,
            },
            None,
        ),
        ({"type": "StepLR", "step_size": 10}, None),
        ({"type": "ExponentialLR", "gamma": 0.99}, None),
        ({"type": "CosineAnnealingWarmRestarts", "T_0": 10}, None),
        ({"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1}, None),
        ({"type": "ReduceLROnPlateau", "metric": "val_loss"}, None),
        ({"type": "LRRangeTest", "num_iter": 100}, 100),
    ],
)
def test_horizon_of_specs(node: dict[str, Any], expected: int | None) -> None:
    assert h(node) == expected


def _spec(**kw: Any) -> str:
    spec = {
        "groups": [{"name": "backbone", "lr": 0.1}, {"name": "head", "lr": 0.1}],
        "schedule": COSINE,
        "group_schedules": {},
        "metadata": {},
        **kw,
    }
    return json.dumps(spec, sort_keys=True)


def test_run_horizon_is_the_longest_known_group_schedule() -> None:
    plateau = {"type": "ReduceLROnPlateau", "metric": "loss"}
    assert run_horizon(_spec()) == 9500
    # The head's plateau has no end; the backbone's cosine has: that one.
    assert run_horizon(_spec(group_schedules={"head": plateau})) == 9500
    assert run_horizon(_spec(schedule=plateau)) is None
    # metadata.total_steps (a positive integer) wins.
    assert run_horizon(_spec(metadata={"total_steps": 123})) == 123
    for junk in (0, -5, 1.5, True, "100"):
        assert run_horizon(_spec(metadata={"total_steps": junk})) == 9500


def test_amendments_move_the_horizon() -> None:
    cooldown = {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 800}
    restart = [{"n": 1, "from_step": 4000, "schedule": cooldown, "restart": True}]
    assert run_horizon(_spec(), json.dumps(restart)) == 4800
    absolute = [{"n": 1, "from_step": 4000, "schedule": cooldown, "restart": False}]
    assert run_horizon(_spec(), json.dumps(absolute)) == 800
    # Only the head amended, to something unbounded: the backbone's cosine still ends.
    head = [
        {
            "n": 1,
            "from_step": 10,
            "group_schedules": {"head": {"type": "StepLR", "step_size": 3}},
            "restart": True,
        }
    ]
    assert run_horizon(_spec(), json.dumps(head)) == 9500


def test_status_rule() -> None:
    base: dict[str, Any] = {
        "finished": False,
        "horizon": 100,
        "completed_step": 50,
        "last_report_at": "2026-01-01T00:00:10.000000Z",
        "heartbeat_at": None,
        "active_since": "2026-01-01T00:00:05.000000Z",
    }
    assert run_status(**base) == "running"
    assert run_status(**{**base, "active_since": "2026-01-01T00:00:11.000000Z"}) == "idle"
    assert (
        run_status(
            **{
                **base,
                "heartbeat_at": "2026-01-01T00:00:12.000000Z",
                "active_since": "2026-01-01T00:00:11.000000Z",
            }
        )
        == "running"
    )
    assert run_status(**{**base, "completed_step": 99}) == "finished"
    assert run_status(**{**base, "completed_step": 98}) == "running"
    assert run_status(**{**base, "finished": True}) == "finished"
    assert run_status(**{**base, "horizon": None, "completed_step": 10**9}) == "running"
    assert run_status(**{**base, "last_report_at": None}) == "idle"


def test_tags_and_search_text() -> None:
    assert run_tags({"tags": ["a", 1, "b", "a", ""], "tag": "c"}) == ["a", "b", "c"]
    assert run_tags({"tags": "not-a-list", "tag": 5}) == []
    text = search_text("Run-1", {"Owner": "Ada\nLovelace", "n": [1, {"x": True}], "z": None})
    assert text.split("\n") == ["run-1", "ada lovelace", "1", "true"]
