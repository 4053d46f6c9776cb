"""Group commit (service/runs/groupcommit.py): reports that arrive together on one process share
one SQLite transaction, each in its own savepoint.

Real SQLite files throughout. In process, a batch is formed by starting reports in the same turn
of the event loop: a refused report in it (a stale step, whose report row was already inserted
when it was refused; an unknown run; a rank out of range) rolls back alone and alters nothing,
while its neighbours commit and answer as they would alone. Over real HTTP (uvicorn), many
trainers reporting at once get the same answers as one trainer reporting alone, and every
acknowledged report is stored. (Durability across a SIGKILL under concurrent writers is
tests/service/test_crash.py, which runs through the same path.)
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.runs.errors import InvalidArgument, RunNotFound, StaleReport
from service.runs.model import RunSpec
from service.runs.repository import StoreError
from service.runs.service import Runs
from service.store import open_store
from tests.conftest import start_server
from tests.service.helpers import new_id, plateau_spec


def _loss(step: int) -> float:
    # Improves, then stalls: the plateau reduces now and then, so answers differ by state.
    return 1.0 / (1 + min(step, 7)) + 0.001 * (step % 3)


def test_a_refused_report_in_a_group_rolls_back_alone(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    store.migrate()
    runs = Runs(store)
    ids = [new_id() for _ in range(4)]

    async def scenario() -> tuple[list[Any], Any]:
        for rid in ids:
            await runs.create(rid, RunSpec.model_validate(plateau_spec()))
        await runs.report(ids[0], 5, 0, {"val_loss": 0.5})
        before = [store.get_run(rid) for rid in ids]
        groups0 = runs._group.groups
        # All started in one turn of the loop: one group.
        results = await asyncio.gather(
            runs.report(ids[0], 6, 0, {"val_loss": 0.4}),
            runs.report(
                ids[0], 3, 0, {"val_loss": 9.0}
            ),  # stale: its row is inserted, then refused
            runs.report(ids[1], 1, 0, {"val_loss": 0.3}),
            runs.report("no-such-run", 1, 0, {"val_loss": 0.3}),
            runs.report(ids[2], 1, 7, {"val_loss": 0.3}),  # rank 7 of a world of 1
            runs.report(ids[3], 1, 0, {"val_loss": 0.2}),
            return_exceptions=True,
        )
        assert runs._group.groups == groups0 + 1, "the six reports were not one group"
        return before, results

    before, results = asyncio.run(scenario())
    ok6, stale, ok1, missing, bad_rank, ok3 = results
    assert isinstance(stale, StaleReport), stale
    assert isinstance(missing, RunNotFound), missing
    assert isinstance(bad_rank, InvalidArgument), bad_rank
    for r in (ok6, ok1, ok3):
        assert not isinstance(r, BaseException), r
    # The refused reports altered nothing: no row, the run's counters as before.
    assert store.count_reports(ids[0], 3) == 0
    assert store.count_reports(ids[0], 6) == 1
    run0 = store.get_run(ids[0])
    assert run0 is not None and before[0] is not None
    assert run0.version == before[0].version + 1 and run0.completed_step == 6
    run2 = store.get_run(ids[2])
    assert run2 == before[2]
    assert store.reports(ids[2]) == []
    # The neighbours committed, and answer as a report alone does.
    for rid, r in ((ids[1], ok1), (ids[3], ok3)):
        assert store.count_reports(rid, 1) == 1
        assert r.complete and r.step == 1
    store.close()


def test_group_fails_as_a_whole_when_the_commit_cannot_happen(tmp_path: Path) -> None:
    """When the group cannot take the lock within busy_timeout (another connection holds it),
    every report in it is refused (503) and none is stored."""
    path = tmp_path / "busy.db"
    store = open_store(f"sqlite:///{path}")
    store.migrate()
    store.busy_timeout_ms = 200  # type: ignore[attr-defined]
    runs = Runs(store)
    ids = [new_id() for _ in range(3)]

    import sqlite3

    async def scenario() -> list[Any]:
        for rid in ids:
            await runs.create(rid, RunSpec.model_validate(plateau_spec()))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            return await asyncio.gather(
                *(runs.report(rid, 1, 0, {"val_loss": 0.5}) for rid in ids),
                return_exceptions=True,
            )
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

    results = asyncio.run(scenario())
    assert all(isinstance(r, StoreError) for r in results), results
    assert all(store.reports(rid) == [] for rid in ids)
    # And the next group goes through.
    after = asyncio.run(runs.report(ids[0], 1, 0, {"val_loss": 0.5}))
    assert after.complete
    store.close()


def _report_all(url: str, rid: str, steps: int, answers: dict[int, Any], errors: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for step in range(1, steps + 1):
            r = client.post(
                f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": _loss(step)}}
            )
            if r.status_code != 200:
                errors.append(f"{rid} step {step}: {r.status_code} {r.text}")
                return
            answers[step] = r.json()["groups"]


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_reports_over_http_answer_as_alone(tmp_path: Path, workers: int) -> None:
    srv = start_server(
        tmp_path, f"sqlite:///{tmp_path / 'lrserve.db'}", args=["--workers", str(workers)]
    )
    try:
        url = srv.url
        spec = plateau_spec(patience=1)
        with httpx.Client(base_url=url, timeout=30) as client:
            ids = [new_id("gc") for _ in range(12)]
            for rid in [*ids, "alone"]:
                assert client.put(f"/v1/runs/{rid}", json=spec).status_code in (200, 201)
        steps = 25
        # The reference: one trainer alone, one report at a time.
        alone: dict[int, Any] = {}
        errors: list[str] = []
        _report_all(url, "alone", steps, alone, errors)
        answers: dict[str, dict[int, Any]] = {rid: {} for rid in ids}
        threads = [
            threading.Thread(target=_report_all, args=(url, rid, steps, answers[rid], errors))
            for rid in ids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        with httpx.Client(base_url=url, timeout=30) as client:
            for rid in ids:
                assert answers[rid] == alone, rid
                run = client.get(f"/v1/runs/{rid}").json()
                assert run["completed_step"] == steps
                history = client.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json()
                assert [p["step"] for p in history["points"]] == list(range(1, steps + 1))
                events = client.get(f"/v1/runs/{rid}/events").json()["events"]
                completed = [e["step"] for e in events if e["type"] == "report_completed"]
                assert completed == list(range(1, steps + 1))
                # A repeated report is a duplicate and answers as the first time did.
                again = client.post(
                    f"/v1/runs/{rid}/metrics", json={"step": 3, "values": {"val_loss": _loss(3)}}
                )
                assert again.status_code == 200 and again.json()["groups"] == alone[3]
    finally:
        srv.stop()
