"""The two hot paths (GET .../lr, POST .../metrics) skip FastAPI's per-route machinery.

They are served by plain routes in front of the documented FastAPI ones (see
``service.api.common.HotRoute``); these tests hold them to everything the documented routes
promise: auth, problem+json errors, 405s, OpenAPI, labelled metrics and access lines. And
the report transaction's shortcuts (the row inserted first, one timestamp, the WAL kept
bounded) against a real server and a real SQLite file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ServerProcess
from tests.service.helpers import COSINE_SPEC, new_id, plateau_spec
from tests.service.test_runs_api import problem

TOKEN = "hot-path-token"
READ_TOKEN = "hot-path-read-token"


def test_hot_paths_enforce_auth(server_factory: Callable[..., ServerProcess]) -> None:
    srv = server_factory(token=TOKEN, read_token=READ_TOKEN)
    rid = new_id()
    lr, metrics = f"/v1/runs/{rid}/lr", f"/v1/runs/{rid}/metrics"
    report = {"step": 0, "values": {"val_loss": 1.0}}
    anon = httpx.Client(base_url=srv.url)
    writer = srv.client()
    reader = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    with anon, writer, reader:
        assert writer.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            r = anon.get(lr, headers=bad)
            problem(r, 401, "unauthorized")
            assert "Bearer" in r.headers["www-authenticate"]
            problem(anon.post(metrics, json=report, headers=bad), 401, "unauthorized")
        # An unknown run is still a 401 without a token: auth comes before anything else.
        problem(anon.get(f"/v1/runs/{new_id()}/lr"), 401, "unauthorized")
        problem(reader.post(metrics, json=report), 403, "forbidden")
        assert reader.get(lr).status_code == 200
        assert writer.post(metrics, json=report).status_code == 200
        assert reader.get(lr, params={"step": 1}).json()["step"] == 1


def test_hot_paths_keep_the_documented_behaviour(live_server: ServerProcess) -> None:
    rid = new_id()
    with live_server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=COSINE_SPEC).status_code == 201
        # Other methods on the hot paths: 405 problem+json naming what is allowed.
        r = problem(c.put(f"/v1/runs/{rid}/lr", json={}), 405, "method-not-allowed")
        assert c.put(f"/v1/runs/{rid}/lr", json={}).headers["allow"] == "GET"
        # (Every method of the path: GET .../metrics is the metric history.)
        assert c.delete(f"/v1/runs/{rid}/metrics").headers["allow"] == "GET, POST"
        assert r["detail"]
        # The same path's other route (metric history) is still reached.
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"})
        assert history.status_code == 200 and history.json()["points"] == []
        # Errors are the same problems as before.
        problem(c.get(f"/v1/runs/{rid}/lr", params={"step": "x"}), 422, "validation-error")
        problem(c.get(f"/v1/runs/{new_id()}/lr"), 404, "run-not-found")
        problem(c.post(f"/v1/runs/{rid}/metrics", json={"step": -1}), 422, "validation-error")
        r = c.post(
            f"/v1/runs/{rid}/metrics",
            content=b"step=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        problem(r, 415, "unsupported-media-type")
        ok = c.get(f"/v1/runs/{rid}/lr", params={"step": 3})
        assert ok.headers["content-type"] == "application/json"
        assert ok.headers["etag"].startswith('"1-') and ok.headers["cache-control"] == "no-cache"
        # OpenAPI still documents both endpoints with their parameters.
        paths = c.get("/openapi.json").json()["paths"]
        params = {p["name"] for p in paths["/v1/runs/{run_id}/lr"]["get"]["parameters"]}
        assert {"run_id", "step", "start", "count"} <= params
        assert "requestBody" in paths["/v1/runs/{run_id}/metrics"]["post"]
        # Prometheus and the access log label the hot paths with their route template.
        text = c.get("/metrics").text
        assert 'path="/v1/runs/{run_id}/lr"' in text
        assert 'path="/v1/runs/{run_id}/metrics",status="405"' in text
    live_server.stop()
    lines = [json.loads(ln) for ln in live_server.log().splitlines() if ln.startswith("{")]
    paths_logged = {(ln["method"], ln["path"]) for ln in lines if ln.get("event") == "request"}
    assert ("GET", "/v1/runs/{run_id}/lr") in paths_logged
    assert ("POST", "/v1/runs/{run_id}/metrics") in paths_logged


def test_reports_write_one_history_and_keep_the_wal_bounded(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Many reports on SQLite: every one stored once, with its event, and the WAL checkpointed
    back to its start instead of growing with every report."""
    srv = server_factory()
    db_path = srv.database.removeprefix("sqlite:///")
    rid = new_id()
    n = 3000
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        for step in range(n):
            r = c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": 1.0}})
            assert r.status_code == 200 and r.json()["complete"], r.text
        # A retry of the last report is answered as the first time and changes nothing.
        again = c.post(f"/v1/runs/{rid}/metrics", json={"step": n - 1, "values": {"val_loss": 1.0}})
        assert again.json()["decision"] == r.json()["decision"]
        assert again.json()["version"] == r.json()["version"] == n + 1
        run = c.get(f"/v1/runs/{rid}").json()
        events = c.get(f"/v1/runs/{rid}/events", params={"limit": 10_000}).json()["events"]
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json()
    assert run["version"] == n + 1 and run["completed_step"] == n - 1
    assert [p["step"] for p in history["points"]] == list(range(n))
    completed = [e for e in events if e["type"] == "report_completed"]
    assert [e["step"] for e in completed] == list(range(n))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # Every report writes several WAL frames; unchecked, 3000 reports leave a WAL of ~70 MB.
    assert os.path.getsize(db_path + "-wal") < 40 * 1024 * 1024


def test_hot_routes_are_matched_first(tmp_path: Path) -> None:
    """Each @hot endpoint gets a HotRoute in front of every other route, with and without
    auth (FastAPI includes routers lazily: a hot route looked up in ``app.routes`` silently
    went missing, and every request paid FastAPI's per-route machinery again)."""
    from service.api.app import create_app
    from service.api.common import HotRoute
    from service.config import Settings

    for token in (None, TOKEN):
        app = create_app(Settings(database=f"sqlite:///{tmp_path / 'hot.db'}", token=token))
        front = [
            (route.path, sorted(route.methods or ()))
            for route in app.router.routes[:2]
            if isinstance(route, HotRoute)
        ]
        assert sorted(front) == [
            ("/v1/runs/{run_id}/lr", ["GET"]),
            ("/v1/runs/{run_id}/metrics", ["POST"]),
        ]
