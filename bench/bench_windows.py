"""Window refresh at many groups, and the SDK's slowest step() while refreshes happen.

    .venv/bin/python bench/bench_windows.py [--reps 21] [--steps 20000] [--far 1000000]

Starts ``python -m service`` on a temporary SQLite file and creates layer-wise runs (one
schedule shape, a base rate per group) at 1 and 256 groups. Then, in the same run:

1. A window refresh as the SDK does it (``GET lr?start=&count=4096`` in the binary encoding,
   decoded to one float64 array, bound to a 256- or 1-group optimizer), cold (a new
   ``start`` every time, so the server computes and encodes it) and warm (the same window
   again, without an ETag), median ms at 256 groups over 1 group; the JSON path for
   reference.
2. ``step()`` of a RemoteScheduler with default settings at 256 groups over ``--steps``
   steps, refreshes included: the slowest single step, the 99.9th percentile and the median.
3. A ChainedScheduler that scans (CosineAnnealingLR with ``eta_min``) at 256 groups, created
   without a stated length, walked window by window (binary refreshes, each window new) from
   step 0 to ``--far``: the median refresh of the last windows over that of the first (its
   scans resume from the checkpoints the windows before left), and the walk's total time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "clients"), str(ROOT), str(ROOT / "bench")]

import lrserve  # noqa: E402
from bench_sdk import start_server  # noqa: E402
from lrserve import _calls  # noqa: E402
from lrserve._window import Window, bind  # noqa: E402
from lrserve.torch import RemoteScheduler  # noqa: E402

COUNT = 4096
SCHEDULE = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
        {"type": "CosineAnnealingLR", "T_max": 99500, "eta_min": 0.0},
    ],
    "milestones": [500],
}


CHAIN = {
    "type": "ChainedScheduler",
    "schedulers": [
        {"type": "ExponentialLR", "gamma": 0.999999},
        {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-6},
    ],
}


def spec(n: int, schedule: dict[str, Any] = SCHEDULE) -> dict[str, Any]:
    groups = [{"name": f"layer{i}", "lr": 1e-3 * 0.98**i} for i in range(n)]
    return {"groups": groups, "schedule": schedule}


def optimizer(n: int) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3} for _ in range(n)]
    return torch.optim.AdamW(groups, foreach=False)


def refresh_ms(
    client: lrserve.Client, run: str, opt: torch.optim.Optimizer, start: int, binary: bool
) -> float:
    """One refresh as RemoteScheduler._fetch + _install do it, in ms."""
    names = [f"layer{i}" for i in range(len(opt.param_groups))]
    t0 = time.perf_counter()
    meta, w = client._send(_calls.get_lr_window_arrays(run, start, COUNT, binary=binary))
    assert w is not None
    window = Window(w.start, w.count, w.version, meta.etag, array=w.array, series=tuple(w.series))
    bind(window, names, opt.param_groups)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--far", type=int, default=1_000_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(tmp)
        try:
            with lrserve.Client(url, timeout=120) as client:
                opts = {n: optimizer(n) for n in (1, 256)}
                for n in opts:
                    client.create_run(f"w{n}", spec(n))
                res: dict[tuple[int, str, str], list[float]] = {}
                for rep in range(args.reps + 1):
                    for n, opt in opts.items():
                        for binary, enc in ((True, "binary"), (False, "json")):
                            if not binary and rep > 2:
                                continue  # JSON at 256 groups is slow: a few reps suffice
                            start = 1 + rep * COUNT + (0 if binary else 500_000)
                            cold = refresh_ms(client, f"w{n}", opt, start, binary)
                            warm = refresh_ms(client, f"w{n}", opt, start, binary)
                            if rep:  # rep 0 warms up the connection and imports
                                res.setdefault((n, enc, "cold"), []).append(cold)
                                res.setdefault((n, enc, "warm"), []).append(warm)
            print(f"window refresh ({COUNT} steps: fetch, decode, bind), median ms:")
            print(f"{'encoding':<8} {'cache':<5} {'1 group':>9} {'256 groups':>11} {'ratio':>7}")
            for enc in ("binary", "json"):
                for cache in ("cold", "warm"):
                    one = statistics.median(res[(1, enc, cache)])
                    many = statistics.median(res[(256, enc, cache)])
                    print(f"{enc:<8} {cache:<5} {one:>9.2f} {many:>11.2f} {many / one:>6.2f}x")

            opt = optimizer(256)
            sched = RemoteScheduler(opt, "steps256", url=url, spec=spec(256))
            times = []
            clock = time.perf_counter
            try:
                for _ in range(args.steps):
                    t0 = clock()
                    sched.step()
                    times.append(clock() - t0)
                assert not sched.holding
            finally:
                sched.close()
            times.sort()
            med = times[len(times) // 2] * 1e3
            p999 = times[int(len(times) * 0.999)] * 1e3
            print(
                f"\nstep() at 256 groups, default settings, {args.steps} steps with refreshes: "
                f"slowest {times[-1] * 1e3:.2f} ms, p99.9 {p999:.3f} ms, median {med:.4f} ms, "
                f"steps over 2 ms: {sum(t > 2e-3 for t in times)}"
            )
            walk_chain(url, args.far, args.reps)
        finally:
            proc.terminate()
            proc.wait(10)


def walk_chain(url: str, far: int, reps: int) -> None:
    """Section 3: a scanning chain at 256 groups walked to ``far``, window by window."""
    opt = optimizer(256)
    with lrserve.Client(url, timeout=120) as client:
        client.create_run("chain256", spec(256, CHAIN))  # accepted: no metadata.total_steps
        times = []
        t0 = time.perf_counter()
        for start in range(0, far + COUNT * reps, COUNT):
            times.append(refresh_ms(client, "chain256", opt, start, True))
            if len(times) % 50 == 0:
                print(f"  walked to step {start + COUNT:,}", file=sys.stderr)
        walk = time.perf_counter() - t0
    first = statistics.median(times[1 : reps + 1])  # (the run's first read compiles it)
    last = statistics.median(times[-reps:])
    print(
        f"\nscanning ChainedScheduler at 256 groups, walked in {len(times)} windows of {COUNT} "
        f"steps to step {far + COUNT * reps:,} in {walk:.1f} s: median refresh at step 0 "
        f"{first:.2f} ms, past step {far:,} {last:.2f} ms, ratio {last / first:.2f}x"
    )


if __name__ == "__main__":
    main()
