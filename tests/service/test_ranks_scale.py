"""Many ranks (issue 12): a values version, per-step counts kept incrementally, waits woken.

Over real HTTP on SQLite and PostgreSQL:

- a window's ETag names the run's *values*: partial reports and a completion that decides
  no reduction leave it valid (304), and the values are still torch's; a reduction, an
  override and a rewind change it;
- ``reported_ranks`` counts ranks as they come, restarts after a rewind and after a delete;
- reports waiting with ``?wait=`` are all answered once the last rank reports, on one
  server and across two servers sharing one PostgreSQL database;
- a PostgreSQL store hears the completions other processes commit, never its own;
- the waits of a run share their polls, and the read of the step a NOTIFY wakes them to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.runs.model import RunSpec
from service.runs.repository import Store
from service.runs.service import Runs
from service.runs.transactions import report as report_to_store
from service.store import open_store
from tests.conftest import ServerProcess, postgres_database, start_server
from tests.service.helpers import close, new_id, plateau_spec


def torch_plateau_lrs(losses: list[float], base: list[float], steps: int) -> list[list[float]]:
    """torch's lr per group at steps ``0 .. steps - 1`` after ``losses[s]`` at step ``s``
    (patience 1, factor 0.5): the lr of step ``s + 1`` is read after ``step(losses[s])``."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base, strict=True)])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    out = [[g["lr"] for g in opt.param_groups]]
    for s in range(steps - 1):
        if s < len(losses):
            sched.step(losses[s])
        out.append([g["lr"] for g in opt.param_groups])
    return out


def window(client: httpx.Client, run_id: str, etag: str | None = None) -> httpx.Response:
    headers = {"If-None-Match": etag} if etag else {}
    return client.get(f"/v1/runs/{run_id}/lr", params={"start": 0, "count": 20}, headers=headers)


def check_torch(body: dict[str, Any], losses: list[float]) -> None:
    expected = torch_plateau_lrs(losses, [0.1, 0.01], 20)
    for i, name in enumerate(("g0", "g1")):
        got = body["groups"][name]["lr"]
        assert close(got, [expected[step][i] for step in range(20)]), (name, got)


def report(client: httpx.Client, run_id: str, step: int, rank: int, loss: float) -> dict[str, Any]:
    r = client.post(
        f"/v1/runs/{run_id}/metrics",
        json={"step": step, "rank": rank, "values": {"val_loss": loss}},
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_the_etag_changes_only_when_values_change(server: ServerProcess) -> None:
    ranks = 8
    with server.client() as c:
        run_id = new_id()
        assert c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=ranks)).status_code == 201
        first = window(c, run_id)
        assert first.status_code == 200
        etag = first.headers["ETag"]
        versions = [c.get(f"/v1/runs/{run_id}").json()["version"]]
        losses = [1.0, 2.0, 3.0]  # patience 1: step 2's report reduces, from step 3 on
        for step, loss in enumerate(losses[:2]):
            for rank in range(ranks):
                answer = report(c, run_id, step, rank, loss)
                assert answer["reported_ranks"] == rank + 1
                assert answer["complete"] == (rank == ranks - 1)
                # The answer names the values version its trainer's window still has.
                assert answer["values_version"] == first.json()["version"], (step, rank)
                versions.append(c.get(f"/v1/runs/{run_id}").json()["version"])
                # A partial report, or a completion without a reduction: still exact.
                assert window(c, run_id, etag).status_code == 304, (step, rank)
        # The run's version still counts every report (API.md); the values version did not move.
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        again = window(c, run_id)
        assert again.headers["ETag"] == etag
        assert again.json() == first.json()
        check_torch(again.json(), losses[:2])
        doc = c.get(f"/v1/runs/{run_id}").json()
        assert doc["values_version"] == first.json()["version"]

        for rank in range(ranks):
            answer = report(c, run_id, 2, rank, losses[2])
        assert answer["complete"] and answer["decision"]["reduced"]
        changed = window(c, run_id, etag)
        assert changed.status_code == 200
        assert changed.headers["ETag"] != etag
        assert answer["values_version"] == changed.json()["version"] != first.json()["version"]
        check_torch(changed.json(), losses)
        assert changed.json()["groups"] != first.json()["groups"]
        assert answer["groups"]["g0"]["lr"] == pytest.approx(0.05)

        # An override changes values: a new ETag at once.
        etag = changed.headers["ETag"]
        r = c.post(
            f"/v1/runs/{run_id}/overrides", json={"from_step": 200, "action": "scale", "value": 2}
        )
        assert r.status_code == 201, r.text
        overridden = window(c, run_id, etag)
        assert overridden.status_code == 200 and overridden.headers["ETag"] != etag
        at = c.get(f"/v1/runs/{run_id}/lr", params={"step": 200, "lease": "false"}).json()
        assert at["groups"]["g0"]["lr"] == pytest.approx(0.1)

        # A rewind to before the reduction takes it back: another ETag, torch's values again.
        etag = overridden.headers["ETag"]
        r = c.post(f"/v1/runs/{run_id}/rewind", json={"to_step": 1, "key": "k1"})
        assert r.status_code in (200, 201), r.text
        rewound = window(c, run_id, etag)
        assert rewound.status_code == 200 and rewound.headers["ETag"] != etag
        assert rewound.json()["groups"]["g0"]["lr"][5] == pytest.approx(0.1)
        # Step 2 starts counting again after the rewind.
        assert report(c, run_id, 2, 0, 0.5)["reported_ranks"] == 1
        assert report(c, run_id, 2, 0, 0.5)["reported_ranks"] == 1  # the same key again
        conflict = c.post(
            f"/v1/runs/{run_id}/metrics", json={"step": 2, "rank": 0, "values": {"val_loss": 9}}
        )
        assert conflict.status_code == 409
        assert report(c, run_id, 2, 1, 0.5)["reported_ranks"] == 2


def test_counts_restart_when_a_run_is_created_again(server: ServerProcess) -> None:
    with server.client() as c:
        run_id = new_id()
        for _ in range(2):
            assert c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=4)).status_code == 201
            for rank in range(3):
                assert report(c, run_id, 0, rank, 1.0)["reported_ranks"] == rank + 1
            assert c.delete(f"/v1/runs/{run_id}").status_code in (200, 204)


def wait_all(
    server: ServerProcess, run_id: str, ranks: range, step: int
) -> tuple[list[dict[str, Any]], list[threading.Thread]]:
    """Reports of ``ranks`` for ``step``, each waiting (in its own thread) for the step."""
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(rank: int) -> None:
        with server.client(timeout=60) as c:
            r = c.post(
                f"/v1/runs/{run_id}/metrics",
                params={"wait": 30},
                json={"step": step, "rank": rank, "values": {"val_loss": 1.0 + rank}},
            )
            with lock:
                answers.append(r.json() if r.status_code == 200 else {"error": r.text})

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    return answers, threads


def join(threads: list[threading.Thread], answers: list[dict[str, Any]], n: int) -> None:
    for t in threads:
        t.join(60)
    assert len(answers) == n
    assert all(a.get("complete") for a in answers), answers


def waiting(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    for line in text.splitlines():
        if line.startswith("lrserve_report_waits "):
            return float(line.split()[1])
    return 0.0


def recorded(server: ServerProcess, run_id: str, since: int, reports: int) -> bool:
    """Whether ``reports`` new reports are stored (each bumps the run's version): the
    ``lrserve_report_waits`` gauge counts a waiting report from before its write."""
    with server.client() as c:
        return bool(c.get(f"/v1/runs/{run_id}").json()["version"] >= since + reports)


def until(predicate: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def count_calls(obj: Any, name: str) -> list[int]:
    """Replace ``obj.<name>`` with a wrapper counting its calls (the real method still
    runs); the count is the returned list's one item."""
    calls = [0]
    real = getattr(obj, name)

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    setattr(obj, name, counted)
    return calls


def runs_on_sqlite(path: Path, **settings: Any) -> tuple[Store, Runs]:
    """A migrated SQLite store at ``path`` and a run service over it (close the store)."""
    store = open_store(f"sqlite:///{path}")
    store.migrate()
    return store, Runs(store, **settings)


def start_waits(runs: Runs, run_id: str, ranks: range) -> list[asyncio.Future[Any]]:
    """Reports of ``ranks`` for step 0, each waiting up to 10 s for the step."""
    return [
        asyncio.ensure_future(runs.report(run_id, 0, rank, {"val_loss": 1.0}, wait=10))
        for rank in ranks
    ]


def test_waiting_ranks_are_answered_when_the_last_one_reports(server: ServerProcess) -> None:
    ranks = 24
    with server.client() as c:
        run_id = new_id()
        created = c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=ranks))
        assert created.status_code == 201
        answers, threads = wait_all(server, run_id, range(ranks - 1), 0)
        since = created.json()["version"]
        assert until(lambda: recorded(server, run_id, since, ranks - 1), 30)
        assert until(lambda: waiting(server) >= ranks - 1, 30), waiting(server)
        last = report(c, run_id, 0, ranks - 1, 5.0)
        join(threads, answers, ranks - 1)
    assert last["complete"]
    for a in answers:
        assert a.get("complete") is True, a
        assert a["reported_ranks"] == ranks
        assert a["decision"] == last["decision"]
        assert a["groups"] == last["groups"]


@pytest.mark.postgres
def test_a_completion_on_one_replica_answers_waits_on_another(tmp_path: Path) -> None:
    with postgres_database() as url:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        # Server A polls for completions only every minute: its waits can end in time only
        # if B's completion wakes them (NOTIFY).
        a = start_server(tmp_path / "a", url, env={"LRSERVE_WAIT_POLL_SECONDS": "60"})
        b = start_server(tmp_path / "b", url)
        try:
            ranks = 8
            run_id = new_id()
            with b.client() as cb:
                created = cb.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=ranks))
                assert created.status_code == 201
                answers, threads = wait_all(a, run_id, range(ranks - 1), 0)
                since = created.json()["version"]
                assert until(lambda: recorded(b, run_id, since, ranks - 1), 30)
                assert until(lambda: waiting(a) >= ranks - 1, 30)
                started = time.monotonic()
                last = report(cb, run_id, 0, ranks - 1, 2.0)
                join(threads, answers, ranks - 1)
                elapsed = time.monotonic() - started
            assert last["complete"]
            assert elapsed < 20, f"the waits on A ended {elapsed:.1f} s after B's completion"
            for ans in answers:
                assert ans.get("complete") is True, ans
                assert ans["decision"] == last["decision"]
        finally:
            a.stop()
            b.stop()


def test_a_run_created_again_does_not_answer_with_the_old_completion(
    server: ServerProcess,
) -> None:
    with server.client() as c:
        run_id = new_id()
        created = c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=2))
        assert created.status_code == 201
        answers, threads = wait_all(server, run_id, range(1), 0)
        assert until(lambda: recorded(server, run_id, created.json()["version"], 1), 30)
        assert until(lambda: waiting(server) >= 1, 30)
        assert report(c, run_id, 0, 1, 1.0)["complete"]
        join(threads, answers, 1)
        assert c.delete(f"/v1/runs/{run_id}").status_code in (200, 204)
        assert c.put(f"/v1/runs/{run_id}", json=plateau_spec(world_size=2)).status_code == 201
        r = c.post(
            f"/v1/runs/{run_id}/metrics",
            params={"wait": 1},
            json={"step": 0, "rank": 0, "values": {"val_loss": 1.0}},
        )
        assert r.status_code == 200
        assert r.json()["complete"] is False and r.json()["reported_ranks"] == 1


def test_a_completion_heard_while_a_waiting_report_is_written_ends_its_wait(
    tmp_path: Path,
) -> None:
    """A completion another replica announces between a waiting report's write and the
    start of its wait (the listener's callback, called here as the listener calls it) wakes
    that wait: the report subscribed before writing. Polling every 60 s, a missed wake-up
    would show as a timeout."""
    store, runs = runs_on_sqlite(tmp_path / "w.db", wait_poll_seconds=60)
    run_id = new_id()

    async def scenario() -> tuple[Any, float]:
        await runs.create(run_id, RunSpec.model_validate(plateau_spec(world_size=2)))
        subscribed = runs._subscribe(run_id)
        # The waiting report's write, then "another replica's" completing one (straight to
        # the store, so this process's own wake-up plays no part), then its NOTIFY heard.
        report_to_store(store, run_id, 0, 0, {"val_loss": 1.0})
        report_to_store(store, run_id, 0, 1, {"val_loss": 2.0})
        runs._heard(run_id, 0)
        started = time.monotonic()
        status = await runs._wait_for_step(run_id, 0, 5.0, subscribed=subscribed)
        return status, time.monotonic() - started

    try:
        status, elapsed = asyncio.run(scenario())
    finally:
        store.close()
    assert status is not None and status[1] is True and status[2] == 2, status
    assert elapsed < 1.0, elapsed


@pytest.mark.postgres
def test_a_store_hears_the_completions_of_other_processes_not_its_own() -> None:
    """PostgreSQL: a completion's NOTIFY reaches the listener of every store on the
    database but the one whose connection committed it (that store's process answers its
    waits itself; heard, its waits would each read the step and leave nothing to deliver)."""
    with postgres_database() as url:
        here, there = open_store(url), open_store(url)
        try:
            here.migrate()
            heard: dict[str, list[tuple[str, int]]] = {"here": [], "there": []}
            assert here.listen(lambda run, step: heard["here"].append((run, step)))
            assert there.listen(lambda run, step: heard["there"].append((run, step)))
            time.sleep(1.5)  # (both listeners connected and LISTENing)
            ours, theirs = new_id(), new_id()
            for run_id in (ours, theirs):
                store = here if run_id == ours else there
                runs = Runs(store)
                spec = RunSpec.model_validate(plateau_spec(world_size=1))
                asyncio.run(runs.create(run_id, spec))
                report_to_store(store, run_id, 0, 0, {"val_loss": 1.0})
            assert until(lambda: (theirs, 0) in heard["here"] and (ours, 0) in heard["there"], 10)
            time.sleep(0.5)  # (time for a wrongly heard own notification to arrive)
            assert (ours, 0) not in heard["here"], heard
            assert (theirs, 0) not in heard["there"], heard
        finally:
            here.close()
            there.close()


def test_the_waits_of_a_run_share_their_polls(tmp_path: Path) -> None:
    """Waits nothing wakes (the step completed by another worker: SQLite has no channel)
    poll the database, and the waits of one run share each poll: 40 waits over about a
    second read ``completed_step`` a few times per poll interval, not 40 times, and are all
    answered once the completion is polled."""
    store, runs = runs_on_sqlite(tmp_path / "polls.db")
    run_id = new_id()
    ranks = 41
    reads = [0]

    async def scenario() -> list[Any]:
        nonlocal reads
        await runs.create(run_id, RunSpec.model_validate(plateau_spec(world_size=ranks)))
        reads = count_calls(store, "completed_step")
        waits = start_waits(runs, run_id, range(ranks - 1))
        await asyncio.sleep(0.8)
        # "Another worker" completes the step: straight to the store, nothing in this process
        # hears of it but the polls.
        report_to_store(store, run_id, 0, ranks - 1, {"val_loss": 1.0})
        return list(await asyncio.wait_for(asyncio.gather(*waits), 5))

    try:
        outcomes = asyncio.run(scenario())
    finally:
        store.close()
    assert all(o.complete and o.reported_ranks == ranks for o in outcomes), outcomes
    # About 1.1 s of polling every 250 ms, a read shared for 125 ms: under 20 reads (40 waits
    # polling apart would read over 160 times).
    assert 1 <= reads[0] < 20, reads[0]


def test_idle_waits_are_not_woken_until_they_have_something_to_do(tmp_path: Path) -> None:
    """The waits of a run share one timer (the run's ticker): over about a second of nothing
    happening, 40 waits whose client check is a flag are not woken at all (the ticker asks
    the flags and polls once a tick), then a client that leaves ends its own wait at the next
    tick, and the completion polled ends the others."""
    store, runs = runs_on_sqlite(tmp_path / "idle.db")
    run_id = new_id()
    ranks = 41
    polls = [0]
    gone = [False] * ranks
    asked = [0]

    def client_check(rank: int) -> Callable[[], bool]:
        def abandoned() -> bool:
            asked[0] += 1
            return gone[rank]

        return abandoned

    async def scenario() -> tuple[list[Any], float]:
        nonlocal polls
        await runs.create(run_id, RunSpec.model_validate(plateau_spec(world_size=ranks)))
        polls = count_calls(runs, "_polled_completion")
        waits = [
            asyncio.ensure_future(
                runs.report(run_id, 0, rank, {"val_loss": 1.0}, 10, client_check(rank))
            )
            for rank in range(ranks - 1)
        ]
        await asyncio.sleep(1.0)
        assert len(runs._tickers) == 1
        idle_polls, idle_asked = polls[0], asked[0]
        gone[3] = True
        t0 = time.monotonic()
        left = await asyncio.wait_for(waits[3], 2)
        left_after = time.monotonic() - t0
        report_to_store(store, run_id, 0, ranks - 1, {"val_loss": 1.0})
        others = list(await asyncio.wait_for(asyncio.gather(*waits[:3], *waits[4:]), 5))
        assert not runs._tickers and not runs._waits
        return [idle_polls, idle_asked, left, *others], left_after

    try:
        (idle_polls, idle_asked, left, *others), left_after = asyncio.run(scenario())
    finally:
        store.close()
    # About 4 ticks in the idle second: one poll each (40 waits woken each tick polled 160
    # times), and each flag asked once a tick by the ticker, never by a woken wait.
    assert 2 <= idle_polls <= 8, idle_polls
    assert idle_asked <= 40 * 6, idle_asked
    assert not left.complete and left_after < 1.0
    assert all(o.complete and o.reported_ranks == ranks for o in others), others


def test_waits_woken_by_a_notify_share_one_fresh_read_of_the_step(tmp_path: Path) -> None:
    """A completion heard from another replica (the listener's callback, called here as the
    listener calls it) wakes a run's waits at once, even just after a poll read that found
    the step incomplete, and the waits read the step's status once between them, not once
    each."""
    store, runs = runs_on_sqlite(tmp_path / "heard.db")
    run_id = new_id()
    ranks = 31
    status_reads = [0]

    async def scenario() -> tuple[list[Any], float]:
        nonlocal status_reads
        await runs.create(run_id, RunSpec.model_validate(plateau_spec(world_size=ranks)))
        waits = start_waits(runs, run_id, range(ranks - 1))
        await asyncio.sleep(0.1)
        status_reads = count_calls(store, "event_at")
        # A poll read just now, before the completion: it must not answer the woken waits.
        assert (await runs._polled_completion(run_id, 0.125))[1] is None
        report_to_store(store, run_id, 0, ranks - 1, {"val_loss": 1.0})
        runs._heard(run_id, 0)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*waits), 5)
        return list(outcomes), time.monotonic() - started

    try:
        outcomes, elapsed = asyncio.run(scenario())
    finally:
        store.close()
    assert all(o.complete and o.reported_ranks == ranks for o in outcomes), outcomes
    assert elapsed < 0.1, elapsed  # (not left to the next poll, 250 ms on)
    assert 1 <= status_reads[0] <= 2, status_reads[0]
