"""Per-step cost of lrserve.torch.RemoteScheduler.step() against torch's own scheduler.

    .venv/bin/python bench/bench_sdk.py [--steps 8000] [--reps 5] [--loop 20000]

Starts ``python -m service`` on a temporary SQLite file, then times, in the same run:

1. The training loop as it runs (the figure that matters): ``--loop`` consecutive
   ``step()`` calls of a ``RemoteScheduler`` with the SDK's DEFAULT settings (4,096-step
   window, refreshes, revalidation and the prefetched next window all included), a fresh
   scheduler and run per repetition (server caches cold), against the same number of
   ``step()`` calls of torch's ``SequentialLR(LinearLR, CosineAnnealingLR)``, each on its own
   identical 8-group AdamW, float and tensor learning rates, interleaved. Also the slowest
   single step and how many steps had to wait for a fetch (over 1 ms).
2. Steady state: a window large enough that every timed step is the no-network path.
3. The ways of writing 8 tensor learning rates in place (fill_, _foreach_copy_, one shared
   tensor).

Prints medians (µs per call) and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from torch.optim import lr_scheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "clients"), str(ROOT)]

from lrserve.torch import RemoteScheduler  # noqa: E402

GROUPS = 8
SPEC = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
        {"type": "CosineAnnealingLR", "T_max": 99500, "eta_min": 1e-6},
    ],
    "milestones": [500],
}


def optimizer(tensor_lr: bool) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    groups: list[dict[str, Any]] = []
    for i in range(GROUPS):
        lr = 1e-3 * (i + 1)
        groups.append(
            {
                "params": torch.nn.Linear(8, 8).parameters(),
                "lr": torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr,
            }
        )
    return torch.optim.AdamW(groups, foreach=False)


def torch_sched(opt: torch.optim.Optimizer) -> Any:
    warm = lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=500)
    cos = lr_scheduler.CosineAnnealingLR(opt, T_max=99500, eta_min=1e-6)
    return lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[500])


def per_call_us(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def start_server(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--database",
            f"sqlite:///{tmp}/bench.db",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start")


def tensor_write_methods(n: int, reps: int) -> dict[str, float]:
    """µs per call of three ways to write 8 new values into tensor learning rates."""
    k = 1024
    targets = [torch.tensor(0.1, dtype=torch.float64) for _ in range(GROUPS)]
    window = torch.rand(k, GROUPS, dtype=torch.float64)
    cols = [window[:, g].tolist() for g in range(GROUPS)]
    srcs = [list(r.unbind(0)) for r in window]
    shared = torch.zeros(GROUPS, dtype=torch.float64)
    i = [0]

    def fill() -> None:
        j = i[0] = (i[0] + 1) % k
        for t, c in zip(targets, cols, strict=True):
            t.fill_(c[j])

    def foreach_prebuilt() -> None:
        j = i[0] = (i[0] + 1) % k
        torch._foreach_copy_(targets, srcs[j])

    def foreach_unbind() -> None:
        j = i[0] = (i[0] + 1) % k
        torch._foreach_copy_(targets, window[j].unbind(0))

    def shared_copy() -> None:
        j = i[0] = (i[0] + 1) % k
        shared.copy_(window[j])

    methods = {
        "fill_ per group (used on CPU)": fill,
        "_foreach_copy_, prebuilt row views": foreach_prebuilt,
        "_foreach_copy_, row.unbind() per step (used on accelerators)": foreach_unbind,
        "one shared storage, copy_ (needs views as lrs)": shared_copy,
    }
    out = {}
    for name, fn in methods.items():
        per_call_us(fn, n // 4)
        out[name] = statistics.median(per_call_us(fn, n) for _ in range(reps))
    return out


def default_loop(url: str, kind: str, n: int, rep: int) -> tuple[float, float, int]:
    """(µs per step over ``n`` steps, slowest step in ms, steps over 1 ms) of a
    RemoteScheduler with default settings on a fresh run."""
    r_opt = optimizer(kind == "tensor")
    remote = RemoteScheduler(r_opt, f"loop-{kind}-{rep}", url=url, spec={"schedule": SPEC})
    clock = time.perf_counter
    worst = 0.0
    slow = 0
    step = remote.step
    try:
        t_start = clock()
        for _ in range(n):
            t0 = clock()
            step()
            dt = clock() - t0
            if dt > 1e-3:
                slow += 1
                worst = max(worst, dt)
        total = clock() - t_start
        assert not remote.holding
    finally:
        remote.close()
    return total / n * 1e6, worst * 1e3, slow


def torch_loop(kind: str, n: int) -> float:
    """µs per step over ``n`` steps of torch's own scheduler (timed the same way)."""
    sched = torch_sched(optimizer(kind == "tensor"))
    clock = time.perf_counter
    step = sched.step
    t_start = clock()
    for _ in range(n):
        t0 = clock()
        step()
        clock() - t0
    return (clock() - t_start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8000, help="timed calls per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--loop", type=int, default=20_000, help="steps of the default-settings loop")
    ap.add_argument("--loop-reps", type=int, default=3)
    args = ap.parse_args()
    if args.steps * (args.reps + 1) >= 50_000:
        raise SystemExit("steps * (reps + 1) must stay below 50000 (half the window)")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch: "lr_scheduler.step() before optimizer.step()"
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {GROUPS} param groups")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(tmp)
        try:
            loops: dict[str, dict[str, list[Any]]] = {
                k: {"torch": [], "lrserve": []} for k in ("float", "tensor")
            }
            torch_loop("float", 2000)  # warm-up
            for rep in range(args.loop_reps):
                for kind in ("float", "tensor"):
                    loops[kind]["torch"].append(torch_loop(kind, args.loop))
                    loops[kind]["lrserve"].append(default_loop(url, kind, args.loop, rep))
            print(
                f"\nthe training loop, default settings (window 4096, refreshes included), "
                f"{args.loop} steps, median of {args.loop_reps} fresh runs:"
            )
            print(
                f"{'lr kind':<8} {'torch µs/step':>14} {'lrserve µs/step':>16} {'ratio':>7} "
                f"{'slowest ms':>11} {'steps > 1 ms':>13}"
            )
            for kind, res in loops.items():
                t_us = statistics.median(res["torch"])
                r_us = statistics.median(r[0] for r in res["lrserve"])
                worst = max(r[1] for r in res["lrserve"])
                slow = max(r[2] for r in res["lrserve"])
                print(
                    f"{kind:<8} {t_us:>14.2f} {r_us:>16.2f} {r_us / t_us:>6.2f}x "
                    f"{worst:>11.2f} {slow:>13}"
                )
            results: dict[str, dict[str, list[float]]] = {}
            scheds = {}
            for kind in ("float", "tensor"):
                t_opt, r_opt = optimizer(kind == "tensor"), optimizer(kind == "tensor")
                remote = RemoteScheduler(
                    r_opt,
                    f"bench-{kind}",
                    url=url,
                    spec={"schedule": SPEC},
                    window=100_000,
                    poll_interval=3600,
                )
                scheds[kind] = (torch_sched(t_opt), remote)
                results[kind] = {"torch": [], "lrserve": []}
            for t, r in scheds.values():  # warm-up
                per_call_us(t.step, args.steps // 4)
                per_call_us(r.step, args.steps // 4)
            for _ in range(args.reps):  # interleaved, so drift on a noisy machine hits both
                for kind, (t, r) in scheds.items():
                    results[kind]["torch"].append(per_call_us(t.step, args.steps))
                    results[kind]["lrserve"].append(per_call_us(r.step, args.steps))
            for _, r in scheds.values():
                assert not r.holding
                r.close()
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"\nsteady state (window 100000, no refresh while timed), µs per call, "
        f"median of {args.reps} x {args.steps} calls:"
    )
    print(f"{'lr kind':<8} {'torch SequentialLR':>20} {'RemoteScheduler':>17} {'ratio':>7}")
    for kind, res in results.items():
        t_us, r_us = statistics.median(res["torch"]), statistics.median(res["lrserve"])
        print(f"{kind:<8} {t_us:>20.2f} {r_us:>17.2f} {r_us / t_us:>6.2f}x")
    print("\nwriting 8 tensor learning rates in place, µs per call:")
    for name, us in tensor_write_methods(args.steps, args.reps).items():
        print(f"  {name:<62} {us:6.2f}")


if __name__ == "__main__":
    main()
