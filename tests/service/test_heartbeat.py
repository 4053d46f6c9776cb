"""``POST /v1/runs/{id}/heartbeat``: alive and finished, without changing the run's version."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.service.helpers import new_id
from tests.service.test_runs_api import problem

SPEC = {
    "groups": [{"name": "g", "lr": 0.1}],
    "schedule": {"type": "StepLR", "step_size": 10, "gamma": 0.5},
    "world_size": 2,
}


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _run(client: httpx.Client) -> str:
    rid = new_id("hb")
    assert client.put(f"/v1/runs/{rid}", json=SPEC).status_code == 201
    return rid


def _report(client: httpx.Client, rid: str, step: int) -> None:
    for rank in (0, 1):
        body = {"step": step, "rank": rank, "values": {"loss": 1.0}}
        assert client.post(f"/v1/runs/{rid}/metrics", json=body).status_code == 200


def test_a_heartbeat_keeps_the_version_and_every_cached_window(client: httpx.Client) -> None:
    rid = _run(client)
    _report(client, rid, 3)
    before = client.get(f"/v1/runs/{rid}").json()
    assert before["status"] == "running" and before["heartbeat_at"] is None
    window = client.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 50})
    r = client.post(f"/v1/runs/{rid}/heartbeat", json={"rank": 1, "step": 7})
    assert r.status_code == 204 and r.content == b""
    after = client.get(f"/v1/runs/{rid}").json()
    assert after["heartbeat_at"] > before["last_report_at"] and after["heartbeat_step"] == 7
    assert after["version"] == before["version"] and after["updated_at"] == before["updated_at"]
    # A trainer's cached window is still valid: 304 on its ETag.
    again = client.get(
        f"/v1/runs/{rid}/lr",
        params={"start": 0, "count": 50},
        headers={"If-None-Match": window.headers["etag"]},
    )
    assert again.status_code == 304
    # An empty body is a rank-0 heartbeat without a step.
    assert client.post(f"/v1/runs/{rid}/heartbeat", json={}).status_code == 204


def test_finished_sticks_until_a_report_at_a_later_step(client: httpx.Client) -> None:
    rid = _run(client)
    _report(client, rid, 10)
    assert client.post(f"/v1/runs/{rid}/heartbeat", json={"finished": True}).status_code == 204
    assert client.get(f"/v1/runs/{rid}").json()["status"] == "finished"
    # A heartbeat without finished, at the same step, changes nothing.
    client.post(f"/v1/runs/{rid}/heartbeat", json={"step": 10})
    assert client.get(f"/v1/runs/{rid}").json()["status"] == "finished"
    # A report of a later step: the job goes on after all.
    _report(client, rid, 11)
    assert client.get(f"/v1/runs/{rid}").json()["status"] == "running"
    # finished at a step named in the heartbeat: reports up to it keep it finished.
    client.post(f"/v1/runs/{rid}/heartbeat", json={"step": 20, "finished": True})
    _report(client, rid, 15)
    assert client.get(f"/v1/runs/{rid}").json()["status"] == "finished"
    # A rewind resumes the run.
    r = client.post(f"/v1/runs/{rid}/rewind", json={"to_step": 11})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"rank": 2}, "rank"),  # world_size is 2
        ({"rank": -1}, "rank"),
        ({"step": -5}, "step"),
        ({"step": "ten"}, "step"),
        ({"finished": "maybe"}, "finished"),
        ({"beat": 1}, "beat"),
    ],
)
def test_bad_heartbeats_are_422_and_change_nothing(
    client: httpx.Client, body: dict[str, Any], where: str
) -> None:
    rid = _run(client)
    before = client.get(f"/v1/runs/{rid}").json()
    err = problem(client.post(f"/v1/runs/{rid}/heartbeat", json=body), 422, "validation-error")
    assert where in str(err["errors"][0]["loc"])
    assert client.get(f"/v1/runs/{rid}").json() == before


def test_heartbeat_of_a_missing_run_is_404(client: httpx.Client) -> None:
    problem(client.post(f"/v1/runs/{new_id()}/heartbeat", json={}), 404, "run-not-found")


def test_heartbeat_needs_the_write_token(server_factory: Any) -> None:
    srv = server_factory(token="rw", read_token="ro")
    with httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer rw"}) as c:
        rid = _run(c)
    url = f"{srv.url}/v1/runs/{rid}/heartbeat"
    problem(httpx.post(url, json={}, headers={"Authorization": "Bearer ro"}), 403, "forbidden")
    problem(httpx.post(url, json={}), 401, "unauthorized")
    # ?token= is for the stream only.
    problem(httpx.post(url, json={}, params={"token": "rw"}), 401, "unauthorized")
    problem(httpx.get(f"{srv.url}/v1/runs/{rid}", params={"token": "rw"}), 401, "unauthorized")
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer rw"}).status_code == 204
