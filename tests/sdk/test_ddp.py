"""Data-parallel training: real gloo processes against a live server, identical values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.sdk.torch_support import (
    TWO_GROUP_SPEC,
    assert_same,
    load_seen,
    trainer,
    two_group_expected,
)

STEPS = 300
REPORT_EVERY = 10


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world_size", "chief"),
    [(2, False), (4, False), (2, True), (3, True)],
    ids=["2", "4", "2-chief", "3-chief"],
)
def test_every_rank_applies_the_same_values_at_every_step(
    live_server: Any, tmp_path: Path, world_size: int, chief: bool
) -> None:
    run = f"ddp-{world_size}-{'chief' if chief else 'all'}"
    trainer(
        {
            "url": live_server.url,
            "run": run,
            "spec": TWO_GROUP_SPEC,
            "steps": STEPS,
            "report_every": REPORT_EVERY,
            "world_size": world_size,
            "chief": chief,
            "window": 64,  # many window changes over the run
            "sync_every": 16,
            "out": str(tmp_path / "rank{rank}.json"),
        }
    )
    seen = [load_seen(tmp_path / f"rank{r}.json") for r in range(world_size)]
    assert sorted(seen[0]) == list(range(STEPS + 1))
    for r in range(1, world_size):
        for s in range(STEPS + 1):
            assert seen[r][s] == seen[0][s], f"rank {r} differs from rank 0 at step {s}"
    # And they are the right values: torch's, with the metric averaged over the ranks.
    expected = two_group_expected(STEPS, REPORT_EVERY, world_size)
    for s in range(STEPS + 1):
        assert_same(seen[0][s], expected[s], f"step {s}")
    assert expected[STEPS][1][0] < 0.01, "the plateau must have reduced the head's rate"


@pytest.mark.slow
def test_chief_mode_attach_failure_reaches_every_rank(live_server: Any, tmp_path: Path) -> None:
    """Rank 0 cannot attach (a different spec under the same run id): no rank may hang."""
    with live_server.client() as client:
        other = {
            "groups": [{"name": "backbone", "lr": 0.5}, {"name": "head", "lr": 0.5}],
            "schedule": {"type": "StepLR", "step_size": 7},
        }
        assert client.put("/v1/runs/ddp-conflict", json=other).status_code == 201
    trainer(
        {
            "url": live_server.url,
            "run": "ddp-conflict",
            "spec": TWO_GROUP_SPEC,
            "steps": 10,
            "report_every": 5,
            "world_size": 2,
            "chief": True,
            "expect_attach_error": True,
            "out": str(tmp_path / "rank{rank}.json"),
        },
        timeout=120,
    )
    import json

    errors = [json.loads((tmp_path / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert errors[0].startswith("RunConflictError"), errors[0]
    assert "rank 0 could not attach" in errors[1] and "RunConflictError" in errors[1], errors[1]
