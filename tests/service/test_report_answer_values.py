"""A report's answer carries the values at step + 1 from the block cache GET lr uses (issue 12).

The block is keyed by the run's values version: an override, a plateau reduction or a re-created
run id must each change the values the next report is answered with. torch is the oracle.
"""

from __future__ import annotations

from typing import Any

import httpx
import torch

from tests.conftest import ServerProcess
from tests.service.helpers import close, new_id, torch_lrs

COSINE: dict[str, Any] = {
    "groups": [{"name": "g0", "lr": 0.1, "momentum": 0.9}, {"name": "g1", "lr": 0.02}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 0.0},
}
STEP: dict[str, Any] = {
    "groups": [{"name": "g0", "lr": 0.3}, {"name": "g1", "lr": 0.05}],
    "schedule": {"type": "StepLR", "step_size": 7, "gamma": 0.5},
}
N = 1100  # the answers cross the 1,024-step block edge


def _report(c: httpx.Client, rid: str, step: int) -> dict[str, Any]:
    r = c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"loss": 1.0}})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert answer["applies_from"] == step + 1
    return answer


def _answered(answer: dict[str, Any]) -> list[float]:
    return [answer["groups"]["g0"]["lr"], answer["groups"]["g1"]["lr"]]


def test_answers_follow_an_override_and_a_recreated_run(server: ServerProcess) -> None:
    cosine = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2000, eta_min=0.0),
        [0.1, 0.02],
        N + 1,
    )
    rid = new_id("answer")
    override_from = 600
    with server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=COSINE).status_code == 201
        for step in range(0, 300):
            a = _report(c, rid, step)
            assert close(_answered(a), [cosine[0][step + 1], cosine[1][step + 1]])
        ov = {"from_step": override_from, "action": "scale", "value": 0.5}
        r = c.post(f"/v1/runs/{rid}/overrides", json=ov)
        assert r.status_code == 201, r.text
        for step in range(300, N):
            a = _report(c, rid, step)
            scale = 0.5 if step + 1 >= override_from else 1.0
            want = [scale * cosine[0][step + 1], scale * cosine[1][step + 1]]
            assert close(_answered(a), want), step
            assert a["groups"]["g0"]["momentum"] == 0.9
        # The same id again, another schedule: nothing of the old run's blocks answers.
        assert c.delete(f"/v1/runs/{rid}").status_code in (200, 204)
        assert c.put(f"/v1/runs/{rid}", json=STEP).status_code == 201
        steplr = torch_lrs(
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), [0.3, 0.05], 40
        )
        for step in range(0, 39):
            a = _report(c, rid, step)
            assert close(_answered(a), [steplr[0][step + 1], steplr[1][step + 1]]), step
        # And every answer is what GET lr says for that step (one cache, one truth).
        w = c.get(f"/v1/runs/{rid}/lr", params={"start": 1, "count": 39, "lease": "false"})
        assert close(w.json()["groups"]["g0"]["lr"], steplr[0][1:40])
