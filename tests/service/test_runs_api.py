"""Runs, learning rates, overrides, events, curve and preview over HTTP, on both databases.

Values are checked against torch's own schedulers (tests/service/helpers.py).
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.service.helpers import COSINE_SPEC, close, cosine_torch, new_id, torch_lrs

PROBLEM = "application/problem+json"


def problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status and body["detail"]
    return body


@pytest.fixture
def client(server: ServerProcess) -> httpx.Client:
    with server.client() as c:
        yield c  # type: ignore[misc]


def test_create_is_idempotent(client: httpx.Client) -> None:
    rid = new_id()
    r = client.put(f"/v1/runs/{rid}", json=COSINE_SPEC)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/runs/{rid}"
    run = r.json()
    assert run["id"] == rid and run["version"] == 1 and run["step"] is None
    assert run["completed_step"] is None and run["overrides"] == []
    assert run["spec"]["world_size"] == 1 and run["spec"]["aggregate"] == "mean"
    # Same body, keys reordered and defaults spelled out: the same run.
    same = dict(reversed(list(COSINE_SPEC.items())))
    same.update(world_size=1, aggregate="mean", group_schedules={}, param_schedules={})
    again = client.put(f"/v1/runs/{rid}", json=same)
    assert again.status_code == 200 and again.json() == run
    other = copy.deepcopy(COSINE_SPEC)
    other["groups"][1]["lr"] = 0.002
    body = problem(client.put(f"/v1/runs/{rid}", json=other), 409, "run-conflict")
    assert rid in body["detail"]
    assert client.get(f"/v1/runs/{rid}").json() == run


def test_create_validation(client: httpx.Client) -> None:
    for bad in ["-x", "a" * 129, "a b", "a%2Fb", "é"]:
        r = client.put(f"/v1/runs/{bad}", json=COSINE_SPEC)
        assert r.status_code in (404, 422), (bad, r.status_code)
        assert r.headers["content-type"] == PROBLEM
    body = problem(client.put("/v1/runs/-x", json=COSINE_SPEC), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["path", "run_id"]
    spec = copy.deepcopy(COSINE_SPEC)
    spec["world_size"] = 0
    body = problem(client.put(f"/v1/runs/{new_id()}", json=spec), 422, "validation-error")
    assert ["body", "world_size"] in [e["loc"] for e in body["errors"]]
    spec = copy.deepcopy(COSINE_SPEC)
    spec["schedule"] = {"type": "NoSuchLR"}
    problem(client.put(f"/v1/runs/{new_id()}", json=spec), 422, "validation-error")
    # A group-dependent problem the engine finds while compiling (SpecError).
    spec = copy.deepcopy(COSINE_SPEC)
    spec["schedule"] = {"type": "CyclicLR", "base_lr": [0.1], "max_lr": 1.0}
    body = problem(client.put(f"/v1/runs/{new_id()}", json=spec), 422, "validation-error")
    assert body["errors"][0]["loc"][:2] == ["body", "schedule"]
    # lr_lambda is an expression, never Python.
    spec = copy.deepcopy(COSINE_SPEC)
    spec["schedule"] = {"type": "LambdaLR", "lr_lambda": "__import__('os').system('true')"}
    problem(client.put(f"/v1/runs/{new_id()}", json=spec), 422, "validation-error")
    for raw in [b"{", b"[]", b"null", b'{"groups": 1}']:
        r = client.put(
            f"/v1/runs/{new_id()}", content=raw, headers={"content-type": "application/json"}
        )
        problem(r, 422, "validation-error")


def test_get_list_delete(client: httpx.Client) -> None:
    prefix = new_id("list")
    ids = [f"{prefix}-{i}" for i in range(5)]
    for rid in ids:
        assert client.put(f"/v1/runs/{rid}", json=COSINE_SPEC).status_code == 201
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/runs", params=params).json()
        pages += 1
        assert len(page["runs"]) <= 2
        seen += [r["id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [i for i in seen if i.startswith(prefix)] == ids
    assert seen == sorted(seen) and len(seen) == len(set(seen)) and pages >= 3
    problem(client.get("/v1/runs", params={"cursor": "!!!"}), 422, "validation-error")
    problem(client.get("/v1/runs", params={"limit": 0}), 422, "validation-error")
    problem(client.get(f"/v1/runs/{new_id()}"), 404, "run-not-found")
    assert client.delete(f"/v1/runs/{ids[0]}").status_code == 204
    problem(client.get(f"/v1/runs/{ids[0]}"), 404, "run-not-found")
    problem(client.delete(f"/v1/runs/{ids[0]}"), 404, "run-not-found")
    for sub in ("lr", "events", "curve", "metrics?name=x"):
        problem(client.get(f"/v1/runs/{ids[0]}/{sub}"), 404, "run-not-found")
    # The id is free again, for any spec.
    assert client.put(f"/v1/runs/{ids[0]}", json=COSINE_SPEC).status_code == 201


def test_lr_matches_torch(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=COSINE_SPEC)
    n = 1000
    ref = torch_lrs(cosine_torch, [0.0001, 0.001], n)
    window = client.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": n})
    assert window.status_code == 200
    w = window.json()
    assert w["run"] == rid and w["start"] == 0 and w["count"] == n and w["version"] == 1
    assert close(w["groups"]["backbone"]["lr"], ref[0]) and close(w["groups"]["head"]["lr"], ref[1])
    assert w["groups"]["backbone"]["momentum"] == [0.9] * n and set(w["groups"]["head"]) == {"lr"}
    for step in (0, 49, 50, 51, 777):
        one = client.get(f"/v1/runs/{rid}/lr", params={"step": step}).json()
        assert one["step"] == step and one["version"] == 1
        assert close([one["groups"]["head"]["lr"]], [ref[1][step]])
    # Default: the run's current step (0 before any report).
    assert client.get(f"/v1/runs/{rid}/lr").json()["step"] == 0


def test_lr_etag_and_errors(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=COSINE_SPEC)
    r = client.get(f"/v1/runs/{rid}/lr", params={"step": 5})
    tag = r.headers["etag"]
    assert tag.startswith('"1-') and tag.endswith('"')  # version 1, then the run's creation
    r304 = client.get(f"/v1/runs/{rid}/lr", params={"step": 5}, headers={"If-None-Match": tag})
    assert r304.status_code == 304 and r304.content == b"" and r304.headers["etag"] == tag
    weak = client.get(f"/v1/runs/{rid}/lr", headers={"If-None-Match": f'W/{tag}, "9"'})
    assert weak.status_code == 304
    assert client.get(f"/v1/runs/{rid}/lr", headers={"If-None-Match": '"1"'}).status_code == 200
    # Deleted and created again (versions restart at 1, other values): the old tag is stale.
    client.delete(f"/v1/runs/{rid}")
    other = {**COSINE_SPEC, "groups": [{**g, "lr": g["lr"] * 2} for g in COSINE_SPEC["groups"]]}
    assert client.put(f"/v1/runs/{rid}", json=other).status_code == 201
    fresh = client.get(f"/v1/runs/{rid}/lr", params={"step": 5}, headers={"If-None-Match": tag})
    assert fresh.status_code == 200 and fresh.json()["version"] == 1
    assert fresh.json()["groups"]["head"]["lr"] == 2 * r.json()["groups"]["head"]["lr"]
    for params in (
        {"step": -1},
        {"step": "x"},
        {"step": 1, "start": 0},
        {"count": 5},
        {"start": 0, "count": 0},
        {"start": 0, "count": 100_001},
        {"step": 2**60},
        {"step": 2**53},
        {"start": 2**53, "count": 1},
        {"start": 2**53 - 5, "count": 10},
    ):
        problem(client.get(f"/v1/runs/{rid}/lr", params=params), 422, "validation-error")
    edge = client.get(f"/v1/runs/{rid}/lr", params={"step": 2**53 - 1})
    assert edge.status_code == 200 and edge.json()["groups"]["head"]["lr"] > 0
    big = client.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 100_000})
    assert big.status_code == 200 and len(big.json()["groups"]["head"]["lr"]) == 100_000


def test_overrides(client: httpx.Client) -> None:
    rid = new_id()
    client.put(f"/v1/runs/{rid}", json=COSINE_SPEC)
    ref = torch_lrs(cosine_torch, [0.0001, 0.001], 300)
    r = client.post(
        f"/v1/runs/{rid}/overrides",
        json={"from_step": 100, "action": "scale", "value": 0.5, "groups": ["head"], "note": "hot"},
    )
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["version"] == 2 and run["overrides"][0]["groups"] == ["head"]
    r = client.post(
        f"/v1/runs/{rid}/overrides", json={"from_step": 200, "action": "set", "value": 1e-5}
    )
    assert r.status_code == 201 and r.json()["version"] == 3
    w = client.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 300}).json()
    assert w["version"] == 3
    head, backbone = w["groups"]["head"]["lr"], w["groups"]["backbone"]["lr"]
    assert close(head[:100], ref[1][:100]) and close(
        head[100:200], [v * 0.5 for v in ref[1][100:200]]
    )
    assert head[200:] == [1e-5] * 100 and backbone[200:] == [1e-5] * 100
    assert close(backbone[:200], ref[0][:200])
    events = client.get(f"/v1/runs/{rid}/events").json()["events"]
    assert [e["type"] for e in events] == ["created", "override", "override"]
    assert events[1]["step"] == 100 and events[1]["data"]["note"] == "hot"
    assert [e["seq"] for e in events] == [1, 2, 3]
    after = client.get(f"/v1/runs/{rid}/events", params={"after": 2}).json()["events"]
    assert [e["seq"] for e in after] == [3]
    base = {"from_step": 0, "action": "set", "value": 0.1}
    for bad in (
        {**base, "groups": ["nope"]},
        {**base, "field": "momentum", "groups": ["head"]},
        {**base, "action": "double"},
        {**base, "value": -1},
        {**base, "from_step": -1},
        {**base, "extra": 1},
    ):
        problem(client.post(f"/v1/runs/{rid}/overrides", json=bad), 422, "validation-error")
    problem(client.post(f"/v1/runs/{new_id()}/overrides", json=base), 404, "run-not-found")
    assert client.get(f"/v1/runs/{rid}").json()["version"] == 3


def test_curve_keeps_extremes(client: httpx.Client) -> None:
    rid = new_id()
    spec = {
        "groups": [{"name": "g", "lr": 1.0}],
        "schedule": {"type": "StepLR", "step_size": 333, "gamma": 0.5},
    }
    client.put(f"/v1/runs/{rid}", json=spec)
    r = client.get(f"/v1/runs/{rid}/curve", params={"start": 0, "stop": 10_000, "points": 100})
    assert r.status_code == 200
    c = r.json()
    steps, lrs = c["steps"], c["groups"]["g"]["lr"]
    assert len(steps) == len(lrs) <= 110 and steps[0] == 0 and steps[-1] == 9999
    ref = torch_lrs(
        lambda o: __import__("torch").optim.lr_scheduler.StepLR(o, 333, 0.5), [1.0], 10_000
    )[0]
    assert close(lrs, [ref[s] for s in steps])
    # Buckets (200 steps) are narrower than a level (333): every level survives decimation.
    assert {round(v, 12) for v in lrs} == {round(v, 12) for v in ref}
    full = client.get(f"/v1/runs/{rid}/curve", params={"stop": 20, "points": 100}).json()
    assert full["steps"] == list(range(20))
    problem(
        client.get(f"/v1/runs/{rid}/curve", params={"start": 5, "stop": 5}), 422, "validation-error"
    )
    problem(client.get(f"/v1/runs/{rid}/curve", params={"stop": 10**12}), 422, "validation-error")


def test_preview(client: httpx.Client) -> None:
    schedule = {k: COSINE_SPEC[k] for k in ("groups", "schedule")}
    r = client.post("/v1/schedules/preview", json={**schedule, "start": 10, "count": 500})
    assert r.status_code == 200, r.text
    ref = torch_lrs(cosine_torch, [0.0001, 0.001], 510)
    p = r.json()
    assert p["start"] == 10 and p["count"] == 500 and "steps" not in p
    assert close(p["groups"]["head"]["lr"], ref[1][10:])
    d = client.post("/v1/schedules/preview", json={**schedule, "points": 40, "stop": 1000}).json()
    assert d["steps"][0] == 0 and d["steps"][-1] == 999 and len(d["steps"]) == d["count"]
    assert close(
        d["groups"]["backbone"]["lr"],
        [
            ref[0][s] if s < 510 else d["groups"]["backbone"]["lr"][i]
            for i, s in enumerate(d["steps"])
        ],
    )
    default = client.post("/v1/schedules/preview", json=schedule).json()
    assert default["count"] == 100
    for bad in (
        {**schedule, "count": 100_001},
        {**schedule, "start": 2**53, "count": 10},
        {**schedule, "points": 10},
        {**schedule, "points": 10, "stop": 100, "count": 5},
        {**schedule, "world_size": 2},
        {"groups": [], "schedule": schedule["schedule"]},
        {**schedule, "schedule": {"type": "CyclicLR", "base_lr": [0.1], "max_lr": 1.0}},
    ):
        problem(client.post("/v1/schedules/preview", json=bad), 422, "validation-error")
