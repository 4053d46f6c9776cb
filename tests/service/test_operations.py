"""Auth, limits, a busy database, the command line, restarts: over HTTP against real servers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess
from tests.service.helpers import COSINE_SPEC, new_id, plateau_spec
from tests.service.test_runs_api import problem

TOKEN = "s3cret-token-value"
READ_TOKEN = "read-only-token-value"


def test_auth(server_factory: Callable[..., ServerProcess], db_url: str) -> None:
    srv = server_factory(database=db_url, token=TOKEN, read_token=READ_TOKEN)
    rid = new_id()
    anon = httpx.Client(base_url=srv.url)
    writer = srv.client()
    reader = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    wrong = httpx.Client(base_url=srv.url, headers={"Authorization": "Bearer nope"})
    with anon, writer, reader, wrong:
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
        assert anon.get("/metrics").status_code == 200
        r = problem(anon.get("/v1/runs"), 401, "unauthorized")
        assert "Bearer" in anon.get("/v1/runs").headers["www-authenticate"]
        problem(wrong.get("/v1/runs"), 401, "unauthorized")
        problem(
            anon.get("/v1/runs", headers={"Authorization": f"Basic {TOKEN}"}), 401, "unauthorized"
        )
        problem(anon.put(f"/v1/runs/{rid}", json=COSINE_SPEC), 401, "unauthorized")
        assert writer.put(f"/v1/runs/{rid}", json=COSINE_SPEC).status_code == 201
        assert reader.get(f"/v1/runs/{rid}").status_code == 200
        assert reader.get(f"/v1/runs/{rid}/lr").status_code == 200
        r = problem(reader.put(f"/v1/runs/{rid}", json=COSINE_SPEC), 403, "forbidden")
        problem(reader.delete(f"/v1/runs/{rid}"), 403, "forbidden")
        problem(
            reader.post(f"/v1/runs/{rid}/metrics", json={"step": 0, "values": {}}), 403, "forbidden"
        )
        assert r["detail"]
        assert writer.delete(f"/v1/runs/{rid}").status_code == 204
    srv.stop()
    log = srv.log()
    assert TOKEN not in log and READ_TOKEN not in log and "nope" not in log
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    requests = [ln for ln in lines if ln.get("event") == "request"]
    assert {"method", "path", "status", "duration_ms"} <= set(requests[0])
    assert any(ln["path"] == "/v1/runs/{run_id}" and ln["status"] == 403 for ln in requests)


def test_limits(live_server: ServerProcess) -> None:
    with live_server.client() as c:
        rid = new_id()
        huge = {**COSINE_SPEC, "metadata": {"blob": "x" * 2_000_000}}
        problem(c.put(f"/v1/runs/{rid}", json=huge), 413, "payload-too-large")

        def chunks() -> object:
            yield b'{"metadata": "'
            for _ in range(300):
                yield b"y" * 10_000
            yield b'"}'

        # Chunked upload without Content-Length: counted while read.
        problem(
            c.put(
                f"/v1/runs/{rid}", content=chunks(), headers={"content-type": "application/json"}
            ),
            413,
            "payload-too-large",
        )
        deep = "[" * 5000 + "]" * 5000
        body = problem(
            c.put(f"/v1/runs/{rid}", content=deep, headers={"content-type": "application/json"}),
            422,
            "validation-error",
        )
        assert "nested" in body["detail"]
        deep_metadata = {**COSINE_SPEC, "metadata": json.loads("[" * 60 + "]" * 60)}
        problem(c.put(f"/v1/runs/{rid}", json=deep_metadata), 422, "validation-error")
        # Brackets inside strings do not count as nesting.
        ok = {**COSINE_SPEC, "metadata": {"note": "[" * 5000}}
        assert c.put(f"/v1/runs/{rid}", json=ok).status_code == 201
        assert (
            c.get(f"/v1/runs/{rid}").json()["metadata" if False else "spec"]["metadata"]
            == ok["metadata"]
        )


def test_busy_sqlite_is_503(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    srv = server_factory(database=f"sqlite:///{db}", env={"LRSERVE_BUSY_TIMEOUT_MS": "200"})
    rid = new_id()
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        lease = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 10})
        leased = c.get(f"/v1/runs/{rid}").json()["leased_until"]
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            r = c.post(f"/v1/runs/{rid}/metrics", json={"step": 0, "values": {"val_loss": 1.0}})
            body = problem(r, 503, "database-busy")
            assert r.headers["retry-after"].isdigit() and "locked" in body["detail"]
            problem(c.put(f"/v1/runs/{new_id()}", json=COSINE_SPEC), 503, "database-busy")
            # Readers are not blocked by a writer in WAL mode: leased values are served (a
            # longer window is cut at the lease), values that need a new lease wait.
            assert (
                c.get(f"/v1/runs/{rid}/lr").json()
                == c.get(f"/v1/runs/{rid}/lr", params={"step": 0}).json()
            )
            longer = c.get(f"/v1/runs/{rid}/lr", params={"start": 5, "count": leased + 100})
            assert longer.status_code == 200 and longer.json()["count"] == leased - 5
            assert longer.json()["groups"]["g0"]["lr"][:5] == lease.json()["groups"]["g0"]["lr"][5:]
            beyond = c.get(f"/v1/runs/{rid}/lr", params={"start": leased, "count": 10})
            assert "leased" in problem(beyond, 503, "database-busy")["detail"]
            inspect = c.get(f"/v1/runs/{rid}/lr", params={"start": leased, "lease": "false"})
            assert inspect.status_code == 200
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        r = c.post(f"/v1/runs/{rid}/metrics", json={"step": 0, "values": {"val_loss": 1.0}})
        assert r.status_code == 200 and r.json()["version"] == 2


@pytest.mark.postgres
def test_busy_postgres_is_503(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    import psycopg

    srv = server_factory(database=postgres_url, env={"LRSERVE_BUSY_TIMEOUT_MS": "300"})
    rid = new_id()
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        assert c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 10}).status_code == 200
        leased = c.get(f"/v1/runs/{rid}").json()["leased_until"]
        with psycopg.connect(postgres_url) as blocker:
            blocker.execute("SELECT id FROM runs WHERE id = %s FOR UPDATE", (rid,))
            r = c.post(f"/v1/runs/{rid}/metrics", json={"step": 0, "values": {"val_loss": 1.0}})
            problem(r, 503, "database-busy")
            assert r.headers["retry-after"].isdigit()
            assert c.get(f"/v1/runs/{rid}/lr").status_code == 200  # readers do not wait
            beyond = c.get(f"/v1/runs/{rid}/lr", params={"start": leased, "count": 10})
            problem(beyond, 503, "database-busy")  # a new lease needs the row
            blocker.rollback()
        r = c.post(f"/v1/runs/{rid}/metrics", json={"step": 0, "values": {"val_loss": 1.0}})
        assert r.status_code == 200 and r.json()["version"] == 2


def test_state_survives_restart(server_factory: Callable[..., ServerProcess], db_url: str) -> None:
    srv = server_factory(database=db_url)
    rid = new_id()
    with srv.client() as c:
        c.put(f"/v1/runs/{rid}", json=plateau_spec(patience=0))
        for step, loss in enumerate([1.0, 2.0, 3.0]):
            c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}})
        window = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 10}).json()
        before = c.get(f"/v1/runs/{rid}").json()
        assert before["leased_until"] >= 10
    srv.kill()
    again = server_factory(database=db_url)
    with again.client() as c:
        assert c.get(f"/v1/runs/{rid}").json() == before
        assert c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 10}).json() == window
        r = c.post(f"/v1/runs/{rid}/metrics", json={"step": 2, "values": {"val_loss": 3.0}})
        assert r.status_code == 200 and r.json()["version"] == before["version"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    full["PYTHONPATH"] = str(ROOT)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
    )


def test_cli_refuses_unauthenticated_public_bind(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    r = _cli("--host", "0.0.0.0", "--database", db)
    assert r.returncode == 2 and "--insecure-bind-all" in r.stderr and "token" in r.stderr
    r = _cli("--database", "mysql://x")
    assert r.returncode == 2 and "database" in r.stderr
    r = _cli("--database", "sqlite:////no/such/dir/x.db")
    assert r.returncode == 2
    r = _cli("--workers", "0", "--database", db)
    assert r.returncode == 2
    assert "--read-token" in _cli("--help").stdout


def test_cli_env_and_workers(server_factory: Callable[..., ServerProcess]) -> None:
    # Two workers share one SQLite file; settings reach them through the environment.
    srv = server_factory(args=["--workers", "2"], env={"LRSERVE_TOKEN": TOKEN})
    assert srv.token is None
    rid = new_id()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{srv.url}/v1/runs", timeout=10).status_code == 401
    assert (
        httpx.put(
            f"{srv.url}/v1/runs/{rid}", json=plateau_spec(world_size=2), headers=headers, timeout=10
        ).status_code
        == 201
    )

    results: list[httpx.Response] = []

    def report(rank: int) -> None:
        results.append(
            httpx.post(
                f"{srv.url}/v1/runs/{rid}/metrics",
                params={"wait": 10},
                json={"step": 0, "rank": rank, "values": {"val_loss": 1.0}},
                headers=headers,
                timeout=30,
            )
        )

    threads = [threading.Thread(target=report, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["complete"] for r in results)
    events = httpx.get(f"{srv.url}/v1/runs/{rid}/events", headers=headers, timeout=10).json()
    assert [e["type"] for e in events["events"]] == ["created", "report_completed"]


@pytest.mark.postgres
def test_two_replicas_one_history(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    a = server_factory(database=postgres_url)
    b = server_factory(database=postgres_url)
    rid = new_id()
    barrier = threading.Barrier(2)
    created: list[int] = []

    def create(srv: ServerProcess) -> None:
        barrier.wait()
        created.append(
            httpx.put(
                f"{srv.url}/v1/runs/{rid}", json=plateau_spec(world_size=2), timeout=30
            ).status_code
        )

    threads = [threading.Thread(target=create, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(created) == [200, 201]
    answers: list[httpx.Response] = []

    def report(srv: ServerProcess, rank: int) -> None:
        barrier.wait()
        answers.append(
            httpx.post(
                f"{srv.url}/v1/runs/{rid}/metrics",
                params={"wait": 10},
                json={"step": 0, "rank": rank, "values": {"val_loss": 1.0 + rank}},
                timeout=30,
            )
        )

    threads = [threading.Thread(target=report, args=(s, r)) for s, r in ((a, 0), (b, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in answers] == [200, 200]
    assert all(r.json()["complete"] for r in answers)
    assert answers[0].json()["groups"] == answers[1].json()["groups"]
    events = httpx.get(f"{a.url}/v1/runs/{rid}/events", timeout=10).json()["events"]
    assert [e["type"] for e in events] == ["created", "report_completed"]
    assert events[1]["data"]["aggregate"] == {"val_loss": 1.5}
