"""POST metrics with 1 and 2 uvicorn workers on one SQLite file, against the bare endpoint.

Starts three servers as subprocesses: the bare reference app (``bench/_bare_app.py``, 1 worker:
pydantic validation and one SQLite row per POST), lrserve with ``--workers 1`` and lrserve with
``--workers 2``, each lrserve on its own fresh SQLite file with the defaults as shipped. Then
drives ``POST /v1/runs/{id}/metrics`` at 16 connections with the same load as
``bench/bench_http.py`` (each connection reports to its own run with strictly increasing steps,
so every request is a new, complete report), interleaving the servers rep by rep, and prints in
one run:

- lrserve (1 worker) / bare, by req/s and by server CPU per request (aim >= 0.8x);
- lrserve 2 workers / 1 worker, by req/s (aim >= 1.0x: not slower) and by CPU per report.

Server CPU is the user + sys time of the server process and all its worker processes.

    .venv/bin/python bench/bench_workers.py --reps 3 --duration 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_http as bh


def tree_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of a process and its live descendants (uvicorn's workers)."""
    total = bh.proc_cpu_s(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:  # ppid
            total += tree_cpu_s(int(entry))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3, help="seconds per point")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per server")
    ap.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    args = ap.parse_args()
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"

    flags = ["--loop", "uvloop", "--http", "httptools"]
    with tempfile.TemporaryDirectory(prefix="lrserve-bench-") as tmp, ExitStack() as stack:
        targets: dict[str, tuple[str, int]] = {}
        port = bh.free_port()
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(bh.ROOT / "bench")]
        cmd += ["_bare_app:app", "--port", str(port), "--no-access-log", "--workers", "1", *flags]
        env = {"BENCH_DB": f"{tmp}/bare.db", "BENCH_SYNC": "NORMAL"}
        targets["bare"] = (
            f"http://127.0.0.1:{port}",
            stack.enter_context(bh.server(cmd, env, port, "bare")),
        )
        for workers in (1, 2):
            port = bh.free_port()
            cmd = [sys.executable, "-m", "service", "--port", str(port), "--workers", str(workers)]
            cmd += ["--database", f"sqlite:///{tmp}/lrserve-{workers}.db"]
            name = f"lrserve-{workers}w"
            pid = stack.enter_context(bh.server(cmd, {}, port, name))
            targets[name] = (f"http://127.0.0.1:{port}", pid)
            bh.setup_lrserve(targets[name][0])

        def measure(base: str, pid: int, duration: float, start: int) -> bh.Point:
            cpu0 = tree_cpu_s(pid)
            if generator == "wrk":
                res = bh.run_wrk(base, bh._LUA_POST, duration, [str(start)], True)
            else:
                res = bh.run_python(base, True, duration, start)
            cpu = tree_cpu_s(pid) - cpu0
            n = max(res["requests"], 1)
            return bh.Point(
                rps=res["requests"] / (res["duration_us"] / 1e6),
                p50_ms=res["p50_us"] / 1000,
                p99_ms=res["p99_us"] / 1000,
                cpu_us=cpu / n * 1e6,
                bad=res["errors"] + res["non2xx"],
            )

        start = 0
        for base, pid in targets.values():  # warm-up, not recorded
            measure(base, pid, args.warmup, start)
            start += 10_000_000
        results: dict[str, list[bh.Point]] = {}
        for rep in range(args.reps):
            order = list(targets.items())
            order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate the order
            for name, (base, pid) in order:
                p = measure(base, pid, args.duration, start)
                start += 10_000_000
                results.setdefault(name, []).append(p)
                print(
                    f"rep {rep + 1}/{args.reps} POST {name:<11} {p.rps:>8,.0f} req/s"
                    f"  p50 {p.p50_ms:.2f} ms  p99 {p.p99_ms:.2f} ms"
                    f"  cpu {p.cpu_us:.0f} us/req  bad {p.bad}",
                    file=sys.stderr,
                )

    print(
        f"\nPOST metrics, {bh.CONNECTIONS} connections, generator {generator}, "
        f"{args.reps} reps x {args.duration:g} s, median (min-max)\n"
    )
    print("| server | req/s | p50 ms | p99 ms | server CPU us/req | non-2xx |")
    print("|---|---|---|---|---|---|")
    for name, pts in results.items():
        print(
            f"| {name} | {bh.fmt(pts, 'rps')} | {bh.fmt(pts, 'p50_ms', '.2f')} "
            f"| {bh.fmt(pts, 'p99_ms', '.2f')} | {bh.fmt(pts, 'cpu_us', '.0f')} "
            f"| {sum(p.bad for p in pts)} |"
        )
    print()
    for a, b, aim in (("lrserve-1w", "bare", 0.8), ("lrserve-2w", "lrserve-1w", 1.0)):
        num, den = results[a], results[b]
        ratio = statistics.median(p.rps for p in num) / statistics.median(p.rps for p in den)
        per_rep = [x.rps / y.rps for x, y in zip(num, den, strict=True)]
        cpu = statistics.median(p.cpu_us for p in den) / statistics.median(p.cpu_us for p in num)
        verdict = "meets" if ratio >= aim else "MISSES"
        print(
            f"POST {a}/{b} = {ratio:.2f}x req/s (per rep {min(per_rep):.2f}-{max(per_rep):.2f}), "
            f"{cpu:.2f}x by server CPU per request; aim >= {aim}x: {verdict}"
        )


if __name__ == "__main__":
    main()
