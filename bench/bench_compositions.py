"""Scanned compositions far into a run (issue 12): a ChainedScheduler that needs a scan
(CosineAnnealingLR with eta_min), with and without a ReduceLROnPlateau child holding
reductions, and a SequentialLR of MultiplicativeLR children.

    .venv/bin/python bench/bench_compositions.py [--far 1000000] [--count 10000] [--groups 2]
                                                 [--repeat 7] [--no-torch]

For each schedule, in one run: the reference is a window of ``count`` steps at step 0 (median
of ``repeat``); against it, the same window at step ``far``

- cold: the first window asked of a freshly compiled program when no checkpoint of it exists
  anywhere (the scan runs from 0 once, leaving a checkpoint every 2,048 steps): what the
  first process to serve a run far into it pays, once;
- restart: the same in a new process (a freshly compiled program) once those checkpoints are
  in the database: the service's store backing (``StoredScans``) on a SQLite file, as the
  service has it by default, the checkpoints written by the cold window's scan;
- warm: a trainer walking forward window after window (median of ``repeat`` windows, each
  new, after ``far``), timed alternately with the reference;
- again: the window at ``far`` asked a second time (another rank, a retry).

With a plateau child, also POST's evaluation: ``Program.observe`` of a report at ``far``
(it evaluates the chain's value just before the plateau) cold and warm. Unless
``--no-torch``, torch's own schedulers stepped to ``far + count`` (the plateau interleaved
at its place in the chain) are the oracle, and the largest relative difference is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from service.runs.checkpoints import StoredScans
from service.schedules import Program, ScheduleSpec, set_scan_backing
from service.store import open_store

S = torch.optim.lr_scheduler
EXP = {"type": "ExponentialLR", "gamma": 0.999999}
COS = {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-5}
ROP = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.3}
MULT = [
    {"type": "MultiplicativeLR", "lr_lambda": "0.99999 if epoch % 3 != 0 else 1.00001"},
    {"type": "MultiplicativeLR", "lr_lambda": "0.9999993"},
    {"type": "MultiplicativeLR", "lr_lambda": "1 - 1e-7 * (epoch % 5)"},
]


def lrs_for(groups: int) -> list[float]:
    return [0.1 * (i + 1) for i in range(groups)]


def make(schedule: dict[str, Any], groups: int) -> Program:
    spec = {"groups": [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(lrs_for(groups))]}
    return Program(ScheduleSpec.model_validate({**spec, "schedule": schedule}))


def window(p: Program, state: Any, start: int, count: int) -> np.ndarray:
    values = p.evaluate(state, start, count)
    return np.stack([values[name]["lr"] for name in p.group_names])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def torch_chain(
    nodes: list[dict[str, Any]], lrs: list[float], n: int, reports: dict[int, float]
) -> np.ndarray:
    warnings.simplefilter("ignore")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [q], "lr": lr} for q, lr in zip(params, lrs, strict=True)])
    kids: list[Any] = []
    for node in nodes:
        kw = {k: v for k, v in node.items() if k not in ("type", "metric")}
        if node["type"] == "MultiplicativeLR":
            kw["lr_lambda"] = eval(f"lambda epoch: {kw['lr_lambda']}", {"__builtins__": {}})
        kids.append(getattr(S, node["type"])(opt, **kw))
    out = np.empty((len(lrs), n))
    out[:, 0] = [g["lr"] for g in opt.param_groups]
    for s in range(n - 1):
        for kid in kids:
            if isinstance(kid, S.ReduceLROnPlateau):
                if s in reports:
                    kid.step(reports[s])
            else:
                kid.step()
        out[:, s + 1] = [g["lr"] for g in opt.param_groups]
    return out


def torch_sequential(lrs: list[float], n: int, milestones: list[int]) -> np.ndarray:
    warnings.simplefilter("ignore")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [q], "lr": lr} for q, lr in zip(params, lrs, strict=True)])
    kids: list[Any] = [
        S.MultiplicativeLR(opt, eval(f"lambda epoch: {c['lr_lambda']}", {"__builtins__": {}}))
        for c in MULT
    ]
    seq = S.SequentialLR(opt, kids, milestones=milestones)
    out = np.empty((len(lrs), n))
    for k in range(n):
        if k:
            seq.step()
        out[:, k] = [g["lr"] for g in opt.param_groups]
    return out


def rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


def bench(name: str, schedule: dict[str, Any], reports: dict[int, float], args: Any) -> None:
    far, count, repeat = args.far, args.count, args.repeat
    p0 = make(schedule, args.groups)
    state0 = p0.initial_state()
    for s in sorted(reports):
        state0, _ = p0.observe(state0, s, {"loss": reports[s]})

    def fresh() -> tuple[Program, Any]:
        # A freshly compiled program (no checkpoint of it anywhere), fed the same reports
        # through its own observe, exactly as the service rebuilds one.
        p = make(schedule, args.groups)
        state = p.initial_state()
        for s in sorted(reports):
            state, _ = p.observe(state, s, {"loss": reports[s]})
        return p, state

    # Reference and walking windows are timed alternately, so load from other processes on
    # the machine falls on both alike.
    walker, state = fresh()
    window(walker, state, far - count, count)  # the trainer got here already
    ref: list[float] = []
    warm: list[float] = []
    again: list[float] = []
    for i in range(repeat):
        p, st = fresh()
        ref.append(timed(partial(window, p, st, 0, count))[0])
        warm.append(timed(partial(window, walker, state, far + (i + 1) * count, count))[0])
        again.append(timed(partial(window, walker, state, far, count))[0])
    colds = []
    backing = args.backing
    set_scan_backing(None)  # nothing stored anywhere: the scan from step 0
    for _ in range(max(1, repeat // 3)):
        p, st = fresh()
        dt, cold = timed(partial(window, p, st, far, count))
        colds.append(dt)
    set_scan_backing(backing)
    p, st = fresh()
    window(p, st, far, count)  # the first process: its scan's checkpoints go to the database
    assert backing.flush(60), "checkpoints not written"
    restarts = []
    for _ in range(repeat):
        p, st = fresh()
        dt, resumed = timed(partial(window, p, st, far, count))
        restarts.append(dt)
        assert np.array_equal(resumed, cold), "resumed and cold differ"
    assert np.array_equal(window(walker, state, far, count), cold), "warm and cold differ"
    t_ref = statistics.median(ref)
    print(f"\n{name} ({args.groups} groups, {len(reports)} reports, window {count} steps)")
    print("  median (best) of the runs, and the ratio to the reference's median (best)")
    for label, times in (
        ("reference: window at step 0", ref),
        (f"cold: first window at {far}", colds),
        (f"restart: first window at {far}", restarts),
        (f"warm: walking forward past {far}", warm),
        (f"again: window at {far} re-asked", again),
    ):
        med, best = statistics.median(times), min(times)
        print(f"  {label:36s} {med * 1e3:8.2f} ms ({best * 1e3:7.2f})   "
              f"{med / t_ref:6.2f}x ({best / min(ref):5.2f}x)")  # fmt: skip
    if reports:
        p, state = fresh()
        t_post_cold = timed(lambda: p.observe(state, far, {"loss": 1.0}))[0]
        t_post_warm = statistics.median(
            timed(lambda: walker.observe(state, far + 5 * count, {"loss": 1.0}))[0]
            for _ in range(repeat)
        )
        print(f"  POST (observe) at {far}: cold {t_post_cold * 1e3:.2f} ms, warm "
              f"{t_post_warm * 1e3:.2f} ms ({t_post_warm / t_ref:.2f}x reference)")  # fmt: skip
    if not args.no_torch:
        t0 = time.perf_counter()
        n = far + count
        if schedule["type"] == "SequentialLR":
            theirs = torch_sequential(lrs_for(args.groups), n, schedule["milestones"])
        else:
            theirs = torch_chain(schedule["schedulers"], lrs_for(args.groups), n, reports)
        t_torch = time.perf_counter() - t0
        print(f"  torch oracle to step {n}: {t_torch:.1f} s; max relative difference: window at "
              f"{far} {rel(cold, theirs[:, far:]):.2e}, at 0 "
              f"{rel(window(walker, state, 0, count), theirs[:, :count]):.2e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--far", type=int, default=1_000_000)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    far = args.far
    tmp = tempfile.TemporaryDirectory()
    store = open_store(f"sqlite:///{tmp.name}/bench.db")
    store.migrate()
    args.backing = StoredScans(store)
    set_scan_backing(args.backing)  # as the service does: every window below may use it
    chain = {"type": "ChainedScheduler", "schedulers": [EXP, COS]}
    bench("ChainedScheduler [ExponentialLR, CosineAnnealingLR eta_min]", chain, {}, args)
    # Reductions spread over the run (every report after the first is bad: patience 0).
    reports = {100: 1.0, far // 5: 1.0, far // 2: 1.0, (9 * far) // 10: 1.0}
    plateau = {"type": "ChainedScheduler", "schedulers": [EXP, ROP, COS]}
    bench("ChainedScheduler [ExponentialLR, ReduceLROnPlateau, CosineAnnealingLR]", plateau,
          reports, args)  # fmt: skip
    seq = {"type": "SequentialLR", "schedulers": MULT, "milestones": [far // 4, far // 2]}
    bench("SequentialLR of 3 MultiplicativeLR (milestones far/4, far/2)", seq, {}, args)
    args.backing.close()
    store.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
