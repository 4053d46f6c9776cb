"""Two servers on one PostgreSQL database racing creates, reports and ranks.

Every test starts two real ``python -m service`` processes on one fresh PostgreSQL database and
fires requests at both at once from threads released by one barrier, so that the requests
really overlap in the database. What must hold (docs/operations.md, "Replicas"):

- identical PUTs: exactly one 201, the rest 200, one run;
- different PUTs of one id: exactly one 201, the rest 409, and the stored spec is the winner's;
- one report sent many times at once: stored once, every answer identical;
- ``world_size=4`` with the ranks split over the two replicas and ``?wait=``: every answer is
  complete and carries the same decision and values, and ``report_completed`` is written once.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.postgres

N = 16  # concurrent requests per race


def spec(lr: float = 0.1, world_size: int = 1) -> dict[str, Any]:
    return {
        "groups": [{"name": "g0", "lr": lr, "momentum": 0.9}, {"name": "g1", "lr": lr / 10}],
        "schedule": {"type": "CosineAnnealingLR", "T_max": 100, "eta_min": 1e-5},
        "group_schedules": {
            "g1": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
        },
        "world_size": world_size,
    }


@pytest.fixture
def replicas(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> list[ServerProcess]:
    first = server_factory(database=postgres_url)
    second = server_factory(database=postgres_url)  # migrations already applied: must not redo
    return [first, second]


def race(
    replicas: list[ServerProcess], calls: Sequence[Callable[..., httpx.Response]]
) -> list[httpx.Response]:
    """Run ``calls[i]`` against replica ``i % 2``, all released at once; answers in call order."""
    clients = [[r.client(timeout=60) for r in replicas] for _ in calls]
    barrier = threading.Barrier(len(calls))

    def one(i: int) -> httpx.Response:
        client = clients[i][i % len(replicas)]
        client.get("/healthz")  # connect before the barrier so the requests overlap
        barrier.wait()
        return calls[i](client)

    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(one, range(len(calls))))
    finally:
        for pair in clients:
            for c in pair:
                c.close()


def test_identical_creates_give_one_201(replicas: list[ServerProcess]) -> None:
    body = spec()
    answers = race(replicas, [lambda c: c.put("/v1/runs/race", json=body)] * N)
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {201: 1, 200: N - 1}, statuses
    runs = [r.json() for r in answers]
    assert len({(r["created_at"], r["version"]) for r in runs}) == 1
    with replicas[1].client() as c:
        listed = c.get("/v1/runs").json()["runs"]
        assert [r["id"] for r in listed] == ["race"]
        assert [e["type"] for e in c.get("/v1/runs/race/events").json()["events"]] == ["created"]


def test_different_creates_give_one_201_and_409s(replicas: list[ServerProcess]) -> None:
    bodies = [spec(lr=0.1 + i / 100) for i in range(N)]
    answers = race(replicas, [lambda c, b=b: c.put("/v1/runs/contested", json=b) for b in bodies])
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {201: 1, 409: N - 1}, statuses
    winner = next(i for i, r in enumerate(answers) if r.status_code == 201)
    for r in answers:
        if r.status_code == 409:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"] == "/problems/run-conflict"
    with replicas[0].client() as c:
        stored = c.get("/v1/runs/contested").json()
    assert stored["spec"]["groups"][0]["lr"] == bodies[winner]["groups"][0]["lr"]
    assert stored["version"] == 1
    # The winner's body is now the idempotent one, on either replica.
    for server in replicas:
        with server.client() as c:
            assert c.put("/v1/runs/contested", json=bodies[winner]).status_code == 200


def test_duplicate_reports_racing_are_stored_once(replicas: list[ServerProcess]) -> None:
    with replicas[0].client() as c:
        assert c.put("/v1/runs/dup", json=spec()).status_code == 201
        assert c.post("/v1/runs/dup/metrics", json={"step": 4, "values": {"val_loss": 1.0}})
    report = {"step": 5, "rank": 0, "values": {"val_loss": 2.0, "acc": 0.25}}
    answers = race(replicas, [lambda c: c.post("/v1/runs/dup/metrics", json=report)] * N)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    bodies = [r.json() for r in answers]
    assert all(b == bodies[0] for b in bodies), bodies
    assert bodies[0]["complete"] is True and bodies[0]["step"] == 5

    with replicas[1].client() as c:
        history = c.get("/v1/runs/dup/metrics", params={"name": "val_loss"}).json()
        assert [(p["step"], p["value"]) for p in history["points"]] == [(4, 1.0), (5, 2.0)]
        events = c.get("/v1/runs/dup/events").json()["events"]
        assert [e["step"] for e in events if e["type"] == "report_completed"] == [4, 5]
        run = c.get("/v1/runs/dup").json()
    # created (1) + two completed reports, plus one more if the plateau reduced at step 5.
    reduced = sum(1 for e in events if e["type"] == "reduced")
    assert run["version"] == bodies[0]["version"]
    assert run["version"] in (3, 3 + reduced)
    assert run["completed_step"] == 5


def test_ranks_split_over_replicas_get_one_decision(replicas: list[ServerProcess]) -> None:
    world = 4
    with replicas[0].client() as c:
        assert c.put("/v1/runs/ranks", json=spec(world_size=world)).status_code == 201
    losses = {1: 1.0, 2: 2.0, 3: 0.5}  # step 2 does not improve: patience 0 reduces g1
    for step, loss in losses.items():
        calls = [
            lambda c, rank=rank, step=step, loss=loss: c.post(
                "/v1/runs/ranks/metrics",
                params={"wait": 30},
                # Different per-rank values; the plateau sees their mean.
                json={"step": step, "rank": rank, "values": {"val_loss": loss + rank / 100}},
            )
            for rank in range(world)
            for _ in range(2)  # every rank twice (once per replica): retries must be harmless
        ]
        answers = race(replicas, calls)
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        bodies = [r.json() for r in answers]
        assert all(b["complete"] is True for b in bodies), bodies
        assert all(b["reported_ranks"] == world for b in bodies), bodies
        for key in ("decision", "groups", "version", "applies_from"):
            assert all(b[key] == bodies[0][key] for b in bodies), (key, bodies)

    with replicas[1].client() as c:
        events = c.get("/v1/runs/ranks/events").json()["events"]
        history = c.get("/v1/runs/ranks/metrics", params={"name": "val_loss"}).json()
    completed = [e for e in events if e["type"] == "report_completed"]
    assert [e["step"] for e in completed] == [1, 2, 3]
    assert len(history["points"]) == world * len(losses)
    # The aggregate the plateau saw is the mean of the four ranks' values.
    agg = {a["step"]: a["value"] for a in history["aggregate"]}
    for step, loss in losses.items():
        assert agg[step] == pytest.approx(loss + sum(range(world)) / 100 / world, rel=1e-12)
