"""Operations endpoints over HTTP on both databases."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import ServerProcess


def test_health_ready_metrics(server_factory: Callable[..., ServerProcess], db_url: str) -> None:
    server = server_factory(database=db_url)
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["database"] == ("sqlite" if db_url.startswith("sqlite") else "postgres")
        text = c.get("/metrics").text
        assert 'lrserve_http_requests_total{method="GET",path="/readyz",status="200"}' in text
        assert c.get("/docs").status_code == 200
        assert "/v1/runs/{run_id}" in c.get("/openapi.json").json()["paths"]


def test_unknown_path_and_method_are_problems(live_server: ServerProcess) -> None:
    r = httpx.get(f"{live_server.url}/nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/not-found"
    r = httpx.post(f"{live_server.url}/healthz")
    assert r.status_code == 405 and r.json()["type"] == "/problems/method-not-allowed"
