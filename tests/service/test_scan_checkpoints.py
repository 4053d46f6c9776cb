"""Scan checkpoints in the database (issue 12): after a restart, a window far into a scanning
ChainedScheduler resumes from a checkpoint the previous process stored, instead of scanning
from step 0; values equal torch's. Real uvicorn servers over HTTP, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from service.store import open_store
from tests.conftest import ServerProcess
from tests.schedules.conftest import assert_matches
from tests.schedules.test_compose_checkpoints import COS, EXP, LRS, ROP, RTOL, chain_torch

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")

FAR = 120_000
COUNT = 500
EDGES = (FAR + COUNT - 1) // 2048 - 2
"""Checkpoints a scan to FAR + COUNT stores: every block edge but the first two (its start)."""
SPEC = {
    "groups": [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(LRS)],
    "schedule": {"type": "ChainedScheduler", "schedulers": [EXP, COS]},
}


def counter(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def far_window(client: httpx.Client, run_id: str = "chain") -> np.ndarray:
    r = client.get(f"/v1/runs/{run_id}/lr", params={"start": FAR, "count": COUNT})
    assert r.status_code == 200, r.text
    groups = r.json()["groups"]
    return np.array([groups[f"g{i}"]["lr"] for i in range(len(LRS))])


def stored(db_url: str) -> int:
    store = open_store(db_url)
    try:
        return sum(len(store.scan_checkpoints(c, 10**9, 0, 10**6)) for c in curves(store))
    finally:
        store.close()


def curves(store: Any) -> list[str]:
    with store.read_conn() as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT curve FROM scan_checkpoints")]


def test_a_restarted_server_resumes_far_scans_from_stored_checkpoints(
    server_factory: Callable[..., ServerProcess], db_url: str
) -> None:
    theirs = chain_torch([EXP, COS], FAR + COUNT, {})[:, FAR:]
    server = server_factory(database=db_url)
    with server.client() as client:
        assert client.put("/v1/runs/chain", json=SPEC).status_code in (200, 201)
        first = far_window(client)
        assert_matches(first, theirs, RTOL)
        assert counter(client, "lrserve_scan_checkpoints_loaded_total") == 0
        deadline = time.monotonic() + 10
        while counter(client, "lrserve_scan_checkpoints_saved_total") < EDGES:
            assert time.monotonic() < deadline, "checkpoints were not written"
            time.sleep(0.05)
    server.stop()
    assert stored(db_url) == EDGES

    again = server_factory(database=db_url)
    with again.client() as client:
        resumed = far_window(client)
        assert np.array_equal(resumed, first)
        assert counter(client, "lrserve_scan_checkpoints_loaded_total") == 1
        # Deleting the run deletes its checkpoints.
        assert client.delete("/v1/runs/chain").status_code == 204
    again.stop()
    assert stored(db_url) == 0


def test_a_report_after_a_restart_resumes_the_scan_in_its_transaction(
    server_factory: Callable[..., ServerProcess], db_url: str
) -> None:
    """A plateau child decides on the chain's value just before it: the first report after a
    restart, far into the run, resumes that scan from a stored checkpoint while its
    transaction is open (a second connection on PostgreSQL, the same one on SQLite)."""
    nodes = [EXP, ROP, COS]
    spec = {**SPEC, "schedule": {"type": "ChainedScheduler", "schedulers": nodes}}
    reports = {100: 1.0, 50_000: 1.0}
    last = FAR + 10
    theirs = chain_torch(nodes, last + 2, {**reports, last: 1.0})[:, last + 1]
    server = server_factory(database=db_url)
    with server.client() as client:
        assert client.put("/v1/runs/plateau", json=spec).status_code in (200, 201)
        for step, loss in reports.items():
            r = client.post(
                "/v1/runs/plateau/metrics", json={"step": step, "values": {"loss": loss}}
            )
            assert r.status_code == 200, r.text
        far_window(client, "plateau")
        deadline = time.monotonic() + 10
        while counter(client, "lrserve_scan_checkpoints_saved_total") < EDGES:
            assert time.monotonic() < deadline, "checkpoints were not written"
            time.sleep(0.05)
    server.stop()

    again = server_factory(database=db_url)
    with again.client() as client:
        r = client.post("/v1/runs/plateau/metrics", json={"step": last, "values": {"loss": 1.0}})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["decision"]["reduced"], answer
        ours = np.array([answer["groups"][f"g{i}"]["lr"] for i in range(len(LRS))])
        assert_matches(ours[:, None], theirs[:, None], RTOL)
        assert counter(client, "lrserve_scan_checkpoints_loaded_total") >= 1
