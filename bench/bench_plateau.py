"""A plateau run's report cost at many reductions vs at none (in process, SQLite).

Two runs of one ``ReduceLROnPlateau`` spec (``--groups`` groups) in a fresh SQLite file: one
whose stored state already holds ``--reductions`` reductions (stored as the service stores
them, as 10^5 reducing reports would have left them: one every other step), one with none. Each gets
``--reports`` reports through :class:`service.runs.service.Runs` (the use case the HTTP layer
calls: the transaction, the plateau transition, the stored state and the answer's values at
``step + 1``), one run after the other, with improving values (no reduction) and,
with ``--reducing``, values that reduce at every report. Then ``GET lr`` of a window of 256
steps just after the last report (a fresh version: evaluated, not cached), and one report
with the process's caches emptied (the first report after a restart reads every reduction
row). Prints ms per call and the ratio against the run without reductions, measured in the
same run.

    .venv/bin/python bench/bench_plateau.py                      # 10^4 reductions
    .venv/bin/python bench/bench_plateau.py --reductions 100000 --reducing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.runs.model import RunSpec  # noqa: E402
from service.runs.service import Runs, create_run  # noqa: E402
from service.runs.states import LOGS, STATES, save_in  # noqa: E402
from service.store import open_store  # noqa: E402


def _spec(groups: int, patience: int) -> RunSpec:
    return RunSpec.model_validate(
        {
            "groups": [{"name": f"g{k}", "lr": 0.1 / (k + 1)} for k in range(groups)],
            "schedule": {
                "type": "ReduceLROnPlateau",
                "metric": "loss",
                "factor": 0.999,
                "patience": patience,
                "min_lr": 0.0,
                "eps": 0.0,
            },
        }
    )


def _state(path: str, groups: int, reductions: int) -> dict[str, Any]:
    base = [0.1 / (k + 1) for k in range(groups)]
    rows = []
    for i in range(reductions):
        lr = [b * 0.999 ** (i + 1) for b in base]
        rows.append({"step": 2 * i + 1, "factor": [0.999] * groups, "lr": lr})
    node = {
        "best": 1.0,
        "num_bad_epochs": 0,
        "cooldown_counter": 0,
        "last_epoch": reductions,
        "reductions": rows,
    }
    return {path: node}


async def _bench(args: argparse.Namespace, url: str) -> None:
    store = open_store(url)
    store.migrate()
    runs = Runs(store)
    patience = 0 if args.reducing else 1_000_000
    spec = _spec(args.groups, patience)
    path = next(iter(runs_path(spec)))
    first = 2 * args.reductions + 2
    for run_id, n in (("none", 0), ("many", args.reductions)):
        create_run(store, run_id, spec)
        with store.transaction(run_id) as tx:
            assert tx is not None
            save_in(tx, _state(path, args.groups, n))
            tx.run.step = tx.run.completed_step = first - 1
            tx.save()
    times: dict[str, list[float]] = {"none": [], "many": []}
    # One run after the other: alternating, the cheap run's commits would pay for the WAL
    # checkpoints of the other's large state writes.
    for run_id in ("none", "many"):
        for i in range(args.reports):
            step = first + i
            value = 1.0 + i if args.reducing else 0.5 / (1 + i)  # worse: reduce; better: not
            t = time.perf_counter()
            outcome = await runs.report(run_id, step, 0, {"loss": value})
            times[run_id].append(time.perf_counter() - t)
            assert outcome is not None
    windows: dict[str, list[float]] = {"none": [], "many": []}
    for run_id in ("none", "many"):
        for _ in range(args.windows):
            known = await runs.version(run_id)
            runs.cache.clear()  # a fresh evaluation each time (as after every report)
            t = time.perf_counter()
            await runs.window(run_id, first + args.reports, 256, known)
            windows[run_id].append(time.perf_counter() - t)
    cold: dict[str, float] = {}
    for run_id in ("none", "many"):
        LOGS.clear()
        STATES.clear()
        step = first + args.reports
        t = time.perf_counter()
        await runs.report(run_id, step, 0, {"loss": 0.01})
        cold[run_id] = time.perf_counter() - t
    store.close()
    kind = "reducing" if args.reducing else "non-reducing"
    ref = statistics.median(times["none"])
    many = statistics.median(times["many"])
    wref = statistics.median(windows["none"])
    wmany = statistics.median(windows["many"])
    print(f"{args.groups} groups, {args.reports} {kind} reports per run (median)")
    print(f"{'call':44} {'ms':>9} {'x none':>8}")
    print(f"{'POST metrics, 0 reductions (reference)':44} {ref * 1000:9.3f} {1.0:8.2f}")
    label = f"POST metrics, {args.reductions} reductions"
    print(f"{label:44} {many * 1000:9.3f} {many / ref:8.2f}")
    print(f"{'GET lr window 256, 0 reductions':44} {wref * 1000:9.3f} {1.0:8.2f}")
    label = f"GET lr window 256, {args.reductions} reductions"
    print(f"{label:44} {wmany * 1000:9.3f} {wmany / wref:8.2f}")
    label = f"POST, caches emptied, {args.reductions} reductions"
    print(f"{'POST, caches emptied, 0 reductions':44} {cold['none'] * 1000:9.3f} {1.0:8.2f}")
    print(f"{label:44} {cold['many'] * 1000:9.3f} {cold['many'] / cold['none']:8.2f}")
    print(f"ratio POST {args.reductions}/0 reductions: {many / ref:.2f}")
    _engine(args, spec, path, first)


def _engine(args: argparse.Namespace, spec: RunSpec, path: str, first: int) -> None:
    """The schedule engine's share of a report, on a parsed state (what plateau.py owns):
    the transition, the answer's step and a 256-step window of the new state."""
    from service.runs.model import compile_run, evaluate

    program = compile_run(spec.normalised())
    times: dict[int, list[float]] = {0: [], args.reductions: []}
    for n in times:
        state = _state(path, args.groups, n)
        for i in range(args.reports):
            step = first + i
            value = 1.0 + i if args.reducing else 0.5 / (1 + i)
            t = time.perf_counter()
            state, _ = program.observe(state, step, {"loss": value})
            evaluate(program, state, [], step + 1, 1)
            evaluate(program, state, [], step + 1, 256)
            times[n].append(time.perf_counter() - t)
    ref = statistics.median(times[0])
    many = statistics.median(times[args.reductions])
    label = f"engine: observe + answer + window, {args.reductions}"
    print(f"{'engine: observe + answer + window, 0 (ref)':44} {ref * 1000:9.3f} {1.0:8.2f}")
    print(f"{label:44} {many * 1000:9.3f} {many / ref:8.2f}")
    print(f"ratio engine {args.reductions}/0 reductions: {many / ref:.2f}")


def runs_path(spec: RunSpec) -> list[str]:
    """The state key(s) of the spec's plateau node."""
    from service.runs.model import compile_spec

    return [n.path for n in compile_spec(spec.normalised()).program.metric_nodes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reductions", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--reports", type=int, default=20)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--reducing", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(_bench, args, f"sqlite:///{os.path.join(tmp, 'plateau.db')}")


if __name__ == "__main__":
    main()
