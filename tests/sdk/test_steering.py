"""Steering a run while RemoteSchedulers train on it, and resuming from older checkpoints.

Real gloo processes, a live server, torch as the oracle. The exact-step guarantee: every rank
applies an override or amendment from exactly the step the server records, or the post is
refused with ``too-late`` and accepted at the ``earliest_step`` it named.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import lrserve
import pytest
import torch
from lrserve.torch import RemoteScheduler

from tests.sdk.torch_support import (
    TWO_GROUP_SPEC,
    assert_same,
    load_seen,
    trainer,
    two_group_expected,
)

STEPS = 600


def _post_until_accepted(
    c: httpx.Client, path: str, body: dict[str, Any], log: list[dict[str, Any]]
) -> int:
    """Post ``body``; on too-late, post it again from the step the server named."""
    r = c.post(path, json=body)
    asked = body["from_step"]
    if r.status_code == 409:
        problem = r.json()
        assert problem["type"] == "/problems/too-late", r.text
        assert problem["earliest_step"] > asked
        body = {**body, "from_step": problem["earliest_step"]}
        r = c.post(path, json=body)
    assert r.status_code == 201, r.text
    log.append({"path": path, "asked": asked, "accepted": body["from_step"]})
    return int(body["from_step"])


def _wait_for_step(c: httpx.Client, run: str, step: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        r = c.get(f"/v1/runs/{run}")
        if r.status_code == 200 and (r.json()["step"] or 0) >= step:
            return int(r.json()["step"])
        time.sleep(0.02)
    raise AssertionError(f"the trainer did not reach step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("chief", [False, True], ids=["every-rank", "chief"])
def test_changes_posted_a_few_steps_ahead_apply_at_exactly_the_recorded_step(
    live_server: Any, tmp_path: Path, chief: bool
) -> None:
    run = f"steer-{'chief' if chief else 'all'}"
    cfg = {
        "url": live_server.url,
        "run": run,
        "spec": TWO_GROUP_SPEC,
        "steps": STEPS,
        "report_every": 20,
        "world_size": 2,
        "chief": chief,
        "window": 64,
        "sync_every": 16,
        "step_sleep": 0.002,
        "out": str(tmp_path / "rank{rank}.json"),
    }
    failure: list[BaseException] = []

    def train() -> None:
        try:
            trainer(cfg, timeout=300)
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    posted: list[dict[str, Any]] = []
    deadline = time.monotonic() + 240
    with live_server.client() as c:
        now = _wait_for_step(c, run, 60, deadline)
        scale = {"from_step": now + 3, "action": "scale", "value": 0.5, "groups": ["backbone"]}
        first = _post_until_accepted(c, f"/v1/runs/{run}/overrides", scale, posted)
        now = _wait_for_step(c, run, first + 10, deadline)
        cooldown = {
            "from_step": now + 3,
            "schedule": {
                "type": "LinearLR",
                "start_factor": 1.0,
                "end_factor": 0.1,
                "total_iters": 200,
            },
            "restart": True,
            "base": "current",
            "note": "cooldown now",
        }
        second = _post_until_accepted(c, f"/v1/runs/{run}/amendments", cooldown, posted)
        assert second < STEPS - 50, posted
    # A few steps ahead is inside the trainers' leases: refused, then accepted where named.
    assert all(p["accepted"] > p["asked"] for p in posted), posted
    thread.join(300)
    assert not failure, failure
    seen = [load_seen(tmp_path / f"rank{r}.json") for r in range(2)]
    with live_server.client() as c:
        record = c.get(
            f"/v1/runs/{run}/lr", params={"start": 0, "count": STEPS + 1, "lease": "false"}
        ).json()["groups"]
    for s in range(STEPS + 1):
        served = [[record[g]["lr"][s], record[g]["momentum"][s]] for g in ("backbone", "head")]
        for r in range(2):
            assert seen[r][s] == served, f"rank {r} at step {s}: {seen[r][s]} != {served}"
    # The changes are in the record from the accepted steps (torch's values before them).
    expected = two_group_expected(STEPS, 20, 2)
    for s in range(first):
        assert_same(seen[0][s], expected[s], f"step {s}")
    assert seen[0][first][0][0] == pytest.approx(0.5 * expected[first][0][0], rel=1e-12)
    assert seen[0][first - 1][0][0] == pytest.approx(expected[first - 1][0][0], rel=1e-12)
    assert seen[0][second][1][0] == seen[0][second - 1][1][0]  # current base, factor 1.0
    assert seen[0][STEPS][1][0] < seen[0][second][1][0]
    for r in range(2):
        warned = json.loads((tmp_path / f"rank{r}.json.warnings.json").read_text())
        assert not [w for w in warned if "ignored" in w or "held" in w], warned


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_rewinds_once_and_forgets_the_later_steps(
    live_server: Any, tmp_path: Path
) -> None:
    common = {"url": live_server.url, "run": "resume-old", "report_every": 10}
    ckpt = tmp_path / "ckpt.pt"
    trainer(
        {
            **common,
            "spec": TWO_GROUP_SPEC,
            "steps": 100,
            "save": str(ckpt),
            "out": str(tmp_path / "a.json"),
        }
    )
    # The job goes on from the checkpoint and diverges (its losses jump at step 110)...
    trainer(
        {
            **common,
            "spec": None,
            "steps": 200,
            "load": str(ckpt),
            "spike_from": 110,
            "out": str(tmp_path / "b.json"),
        }
    )
    with live_server.client() as c:
        diverged = c.get("/v1/runs/resume-old").json()
    assert diverged["completed_step"] == 190  # (the last report: step 190)
    # ... so it is restarted from the checkpoint at step 100, in a new process.
    trainer(
        {**common, "spec": None, "steps": 300, "load": str(ckpt), "out": str(tmp_path / "c.json")}
    )
    first, third = load_seen(tmp_path / "a.json"), load_seen(tmp_path / "c.json")
    expected = two_group_expected(300, 10, 1)
    for s in range(301):
        assert_same((first if s <= 100 else third)[s], expected[s], f"step {s}")
    warned = json.loads((tmp_path / "c.json.warnings.json").read_text())
    assert not [w for w in warned if "ignored" in w], warned
    assert len([w for w in warned if "rewound to step 100" in w]) == 1, warned
    with live_server.client() as c:
        run = c.get("/v1/runs/resume-old").json()
        history = c.get("/v1/runs/resume-old/metrics", params={"name": "val_loss"}).json()
    assert run["branch"] == 1 and [r["to_step"] for r in run["rewinds"]] == [100]
    assert {p["step"] for p in history["abandoned"]} == set(range(110, 200, 10))
    assert all(p["value"] > 10 for p in history["abandoned"])
    assert all(p["value"] < 10 for p in history["points"])


def test_rewind_false_refuses_an_older_checkpoint_and_says_why(live_server: Any) -> None:
    spec = {"schedule": {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0}}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with RemoteScheduler(opt, "no-rewind", url=live_server.url, spec=spec) as sched:
        state = sched.state_dict()
        for _ in range(5):
            sched.step()
            sched.report({"loss": 1.0})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with (
        RemoteScheduler(opt, "no-rewind", url=live_server.url, rewind=False) as sched,
        pytest.raises(lrserve.UsageError, match="rewind=True"),
    ):
        sched.load_state_dict(state)
    with lrserve.Client(live_server.url) as client:
        assert client.get_run("no-rewind")["rewinds"] == []
