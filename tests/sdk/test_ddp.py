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


@pytest.mark.slow
def test_chief_mode_combines_metrics_as_the_server_does(live_server: Any, tmp_path: Path) -> None:
    """Rank 0's combination of the ranks' metrics (None, NaN, ±inf, names some ranks lack)
    is what the server would have computed from the same reports, sent in the wire form."""
    import json
    import math

    from lrserve import Client

    from tests.sdk.chief_metrics_script import MODES, ROWS
    from tests.sdk.torch_support import run_python, server_aggregate

    cfg = {"url": live_server.url, "world_size": 3, "out": str(tmp_path / "rank{rank}.json")}
    script = Path(__file__).with_name("chief_metrics_script.py")
    proc = run_python(script, json.dumps(cfg), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r, s in enumerate(seen):
        assert all(s["answers"]) and s["after"], (r, s)
        bad_value, refused = s["errors"]
        assert bad_value is not None and "'val_loss'" in bad_value, (r, bad_value)
        if r != 1:
            assert "rank 1" in bad_value, bad_value
        assert refused is not None and "ValidationError" in refused, (r, refused)

    wire = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

    def decode(v: Any) -> Any:
        return wire.get(v, v) if isinstance(v, str) else v

    names = sorted({k for row in ROWS for values in row for k in values})
    with Client(live_server.url) as client:
        for mode in MODES:
            stored: dict[int, dict[str, Any]] = {}
            for name in names:
                for p in client.get_metrics(f"chief-{mode}", name)["points"]:
                    assert p["rank"] == 0
                    stored.setdefault(p["step"], {})[name] = decode(p["value"])
            for i, row in enumerate(ROWS):
                expected = server_aggregate(list(enumerate(row)), mode)
                got = stored.get(i + 1, {})
                assert got.keys() == expected.keys(), (mode, i, got, expected)
                for k, e in expected.items():
                    g = got[k]
                    same = g == e or (
                        e is not None and g is not None and math.isnan(e) and math.isnan(g)
                    )
                    assert same, (mode, i, k, g, e)
