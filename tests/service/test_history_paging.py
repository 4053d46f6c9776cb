"""Metric history a page at a time, over HTTP on both databases: the default page, following
``next_after_step`` to the end (every point exactly once), and bad parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.runs.transactions import report
from service.store import open_store
from tests.conftest import ServerProcess
from tests.service.helpers import new_id
from tests.service.test_runs_api import problem

DEFAULT_PAGE = 10_000
SPEC: dict[str, Any] = {
    "groups": [{"name": "g0", "lr": 0.1}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 100_000},
}


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _pages(client: httpx.Client, rid: str, **params: Any) -> list[dict[str, Any]]:
    pages = []
    cursor = None
    while True:
        q = {"name": "loss", **params}
        if cursor is not None:
            q["after_step"] = cursor
        r = client.get(f"/v1/runs/{rid}/metrics", params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(page)
        cursor = page["next_after_step"]
        if cursor is None:
            return pages
        assert len(pages) < 10_000


def test_the_default_page_is_ten_thousand_steps_and_the_rest_follows(
    server: ServerProcess, client: httpx.Client
) -> None:
    rid = new_id("page")
    assert client.put(f"/v1/runs/{rid}", json=SPEC).status_code == 201
    n = DEFAULT_PAGE + 7
    store = open_store(server.database)
    try:  # the service's own report transaction, in this process: 10^4 POSTs take long
        for step in range(n):
            report(store, rid, step, 0, {"loss": 1.0 / (step + 1), "other": 2.0})
    finally:
        store.close()
    first = client.get(f"/v1/runs/{rid}/metrics", params={"name": "loss"}).json()
    assert [p["step"] for p in first["points"]] == list(range(DEFAULT_PAGE))
    assert [a["step"] for a in first["aggregate"]] == list(range(DEFAULT_PAGE))
    assert first["next_after_step"] == DEFAULT_PAGE - 1
    assert first["points"][5]["value"] == pytest.approx(1.0 / 6)
    rest = client.get(
        f"/v1/runs/{rid}/metrics", params={"name": "loss", "after_step": DEFAULT_PAGE - 1}
    ).json()
    assert [p["step"] for p in rest["points"]] == list(range(DEFAULT_PAGE, n))
    assert rest["next_after_step"] is None
    pages = _pages(client, rid, limit=4096)
    assert [len(p["points"]) for p in pages] == [4096, 4096, n - 8192]
    assert [p["step"] for page in pages for p in page["points"]] == list(range(n))


def test_following_pages_yields_every_point_exactly_once(client: httpx.Client) -> None:
    rid = new_id("pages")
    assert client.put(f"/v1/runs/{rid}", json={**SPEC, "world_size": 3}).status_code == 201
    sent = set()
    for step in range(0, 40, 2):  # sparse steps, ranks out of order, one step incomplete
        ranks = (2, 0, 1) if step != 38 else (1,)
        for rank in ranks:
            values = {"loss": step + rank / 10}
            if step % 4 == 0:
                values["acc"] = 0.5  # other metrics in the same reports
            body = {"step": step, "rank": rank, "values": values}
            assert client.post(f"/v1/runs/{rid}/metrics", json=body).status_code == 200
            sent.add((step, rank))
    for limit in (1, 3, 7, 19, 20, 21, 10_000):
        pages = _pages(client, rid, limit=limit)
        points = [(p["step"], p["rank"]) for page in pages for p in page["points"]]
        assert len(points) == len(set(points)) == len(sent) and set(points) == sent, limit
        for page in pages:
            steps = {p["step"] for p in page["points"]}
            assert len(steps) <= limit  # every rank's point of a step on the same page
            assert all(p["value"] == p["step"] + p["rank"] / 10 for p in page["points"])
        aggregate = [a["step"] for page in pages for a in page["aggregate"]]
        assert aggregate == list(range(0, 38, 2)), limit  # the incomplete step has none
        assert len(pages) == -(-20 // limit), limit
    # The live tail: after the last step, nothing, and the end.
    tail = client.get(f"/v1/runs/{rid}/metrics", params={"name": "loss", "after_step": 38})
    assert tail.json()["points"] == [] and tail.json()["next_after_step"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"name": "loss", "limit": 0},
        {"name": "loss", "limit": 100_001},
        {"name": "loss", "limit": "many"},
        {"name": "loss", "after_step": -2},
        {"name": "loss", "after_step": "x"},
        {"name": ""},
        {"name": "x" * 201},
    ],
)
def test_bad_parameters_are_422_problems_and_change_nothing(
    client: httpx.Client, params: dict[str, Any]
) -> None:
    rid = new_id("bad")
    assert client.put(f"/v1/runs/{rid}", json=SPEC).status_code == 201
    body = {"step": 0, "values": {"loss": 1.0}}
    assert client.post(f"/v1/runs/{rid}/metrics", json=body).status_code == 200
    before = client.get(f"/v1/runs/{rid}").json()
    problem(client.get(f"/v1/runs/{rid}/metrics", params=params), 422, "validation-error")
    assert client.get(f"/v1/runs/{rid}").json() == before
    hist = client.get(f"/v1/runs/{rid}/metrics", params={"name": "loss"}).json()
    assert [p["value"] for p in hist["points"]] == [1.0]


def test_an_unknown_run_is_a_404_problem(client: httpx.Client) -> None:
    r = client.get(f"/v1/runs/{new_id('none')}/metrics", params={"name": "loss"})
    problem(r, 404, "run-not-found")
