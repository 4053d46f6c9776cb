"""History reads against trainers: GET lr's latency while a dashboard pages a long history.

Seeds a fresh SQLite file (the default store) with one run of ``--reports`` reports (one rank,
two metrics each, every step completed), starts the real server (``python -m service``, one
worker) on it, then measures, in the same run:

- **alone**: a trainer's ``GET /v1/runs/{id}/lr?step=N`` back to back for ``--duration``
  seconds (one connection), its median and worst latency;
- **with history**: the same trainer loop while a second process reads the whole metric
  history the way the dashboard does (``GET /v1/runs/{id}/metrics?name=loss&limit=10000``,
  following ``next_after_step`` to the end, again and again).

The trainer and the reader are separate processes, so neither one's JSON parsing holds the
other's GIL, and the store is seeded in a third, so the trainer's heap is a trainer's (not the
service's objects and 10^5 reports' worth of garbage, whose full collections took ~50 ms and
were counted as GET lr latency): what is measured is the server. Prints both medians, both
worst cases and the ratio worst(with history) / median(alone). Aim: <= 20.

    .venv/bin/python bench/bench_history.py                   # 10^5 reports, 2 x 8 s
    .venv/bin/python bench/bench_history.py --reports 20000 --duration 4
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN = "bench-history"
SPEC: dict[str, Any] = {
    "groups": [{"name": "backbone", "lr": 1e-4}, {"name": "head", "lr": 1e-3}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 1_000_000, "eta_min": 1e-6},
    "world_size": 1,
}
PAGE = 10_000  # what the dashboard asks for per page (service/api/static/index.html)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(url: str, n: int) -> float:
    """``n`` reports of one rank, through the service's own report transaction."""
    from service.runs.model import RunSpec
    from service.runs.service import create_run, report
    from service.store import open_store, preflight

    preflight(url)
    store = open_store(url)
    t0 = time.perf_counter()
    create_run(store, RUN, RunSpec.model_validate(SPEC))
    for step in range(n):
        report(store, RUN, step, 0, {"loss": 2.0 / (1 + step * 1e-3), "acc": step / n})
    return time.perf_counter() - t0


def trainer(base: str, duration: float, start_at: float) -> list[float]:
    """Seconds per GET lr, back to back, for ``duration`` seconds from ``start_at``."""
    out: list[float] = []
    with httpx.Client(base_url=base, timeout=120) as c:
        c.get(f"/v1/runs/{RUN}/lr", params={"step": 0}).raise_for_status()
        # What this process holds so far (httpx, multiprocessing: ~3·10^4 objects) is out of
        # its collector's sight: a full collection of it took 15-20 ms here, the client's
        # pause counted as the server's latency.
        gc.collect()
        gc.freeze()
        while time.time() < start_at:
            time.sleep(0.005)
        end = time.perf_counter() + duration
        step = 0
        while time.perf_counter() < end:
            step += 1
            t = time.perf_counter()
            r = c.get(f"/v1/runs/{RUN}/lr", params={"step": step % 100_000})
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise SystemExit(f"GET lr: {r.status_code} {r.text[:200]}")
    return out


def reader(base: str, stop_at: float, q: Any) -> None:
    """Page through the whole history as the dashboard does until ``stop_at``; report
    (full reads, pages, points, seconds per full read) on ``q``."""
    reads = pages = points = 0
    per_read: list[float] = []
    with httpx.Client(base_url=base, timeout=300) as c:
        while time.time() < stop_at:
            t = time.perf_counter()
            cursor = -1
            while True:
                params: dict[str, Any] = {"name": "loss", "limit": PAGE}
                if cursor >= 0:
                    params["after_step"] = cursor
                r = c.get(f"/v1/runs/{RUN}/metrics", params=params)
                r.raise_for_status()
                got = r.json()
                pages += 1
                points += len(got["points"])
                nxt = got["next_after_step"]
                if nxt is None:
                    break
                cursor = nxt
            reads += 1
            per_read.append(time.perf_counter() - t)
    q.put((reads, pages, points, per_read))


def measure(base: str, duration: float, with_history: bool) -> tuple[list[float], Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 1.0
    print(f"{start_at:.2f} phase: {'with' if with_history else 'without'} history", file=sys.stderr)
    rd = None
    if with_history:
        rd = ctx.Process(target=reader, args=(base, start_at + duration, q))
        rd.start()
    lat = trainer(base, duration, start_at)
    stats = None
    if rd is not None:
        stats = q.get(timeout=600)
        rd.join()
    return lat, stats


def summary(lat: list[float]) -> tuple[float, float, float]:
    s = sorted(lat)
    return statistics.median(s) * 1e3, s[int(0.99 * (len(s) - 1))] * 1e3, s[-1] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reports", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--log", help="append the server's output to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lrserve-bench-history-") as tmp:
        url = f"sqlite:///{tmp}/lrserve.db"
        # Seeded in a child process: the service's objects and the 10^5 reports' garbage
        # would otherwise stay in this process's heap, and its full collections (~50 ms)
        # would count as GET lr latency: the client's pause, not the server's.
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            took = pool.apply(seed, (url, args.reports))
        print(f"seeded {args.reports:,} reports in {took:.1f} s", file=sys.stderr)
        port = args.port or free_port()
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--workers", "1"]
        cmd += ["--database", url]
        with open(args.log, "ab") if args.log else tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ, stdout=log, stderr=log)
            try:
                base = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        sys.exit(f"server did not start:\n{log.read().decode(errors='replace')}")
                    time.sleep(0.1)
                # Warm-up (not recorded): caches, the first history read.
                measure(base, 1.0, with_history=False)
                alone, _ = measure(base, args.duration, with_history=False)
                loaded, stats = measure(base, args.duration, with_history=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    a50, a99, amax = summary(alone)
    l50, l99, lmax = summary(loaded)
    reads, pages, points, per_read = stats
    print(f"history: {args.reports:,} reports, pages of {PAGE:,} steps")
    for label, n, p50, p99, worst in (
        ("alone", len(alone), a50, a99, amax),
        ("with history", len(loaded), l50, l99, lmax),
    ):
        print(f"GET lr {label:<13} n={n:>6}  p50 {p50:7.2f} ms  p99 {p99:7.2f}  max {worst:8.2f}")
    full = f"{statistics.median(per_read):.2f} s" if per_read else "n/a (none finished)"
    print(f"reader: {reads} full reads, {pages} pages, {points:,} points; per full read {full}")
    print(f"ratio worst(with history) / median(alone) = {lmax / a50:.1f}x   (aim <= 20)")
    print(f"ratio median(with history) / median(alone) = {l50 / a50:.2f}x")


if __name__ == "__main__":
    main()
