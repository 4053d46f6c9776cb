"""Steering a live run over HTTP, on both databases: amendments, rewinds, the lease.

torch is the oracle: an amended run equals torch switching schedulers at the amendment's step;
a rewound run equals torch's ReduceLROnPlateau fed only the kept reports and the new branch.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import httpx
import numpy as np
import torch

from service.runs.model import LEASE_GRAIN
from tests.conftest import ServerProcess
from tests.service.helpers import close, new_id, plateau_spec

COSINE: dict[str, Any] = {
    "groups": [{"name": "g0", "lr": 0.1, "momentum": 0.9}, {"name": "g1", "lr": 0.02}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 0.0},
}
COOLDOWN = {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 300}


def _lrs(c: httpx.Client, rid: str, start: int, count: int) -> dict[str, list[float]]:
    """The server's record (an inspection read: not leased)."""
    r = c.get(f"/v1/runs/{rid}/lr", params={"start": start, "count": count, "lease": "false"})
    assert r.status_code == 200, r.text
    return {g: v["lr"] for g, v in r.json()["groups"].items()}


def _torch_cosine_then(n: int, switch: int) -> list[list[float]]:
    """torch: cosine until switch - 1, then LinearLR built on the optimizer's values."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.02}])
    sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2000, eta_min=0.0)
    out = [[g["lr"] for g in opt.param_groups]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for step in range(1, n):
            opt.step()
            if step == switch:
                for g in opt.param_groups:
                    del g["initial_lr"]
                sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=300)
            else:
                sched.step()
            out.append([g["lr"] for g in opt.param_groups])
    return [list(col) for col in zip(*out, strict=True)]


def test_an_amendment_takes_effect_exactly_at_its_step(server: ServerProcess) -> None:
    rid = new_id("amend")
    with server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=COSINE).status_code == 201
        before = _lrs(c, rid, 0, 1200)
        # A trainer takes a window: values up to 300 are now its; the lease rounds up.
        assert c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 300}).status_code == 200
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["leased_until"] >= 300
        body = {"from_step": 200, "schedule": COOLDOWN, "restart": True, "base": "current"}
        late = c.post(f"/v1/runs/{rid}/amendments", json=body)
        assert late.status_code == 409, late.text
        problem = late.json()
        assert problem["type"] == "/problems/too-late"
        assert problem["earliest_step"] == run["leased_until"] + LEASE_GRAIN
        assert str(problem["earliest_step"]) in problem["detail"]
        assert c.get(f"/v1/runs/{rid}").json()["version"] == run["version"]  # nothing changed

        body["from_step"] = start = problem["earliest_step"]
        made = c.post(f"/v1/runs/{rid}/amendments", json={**body, "note": "cooldown"})
        assert made.status_code == 201, made.text
        again = c.post(f"/v1/runs/{rid}/amendments", json={**body, "note": "cooldown"})
        assert again.status_code == 200 and len(again.json()["amendments"]) == 1
        assert again.json()["version"] == made.json()["version"]
        after = _lrs(c, rid, 0, 1200)
        expected = _torch_cosine_then(1200, start)
        for i, g in enumerate(("g0", "g1")):
            assert after[g][:start] == before[g][:start]  # bit for bit
            assert close(after[g], expected[i])
        events = c.get(f"/v1/runs/{rid}/events").json()["events"]
        amended = [e for e in events if e["type"] == "amended"]
        assert len(amended) == 1 and amended[0]["step"] == start
        assert amended[0]["data"]["note"] == "cooldown"


def test_bad_amendments_are_refused_and_change_nothing(server: ServerProcess) -> None:
    rid = new_id("amend-bad")
    with server.client() as c:
        c.put(f"/v1/runs/{rid}", json=COSINE)
        version = c.get(f"/v1/runs/{rid}").json()["version"]
        bad = [
            {"from_step": 10},
            {"from_step": 10, "group_schedules": {"nope": COOLDOWN}},
            {"from_step": 10, "param_schedules": {"eps": COOLDOWN}},
            {"from_step": 0, "schedule": COOLDOWN, "base": "current"},
            {"from_step": 10, "schedule": {"type": "OneCycleLR", "max_lr": [1, 2, 3]}},
            {"from_step": 10, "schedule": COOLDOWN, "base": "later"},
            {"from_step": -1, "schedule": COOLDOWN},
        ]
        for body in bad:
            r = c.post(f"/v1/runs/{rid}/amendments", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["detail"]
        assert c.post("/v1/runs/nope-x/amendments", json=bad[1]).status_code == 404
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["version"] == version and run["amendments"] == []


def test_an_override_is_withdrawn_from_a_guaranteed_step(server: ServerProcess) -> None:
    rid = new_id("withdraw")
    with server.client() as c:
        c.put(f"/v1/runs/{rid}", json=COSINE)
        plain = _lrs(c, rid, 0, 1000)
        ov = {"from_step": 100, "action": "scale", "value": 0.5}
        assert c.post(f"/v1/runs/{rid}/overrides", json=ov).status_code == 201
        c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 400})  # a trainer's window
        lease = c.get(f"/v1/runs/{rid}").json()["leased_until"]
        late = c.delete(f"/v1/runs/{rid}/overrides/1", params={"from_step": 150})
        assert late.status_code == 409
        assert late.json()["earliest_step"] == lease + LEASE_GRAIN
        gone = c.delete(f"/v1/runs/{rid}/overrides/1")
        assert gone.status_code == 200, gone.text
        assert gone.json()["overrides"][0]["until_step"] == lease
        after = _lrs(c, rid, 0, 1000)
        for g in ("g0", "g1"):
            assert after[g][:100] == plain[g][:100]
            assert close(after[g][100:lease], [0.5 * v for v in plain[g][100:lease]])
            assert after[g][lease:] == plain[g][lease:]
        assert c.delete(f"/v1/runs/{rid}/overrides/1").status_code == 422  # already withdrawn
        assert c.delete(f"/v1/runs/{rid}/overrides/9").status_code == 422
        assert c.delete(f"/v1/runs/{rid}/overrides/0").status_code == 422
        types = [e["type"] for e in c.get(f"/v1/runs/{rid}/events").json()["events"]]
        assert types.count("override_withdrawn") == 1


def _torch_plateau(losses: list[float], n: int) -> list[list[float]]:
    """torch's ReduceLROnPlateau fed losses[s] after step s: lr of steps 0..n-1."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.01}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    out = []
    for step in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        if step < len(losses):
            sched.step(losses[step])
    return [list(col) for col in zip(*out, strict=True)]


def test_a_rewind_forgets_the_abandoned_branch_like_torch_fed_only_the_kept_reports(
    server: ServerProcess,
) -> None:
    rid = new_id("rewind")
    rng = np.random.default_rng(3)
    first = [float(x) for x in 1.0 / (1 + np.arange(41)) + rng.random(41) * 0.3]
    second = [float(x) for x in 0.2 + rng.random(60) * 0.05]
    with server.client() as c:
        c.put(f"/v1/runs/{rid}", json=plateau_spec())
        for step, loss in enumerate(first):
            r = c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}})
            assert r.status_code == 200
        assert c.get(f"/v1/runs/{rid}").json()["state"]["schedule"]["reductions"]
        before = _lrs(c, rid, 0, 21)
        note = "loss spike; restart from ckpt 20"
        r = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 20, "key": "ckpt-20", "note": note})
        assert r.status_code == 200, r.text
        run = r.json()
        assert run["completed_step"] == 20 and run["step"] == 20 and run["branch"] == 1
        assert run["rewinds"][0]["reports_set_aside"] == 20
        assert _lrs(c, rid, 0, 21) == before  # values up to to_step unchanged
        # The same rewind again (every rank of the resumed job asks) changes nothing.
        again = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 20, "key": "ckpt-20"})
        assert again.json()["version"] == run["version"]
        other = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 10, "key": "ckpt-20"})
        assert other.status_code == 409 and other.json()["type"] == "/problems/rewind-conflict"
        ahead = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 500})
        assert ahead.status_code == 422
        # The replayed steps are accepted again, with other values: no stale or conflict.
        for step in range(21, 60):
            body = {"step": step, "values": {"val_loss": second[step - 21]}}
            r = c.post(f"/v1/runs/{rid}/metrics", json=body)
            assert r.status_code == 200, r.text
        kept = first[:21] + second[: 60 - 21]
        expected = _torch_plateau(kept, 61)
        ours = _lrs(c, rid, 0, 61)
        assert close(ours["g0"], expected[0]) and close(ours["g1"], expected[1])
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json()
        assert [p["value"] for p in history["points"]] == kept
        assert [p["branch"] for p in history["points"]] == [0] * 21 + [1] * 39
        assert [p["value"] for p in history["abandoned"]] == first[21:]
        assert {p["abandoned_by"] for p in history["abandoned"]} == {1}
        events = c.get(f"/v1/runs/{rid}/events", params={"limit": 10000}).json()["events"]
        rewound = [e for e in events if e["type"] == "rewound"]
        assert len(rewound) == 1 and rewound[0]["data"]["note"] == note
        assert rewound[0]["data"]["from_step"] == 40 and rewound[0]["step"] == 20
        set_aside = [e for e in events if e["abandoned_by"]]
        assert {e["step"] for e in set_aside if e["type"] == "report_completed"} == set(
            range(21, 41)
        )


def test_every_rank_asks_for_the_same_rewind_and_exactly_one_happens(
    server: ServerProcess,
) -> None:
    rid = new_id("rewind-ranks")
    losses = {r: [1.0 / (1 + s) + 0.1 * r for s in range(31)] for r in (0, 1)}
    new = {r: [0.5 + 0.01 * s + 0.2 * r for s in range(20)] for r in (0, 1)}
    with server.client() as c:
        c.put(f"/v1/runs/{rid}", json=plateau_spec(world_size=2))
        for step in range(31):
            for rank in (0, 1):
                body = {"step": step, "rank": rank, "values": {"val_loss": losses[rank][step]}}
                assert c.post(f"/v1/runs/{rid}/metrics", json=body).status_code == 200
    errors: list[str] = []

    def resumed_rank(rank: int) -> None:
        with server.client() as c:
            r = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 10, "key": "resume-10"})
            if r.status_code != 200:
                errors.append(r.text)
            for step in range(11, 31):
                body = {"step": step, "rank": rank, "values": {"val_loss": new[rank][step - 11]}}
                r = c.post(f"/v1/runs/{rid}/metrics", params={"wait": 30}, json=body)
                if r.status_code != 200 or not r.json()["complete"]:
                    errors.append(r.text)

    threads = [threading.Thread(target=resumed_rank, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    with server.client() as c:
        run = c.get(f"/v1/runs/{rid}").json()
        assert len(run["rewinds"]) == 1 and run["branch"] == 1
        assert run["completed_step"] == 30
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json()
        assert len(history["points"]) == 2 * 31  # no report lost
        mean = [(losses[0][s] + losses[1][s]) / 2 for s in range(11)]
        mean += [(new[0][s] + new[1][s]) / 2 for s in range(20)]
        expected = _torch_plateau(mean, 32)
        ours = _lrs(c, rid, 0, 32)
        assert close(ours["g0"], expected[0]) and close(ours["g1"], expected[1])
