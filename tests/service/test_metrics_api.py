"""Metric reports over HTTP on both databases: exactly-once, conflicts, ranks, ?wait=, history.

Plateau decisions are checked against torch's ReduceLROnPlateau fed the same metrics.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import ServerProcess
from tests.service.helpers import close, new_id, plateau_spec
from tests.service.test_runs_api import problem


@pytest.fixture
def client(server: ServerProcess) -> httpx.Client:
    with server.client() as c:
        yield c  # type: ignore[misc]


def torch_plateau(losses: list[float], lrs: list[float], patience: int = 1) -> list[list[float]]:
    """lr per group after each ``step(loss)``: what applies from the next step."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=patience)
    out = []
    for loss in losses:
        opt.step()
        sched.step(loss)
        out.append([g["lr"] for g in opt.param_groups])
    return out


LOSSES = [1.0, 0.9, 0.95, 0.97, 0.96, 0.5, 0.6, 0.7, 0.8, 0.4, 0.41, 0.42, 0.43]


def test_plateau_decisions_match_torch(client: httpx.Client) -> None:
    rid = new_id()
    assert client.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
    ref = torch_plateau(LOSSES, [0.1, 0.01])
    reductions = 0
    for step, loss in enumerate(LOSSES):
        r = client.post(
            f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}}
        )
        assert r.status_code == 200, r.text
        a = r.json()
        assert a["run"] == rid and a["step"] == step and a["rank"] == 0 and a["complete"]
        assert a["reported_ranks"] == 1 and a["applies_from"] == step + 1
        assert a["version"] == step + 2
        assert close([a["groups"]["g0"]["lr"], a["groups"]["g1"]["lr"]], ref[step])
        previous = ref[step - 1][0] if step else 0.1
        assert a["decision"]["reduced"] == (ref[step][0] < previous)
        reductions += a["decision"]["reduced"]
    assert reductions >= 2
    n = len(LOSSES)
    w = client.get(f"/v1/runs/{rid}/lr", params={"start": 1, "count": n}).json()
    assert close(w["groups"]["g0"]["lr"], [r[0] for r in ref])
    run = client.get(f"/v1/runs/{rid}").json()
    assert run["step"] == run["completed_step"] == n - 1 and run["version"] == n + 1
    (node_state,) = run["state"].values()
    assert len(node_state["reductions"]) == reductions
    events = client.get(f"/v1/runs/{rid}/events").json()["events"]
    types = [e["type"] for e in events]
    assert types.count("report_completed") == n and types.count("reduced") == reductions
    assert all(e["data"]["applies_from"] == e["step"] + 1 for e in events if e["type"] == "reduced")
    hist = client.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json()
    assert [p["value"] for p in hist["points"]] == LOSSES
    assert [p["step"] for p in hist["aggregate"]] == list(range(n))


def test_exactly_once_conflict_stale(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=plateau_spec())
    first = client.post(f"/v1/runs/{rid}/metrics", json={"step": 10, "values": {"val_loss": 1.0}})
    assert first.status_code == 200
    before = client.get(f"/v1/runs/{rid}").json()
    again = client.post(
        f"/v1/runs/{rid}/metrics", json={"step": 10, "rank": 0, "values": {"val_loss": 1}}
    )
    assert again.status_code == 200 and again.json() == first.json()
    assert client.get(f"/v1/runs/{rid}").json() == before
    body = problem(
        client.post(f"/v1/runs/{rid}/metrics", json={"step": 10, "values": {"val_loss": 2.0}}),
        409,
        "report-conflict",
    )
    assert "10" in body["detail"]
    client.post(f"/v1/runs/{rid}/metrics", json={"step": 20, "values": {"val_loss": 0.5}})
    problem(
        client.post(f"/v1/runs/{rid}/metrics", json={"step": 15, "values": {"val_loss": 0.5}}),
        409,
        "stale-report",
    )
    # Other values for an older step: stale wins over the key conflict (API.md).
    problem(
        client.post(f"/v1/runs/{rid}/metrics", json={"step": 10, "values": {"val_loss": 3.0}}),
        409,
        "stale-report",
    )
    # An exact duplicate of an old report is still answered, not refused as stale.
    assert client.post(
        f"/v1/runs/{rid}/metrics", json={"step": 10, "values": {"val_loss": 1.0}}
    ).json() == {**first.json(), "version": 3}
    events = client.get(f"/v1/runs/{rid}/events").json()["events"]
    assert [e["type"] for e in events] == ["created", "report_completed", "report_completed"]
    assert client.get(f"/v1/runs/{rid}").json()["version"] == 3


def test_report_validation(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=plateau_spec(world_size=2))
    url = f"/v1/runs/{rid}/metrics"
    for bad in (
        {"step": 0, "rank": 2, "values": {"val_loss": 1.0}},
        {"step": -1, "values": {}},
        {"step": 0, "rank": -1, "values": {}},
        {"step": 0, "values": {"val_loss": "abc"}},
        {"step": 0, "values": {"val_loss": True}},
        {"step": 0, "values": {"val_loss": [1]}},
        {"step": 0, "values": {"": 1.0}},
        {"step": 0, "values": {f"m{i}": 1.0 for i in range(300)}},
        {"step": 0, "values": []},
        {"step": "x", "values": {}},
        {"values": {}},
        {"step": 0, "values": {}, "extra": 1},
        {"step": 2**53 - 1, "values": {}},
        {"step": 2**64, "values": {}},
    ):
        body = problem(client.post(url, json=bad), 422, "validation-error")
        assert body["errors"], bad
    problem(
        client.post(url, json={"step": 0, "values": {}}, params={"wait": 301}),
        422,
        "validation-error",
    )
    problem(
        client.post(f"/v1/runs/{new_id()}/metrics", json={"step": 0, "values": {}}),
        404,
        "run-not-found",
    )
    assert client.get(f"/v1/runs/{rid}").json()["version"] == 1
    # Without a name: the names reported (none: every report above was refused).
    assert client.get(f"/v1/runs/{rid}/metrics").json() == {"run": rid, "names": []}


def test_non_finite_values(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=plateau_spec())
    url = f"/v1/runs/{rid}/metrics"
    values: list[Any] = [1.0, "NaN", "Infinity", "-Infinity", None]
    for step, v in enumerate(values):
        r = client.post(url, json={"step": step, "values": {"val_loss": v, "acc": 0.5}})
        assert r.status_code == 200, r.text
    run = client.get(f"/v1/runs/{rid}").json()
    (node,) = run["state"].values()
    assert node["best"] == 1.0  # non-finite values never become the best
    hist = client.get(url, params={"name": "val_loss"}).json()
    assert [p["value"] for p in hist["points"]] == values
    assert client.get(url, params={"name": "acc"}).json()["points"][0]["value"] == 0.5
    assert client.get(url, params={"name": "nope"}).json()["points"] == []


def test_world_size_and_wait(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=plateau_spec(world_size=3, aggregate="max"))
    url = f"/v1/runs/{rid}/metrics"
    a = client.post(url, json={"step": 0, "rank": 0, "values": {"val_loss": 1.0}}).json()
    assert not a["complete"] and a["decision"] is None and a["reported_ranks"] == 1
    # A short wait that times out answers 200 with complete=false.
    t0 = time.monotonic()
    b = client.post(
        url, params={"wait": 0.3}, json={"step": 0, "rank": 1, "values": {"val_loss": 3.0}}
    )
    assert time.monotonic() - t0 >= 0.25
    assert b.status_code == 200 and not b.json()["complete"] and b.json()["reported_ranks"] == 2
    results: dict[int, httpx.Response] = {}

    def waiter(rank: int) -> None:
        results[rank] = client.post(
            url, params={"wait": 20}, json={"step": 1, "rank": rank, "values": {"val_loss": 1.0}}
        )

    threads = [threading.Thread(target=waiter, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert not results  # both are held until rank 2 reports
    c = client.post(url, json={"step": 0, "rank": 2, "values": {"val_loss": 2.0}}).json()
    assert c["complete"] and c["reported_ranks"] == 3 and c["decision"] is not None
    d = client.post(url, json={"step": 1, "rank": 2, "values": {"val_loss": 5.0}}).json()
    for t in threads:
        t.join(30)
    assert d["complete"]
    for rank in (0, 1):
        got = results[rank].json()
        assert got["complete"] and got["decision"] == d["decision"]
        assert got["groups"] == d["groups"] and got["reported_ranks"] == 3
    hist = client.get(url, params={"name": "val_loss"}).json()
    assert [p["value"] for p in hist["aggregate"]] == [3.0, 5.0]  # max over ranks
    assert len(hist["points"]) == 6
    # rank 0 and 1 retrying step 0 get the completed answer.
    again = client.post(url, json={"step": 0, "rank": 0, "values": {"val_loss": 1.0}}).json()
    assert again["complete"] and again["decision"] == c["decision"]
