"""The run list of the dashboard: status, search, tags, sorts and paging, on both databases.

A server per dialect with ``--idle-after 3`` (so a run turns idle within a test). Every test
scopes its queries with a tag of its own, as the module's runs share one database.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, postgres_database, start_server
from tests.service.test_runs_api import problem

IDLE_AFTER = 3.0


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp(f"list-{request.param}")
    args = ["--idle-after", str(IDLE_AFTER)]
    if request.param == "sqlite":
        srv = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}", args=args)
        try:
            yield srv
        finally:
            srv.stop()
        return
    with postgres_database() as url:
        srv = start_server(tmp, url, args=args)
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def spec(metadata: dict[str, Any] | None = None, t_max: int = 100) -> dict[str, Any]:
    return {
        "groups": [{"name": "g", "lr": 0.1}],
        "schedule": {"type": "CosineAnnealingLR", "T_max": t_max},
        "metadata": metadata or {},
    }


def scope() -> str:
    """A fresh tag of letters g..v only: no digit or common word that a search could hit."""
    return "t-" + "".join(chr(ord("g") + int(c, 16)) for c in uuid.uuid4().hex[:10])


def create(client: httpx.Client, run_id: str, **kw: Any) -> dict[str, Any]:
    r = client.put(f"/v1/runs/{run_id}", json=spec(**kw))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def report(client: httpx.Client, run_id: str, step: int) -> None:
    r = client.post(f"/v1/runs/{run_id}/metrics", json={"step": step, "values": {"loss": 1.0}})
    assert r.status_code == 200, r.text


def ids(client: httpx.Client, **params: Any) -> list[str]:
    r = client.get("/v1/runs", params=params)
    assert r.status_code == 200, r.text
    return [run["id"] for run in r.json()["runs"]]


def all_pages(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        r = client.get("/v1/runs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        out.extend(page["runs"])
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_items_carry_the_dashboard_fields(client: httpx.Client) -> None:
    tag = scope()
    rid = f"{tag}-a"
    meta = {"tags": [tag, "vision", 3], "tag": "main", "owner": "Ada"}
    create(client, rid, metadata=meta)
    report(client, rid, 10)
    (item,) = client.get("/v1/runs", params={"tag": tag}).json()["runs"]
    assert item["id"] == rid and item["step"] == 10 and item["completed_step"] == 10
    assert item["status"] == "running" and item["horizon"] == 100
    # Strings of metadata.tags, then metadata.tag; the number is no tag.
    assert item["tags"] == [tag, "vision", "main"]
    assert item["metadata"] == meta
    assert item["last_report_at"] is not None and item["heartbeat_at"] is None
    assert item["updated_at"] >= item["created_at"]
    run = client.get(f"/v1/runs/{rid}").json()
    assert run["status"] == "running" and run["horizon"] == 100
    assert run["tags"] == item["tags"] and run["last_report_at"] == item["last_report_at"]


def test_search_matches_ids_and_metadata_values_not_keys(client: httpx.Client) -> None:
    tag = scope()
    create(client, f"{tag}-Resnet50", metadata={"tags": [tag]})
    create(client, f"{tag}-b", metadata={"tags": [tag], "notes": {"who": ["Grace HOPPER"]}})
    create(client, f"{tag}-c", metadata={"tags": [tag], "lr_note": "50% off", "x": 5})
    assert ids(client, tag=tag, q="resnet") == [f"{tag}-Resnet50"]
    assert ids(client, tag=tag, q="hopper") == [f"{tag}-b"]  # nested, case-insensitive
    assert ids(client, tag=tag, q="lr_note") == []  # keys are not searched
    assert ids(client, tag=tag, q="50%") == [f"{tag}-c"]  # % is a character, not a wildcard
    assert ids(client, tag=tag, q="_") == []  # so is _ (no id or value has one)
    assert ids(client, tag=tag, q="0") == [f"{tag}-Resnet50", f"{tag}-c"]


def test_tags_must_all_match(client: httpx.Client) -> None:
    tag = scope()
    create(client, f"{tag}-1", metadata={"tags": [tag, "x"]})
    create(client, f"{tag}-2", metadata={"tags": [tag, "x", "y"]})
    create(client, f"{tag}-3", metadata={"tag": tag})
    assert ids(client, tag=tag) == [f"{tag}-1", f"{tag}-2", f"{tag}-3"]
    assert ids(client, tag=[tag, "x"]) == [f"{tag}-1", f"{tag}-2"]
    assert ids(client, tag=[tag, "x", "y"]) == [f"{tag}-2"]
    assert ids(client, tag=[tag, "X"]) == []  # exact


def test_every_sort_pages_through_every_run_once(client: httpx.Client) -> None:
    tag = scope()
    steps = [30, None, 5, 30, 12, None, 7]
    names = [f"{tag}-{c}" for c in "gcafedb"]
    for name, step in zip(names, steps, strict=True):
        create(client, name, metadata={"tags": [tag]})
        if step is not None:
            report(client, name, step)
    everything = {r["id"]: r for r in all_pages(client, tag=tag, limit=50)}
    assert sorted(everything) == sorted(names)
    keys = {
        "id": lambda r: (r["id"],),
        "created": lambda r: (r["created_at"], r["id"]),
        "updated": lambda r: (r["updated_at"], r["id"]),
        "step": lambda r: (-1 if r["step"] is None else r["step"], r["id"]),
    }
    for key, of in keys.items():
        for descending in (False, True):
            sort = f"-{key}" if descending else key
            expected = [r["id"] for r in sorted(everything.values(), key=of, reverse=descending)]
            paged = [r["id"] for r in all_pages(client, tag=tag, limit=2, sort=sort)]
            assert paged == expected, sort
    # The default order stays by id (the API before sorts existed).
    assert ids(client, tag=tag) == sorted(names)


def test_status_from_reports_heartbeats_and_the_horizon(client: httpx.Client) -> None:
    tag = scope()
    active, quiet, done, said = (f"{tag}-{n}" for n in ("active", "quiet", "done", "said"))
    for rid in (active, quiet, done, said):
        create(client, rid, metadata={"tags": [tag]}, t_max=50)
    report(client, active, 3)
    report(client, done, 49)  # the horizon is T_max = 50: step 49 is the last
    r = client.post(f"/v1/runs/{said}/heartbeat", json={"step": 20, "finished": True})
    assert r.status_code == 204, r.text

    def status(*wanted: str) -> list[str]:
        return ids(client, tag=tag, status=",".join(wanted))

    assert status("running") == [active]
    assert status("idle") == [quiet]
    assert status("finished") == [done, said]
    assert status("running", "idle") == [active, quiet]
    r = client.get("/v1/runs", params=[("tag", tag), ("status", "idle"), ("status", "finished")])
    assert [x["id"] for x in r.json()["runs"]] == [done, quiet, said]
    assert {x["id"]: x["status"] for x in all_pages(client, tag=tag)} == {
        active: "running",
        quiet: "idle",
        done: "finished",
        said: "finished",
    }
    # A report at a later step than the "finished" heartbeat: the job goes on.
    report(client, said, 21)
    assert status("running") == [active, said]
    # Time passes without a report: idle.
    time.sleep(IDLE_AFTER + 0.5)
    assert status("idle") == [active, quiet, said]
    assert client.get(f"/v1/runs/{active}").json()["status"] == "idle"


def test_metadata_total_steps_is_the_horizon(client: httpx.Client) -> None:
    tag = scope()
    rid = f"{tag}-t"
    create(client, rid, metadata={"tags": [tag], "total_steps": 20}, t_max=1000)
    report(client, rid, 18)
    assert client.get(f"/v1/runs/{rid}").json()["status"] == "running"
    report(client, rid, 19)
    run = client.get(f"/v1/runs/{rid}").json()
    assert run["horizon"] == 20 and run["status"] == "finished"


def test_bad_queries_are_422(client: httpx.Client) -> None:
    tag = scope()
    for name in "abc":
        create(client, f"{tag}-{name}", metadata={"tags": [tag]})
    problem(client.get("/v1/runs", params={"status": "sleeping"}), 422, "validation-error")
    problem(client.get("/v1/runs", params={"sort": "name"}), 422, "validation-error")
    problem(client.get("/v1/runs", params={"q": "a\nb"}), 422, "validation-error")
    problem(client.get("/v1/runs", params={"tag": "x" * 201}), 422, "validation-error")
    page = client.get("/v1/runs", params={"tag": tag, "limit": 1, "sort": "-step"}).json()
    assert page["next_cursor"]
    # A cursor of one order cannot page another.
    body = problem(
        client.get("/v1/runs", params={"tag": tag, "cursor": page["next_cursor"]}),
        422,
        "validation-error",
    )
    assert "sort=step" in body["detail"]
    for bad in ("!!!", "WyJzdGVwIiwgIngiLCAiYSJd", "e30"):  # junk, ["step","x","a"], {}
        problem(
            client.get("/v1/runs", params={"cursor": bad, "sort": "step"}), 422, "validation-error"
        )
    # A cursor of the id order, from before sorts existed, still pages.
    page = client.get("/v1/runs", params={"tag": tag, "limit": 1}).json()
    nxt = client.get("/v1/runs", params={"tag": tag, "limit": 1, "cursor": page["next_cursor"]})
    assert [r["id"] for r in nxt.json()["runs"]] == [f"{tag}-b"]


def test_runs_from_before_the_migration_are_derived(tmp_path: Path) -> None:
    """Rows written before schema v3 (its columns at their defaults) get their tags, search
    text, horizon and metric names when a server lists them."""
    db = tmp_path / "old.db"
    srv = start_server(tmp_path, f"sqlite:///{db}")
    try:
        with srv.client() as c:
            create(c, "old-1", metadata={"tags": ["legacy"], "owner": "Linus"})
            report(c, "old-1", 4)
    finally:
        srv.stop()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE runs SET metadata = NULL, tags = '[]', search = '', horizon = NULL, "
            "metric_names = NULL"
        )
        conn.execute("DELETE FROM run_tags")
    srv = start_server(tmp_path, f"sqlite:///{db}")
    try:
        with srv.client() as c:
            (item,) = c.get("/v1/runs", params={"tag": "legacy", "q": "linus"}).json()["runs"]
            assert item["tags"] == ["legacy"] and item["horizon"] == 100
            assert item["metadata"] == {"tags": ["legacy"], "owner": "Linus"}
            assert c.get("/v1/runs/old-1/metrics").json()["names"] == ["loss"]
    finally:
        srv.stop()
