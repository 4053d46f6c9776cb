"""A plateau node's reductions are rows of their own, not part of the run's state text.

Real SQLite files and the real PostgreSQL server, through the run layer's use cases (the
transactions the HTTP layer calls); torch's ``ReduceLROnPlateau`` is the oracle for every value.
What is held: the stored state stays the same size however many reductions there are; a reader
whose cached copy is short reads only the rows after it; a rewind rewrites the rows on its new
branch; a rolled-back write leaves nothing in the process's cache; a run deleted and created
again under its id is never read with the other run's rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from service.runs.model import RewindChange, RunSpec
from service.runs.repository import Store
from service.runs.service import Runs
from service.runs.states import LOGS, read_state
from service.runs.transactions import report
from service.store import open_store
from tests.conftest import postgres_database

BASE = [0.1, 0.01]
FACTOR = 0.9
PATH = "schedule"  # the state key of the spec's one plateau node


def spec() -> RunSpec:
    return RunSpec.model_validate(
        {
            "groups": [{"name": "g0", "lr": BASE[0]}, {"name": "g1", "lr": BASE[1]}],
            "schedule": {
                "type": "ReduceLROnPlateau",
                "metric": "loss",
                "factor": FACTOR,
                "patience": 0,
                "eps": 0.0,
            },
        }
    )


def torch_lrs(losses: list[float]) -> list[list[float]]:
    """torch's lr per group at steps ``0 .. len(losses)`` after ``losses[s]`` at step ``s``."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, BASE, strict=True)])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=FACTOR, patience=0, eps=0.0)
    out = [[g["lr"] for g in opt.param_groups]]
    for loss in losses:
        sched.step(loss)
        out.append([g["lr"] for g in opt.param_groups])
    return out


def worse(n: int, start: int = 0) -> list[float]:
    """Losses that get worse at every step: a reduction at every one after the first."""
    return [1.0 + start + i for i in range(n)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    LOGS.clear()
    if request.param == "sqlite":
        opened = open_store(f"sqlite:///{tmp_path / 'rows.db'}")
        opened.migrate()
        yield opened
        opened.close()
        return
    with postgres_database() as url:
        opened = open_store(url)
        opened.migrate()
        yield opened
        opened.close()


def report_all(runs: Runs, run_id: str, losses: list[float], first: int = 0) -> None:
    async def go() -> None:
        for i, loss in enumerate(losses):
            await runs.report(run_id, first + i, 0, {"loss": loss})

    asyncio.run(go())


def served(runs: Runs, run_id: str, count: int) -> list[list[float]]:
    """The run's values for steps ``0 .. count - 1`` as a trainer's window gets them."""

    async def go() -> Any:
        known = await runs.version(run_id)
        return await runs.window(run_id, 0, count, known)

    values = asyncio.run(go()).values
    return [[values[g]["lr"][s] for g in ("g0", "g1")] for s in range(count)]


def assert_torch(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert abs(x - y) <= 1e-12 * abs(y), (step, a, b)


@contextmanager
def row_reads(store: Store) -> Iterator[list[tuple[tuple[Any, ...], bool]]]:
    """Every ``store.reductions`` call in the block: its arguments, and whether it ran on the
    main thread (where ``asyncio.run`` runs the event loop). The real store answers it."""
    calls: list[tuple[tuple[Any, ...], bool]] = []
    read_rows = store.reductions

    def recorded(*args: Any) -> list[str]:
        calls.append((args, threading.current_thread() is threading.main_thread()))
        return read_rows(*args)

    store.reductions = recorded  # type: ignore[method-assign, assignment]
    try:
        yield calls
    finally:
        store.reductions = read_rows  # type: ignore[method-assign]


def stored_rows(store: Store, run_id: str, branch: int = 0) -> list[str]:
    return store.reductions(run_id, PATH, branch, 0, 1 << 40)


def test_the_state_stays_small_however_many_reductions(store: Store) -> None:
    runs = Runs(store)
    asyncio.run(runs.create("r", spec()))
    losses = worse(300)
    report_all(runs, "r", losses[:2])
    first = store.get_run("r")
    assert first is not None
    report_all(runs, "r", losses[2:], first=2)
    last = store.get_run("r")
    assert last is not None
    # One reduction or 299: the stored text differs only by the digits of two counters.
    assert len(last.state) - len(first.state) <= 6, (first.state, last.state)
    assert len(last.state) < 300, last.state
    assert len(stored_rows(store, "r")) == 299
    whole = asyncio.run(runs.get("r")).state[PATH]["reductions"]
    assert len(whole) == 299 and whole[-1]["step"] == 300
    assert_torch(served(runs, "r", 301), torch_lrs(losses))


def test_a_short_cached_copy_reads_only_the_rows_after_it(store: Store) -> None:
    writer = Runs(store)
    asyncio.run(writer.create("r", spec()))
    losses = worse(80)
    report_all(writer, "r", losses[:51])
    record = store.get_run("r")
    assert record is not None
    key = ("r", record.created_at, 0, PATH)
    kept = LOGS.get(key)
    assert kept is not None and len(kept) == 50
    report_all(writer, "r", losses[51:], first=51)
    # Another process's copy, as it was before the writer's last 29 reductions.
    LOGS.clear()
    LOGS.put(key, kept, 1)
    with row_reads(store) as reads:
        record = store.get_run("r")
        assert record is not None
        record = read_state(store, record)
    assert [args for args, _ in reads] == [("r", PATH, 0, 50, 79)]
    assert record.loaded is not None and len(record.loaded[PATH]["reductions"]) == 79
    assert_torch(served(Runs(store), "r", 81), torch_lrs(losses))


def test_a_rewind_rewrites_the_rows_on_its_branch(store: Store) -> None:
    runs = Runs(store)
    asyncio.run(runs.create("r", spec()))
    before = worse(60)
    report_all(runs, "r", before)
    run, rewound = asyncio.run(runs.rewind("r", RewindChange(to_step=29)))
    assert rewound and run.branch == 1
    assert len(run.state[PATH]["reductions"]) == 29
    assert stored_rows(store, "r", branch=0) == []
    assert len(stored_rows(store, "r", branch=1)) == 29
    # The resumed job improves for a while, then gets worse again.
    after = [0.5 / (1 + i) for i in range(10)] + worse(10, start=100)
    report_all(runs, "r", after, first=30)
    losses = before[:30] + after
    assert len(stored_rows(store, "r", branch=1)) == 29 + 10
    assert_torch(served(runs, "r", len(losses) + 1), torch_lrs(losses))
    LOGS.clear()  # a process that starts now reads the rows
    assert_torch(served(Runs(store), "r", len(losses) + 1), torch_lrs(losses))


def test_a_rolled_back_group_leaves_nothing_cached(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'group.db'}")
    store.migrate()
    LOGS.clear()
    try:
        runs = Runs(store)
        asyncio.run(runs.create("r", spec()))
        losses = worse(10)
        report_all(runs, "r", losses)
        record = store.get_run("r")
        assert record is not None
        key = ("r", record.created_at, 0, PATH)
        kept = LOGS.get(key)
        assert kept is not None and len(kept) == 9
        # A reducing report inside a group whose transaction then rolls back.
        with pytest.raises(RuntimeError), store.group(2):  # type: ignore[attr-defined]
            report(store, "r", 10, 0, {"loss": 100.0})
            raise RuntimeError("the group fails before its COMMIT")
        assert LOGS.get(key) is kept
        # Then the step is reported again, improving: no reduction there, one after it.
        report_all(runs, "r", [0.1, 50.0], first=10)
        losses += [0.1, 50.0]
        assert len(stored_rows(store, "r")) == 10
        assert_torch(served(runs, "r", len(losses) + 1), torch_lrs(losses))
    finally:
        store.close()


def test_a_run_created_again_is_never_read_with_the_other_runs_rows(store: Store) -> None:
    runs = Runs(store)
    asyncio.run(runs.create("r", spec()))
    report_all(runs, "r", worse(5))
    old = store.get_run("r")
    assert old is not None
    asyncio.run(runs.delete("r"))
    asyncio.run(runs.create("r", spec()))
    again = worse(9, start=50)
    report_all(runs, "r", again)
    LOGS.clear()
    # ``old`` was read before the delete: its head counts 4 reductions, and rows 0..3 exist
    # again (the new run's). They are not taken for the old run's: the run is read again.
    got = read_state(store, old)
    assert got.created_at != old.created_at
    assert got.loaded is not None and len(got.loaded[PATH]["reductions"]) == 8
    assert_torch(served(runs, "r", 10), torch_lrs(again))


def test_two_plateau_nodes_keep_their_own_rows(store: Store) -> None:
    from service.runs.model import compile_spec

    two = RunSpec.model_validate(
        {
            "groups": [{"name": "g0", "lr": BASE[0]}, {"name": "g1", "lr": BASE[1]}],
            "schedule": {
                "type": "ReduceLROnPlateau",
                "metric": "loss",
                "factor": 0.5,
                "patience": 1,
                "eps": 0.0,
            },
            "group_schedules": {
                "g1": {
                    "type": "ReduceLROnPlateau",
                    "metric": "acc",
                    "mode": "max",
                    "factor": 0.8,
                    "patience": 0,
                    "eps": 0.0,
                },
            },
        }
    )
    paths = [n.path for n in compile_spec(two.normalised()).program.metric_nodes]
    assert len(paths) == 2
    runs = Runs(store)
    asyncio.run(runs.create("two", two))
    losses = [1.0 + (i % 7) for i in range(60)]
    accs = [0.5 + 0.1 * ((i * 3) % 5) for i in range(60)]

    async def go() -> None:
        for step, (loss, acc) in enumerate(zip(losses, accs, strict=True)):
            await runs.report("two", step, 0, {"loss": loss, "acc": acc})

    asyncio.run(go())
    # torch: one optimizer and scheduler per group (a scheduler acts on all of its groups).
    want: list[list[float]] = [[], []]
    for g, (lr, metric, kwargs) in enumerate(
        [
            (BASE[0], losses, {"factor": 0.5, "patience": 1}),
            (BASE[1], accs, {"mode": "max", "factor": 0.8, "patience": 0}),
        ]
    ):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, eps=0.0, **kwargs)
        want[g].append(opt.param_groups[0]["lr"])
        for value in metric:
            sched.step(value)
            want[g].append(opt.param_groups[0]["lr"])
    expected = [[want[0][s], want[1][s]] for s in range(61)]
    rows = [store.reductions("two", p, 0, 0, 1 << 40) for p in paths]
    assert all(rows) and len(rows[0]) != len(rows[1])
    LOGS.clear()
    assert_torch(served(Runs(store), "two", 61), expected)


def test_a_long_cold_read_leaves_the_event_loop(tmp_path: Path) -> None:
    """SQLite reads run on the event loop; parsing every row of a run with many reductions
    there would stall every other request, so such a read goes to a worker thread."""
    store = open_store(f"sqlite:///{tmp_path / 'cold.db'}")
    store.migrate()
    LOGS.clear()
    try:
        runs = Runs(store)
        runs.inline_rows = 20
        asyncio.run(runs.create("r", spec()))
        losses = worse(40)
        report_all(runs, "r", losses)
        with row_reads(store) as reads:
            LOGS.clear()  # a process that has not read the run yet: 39 rows to parse
            run = asyncio.run(runs.get("r"))
            assert [on_loop for _, on_loop in reads] == [False]
            assert len(run.state[PATH]["reductions"]) == 39
            report_all(runs, "r", worse(10, start=100), first=40)
            reads.clear()
            LOGS.clear()
            run = asyncio.run(runs.get("r"))
            assert [on_loop for _, on_loop in reads] == [False]
            # A copy 10 rows behind (within the limit) is brought up to date on the loop.
            record = store.get_run("r")
            assert record is not None
            key = ("r", record.created_at, 0, PATH)
            LOGS.put(key, list(run.state[PATH]["reductions"][:39]), 1)
            reads.clear()
            assert len(asyncio.run(runs.get("r")).state[PATH]["reductions"]) == 49
            assert [on_loop for _, on_loop in reads] == [True]
            # A new process's first report to the run: the rows are parsed in a thread
            # before the write, which runs on the loop and then reads none.
            restarted = Runs(store)
            restarted.inline_rows = 20
            LOGS.clear()
            reads.clear()
            report_all(restarted, "r", [0.01], first=50)
            assert [on_loop for _, on_loop in reads] == [False]
        assert_torch(served(runs, "r", 52), torch_lrs(losses + worse(10, start=100) + [0.01]))
    finally:
        store.close()
