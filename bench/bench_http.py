"""HTTP benchmark: lrserve against bare FastAPI endpoints, measured in the same run.

Starts two servers as subprocesses (uvicorn, 1 worker, uvloop + httptools): the bare reference app
(``bench/_bare_app.py``: a same-shaped response model; one SQLite row written per POST) and the real
lrserve server on a fresh SQLite file. Then drives each with a load generator at 16 concurrent
connections (``GET /v1/runs/{id}/lr?step=N`` and ``POST /v1/runs/{id}/metrics``), interleaving the
two servers rep by rep, and prints req/s, p50/p99 latency, server CPU per request and the ratios
lrserve / bare. Aims: GET >= 0.8x, POST >= 0.5x.

Load generator: ``wrk`` when it is on PATH (``apt-get install wrk`` on Debian; bench only), else
a Python asyncio + httpx generator in a separate process (much slower than wrk, so it saturates
before the servers do and the ratios move towards 1: prefer wrk).

POST semantics: every connection reports to its own run (``bench-post-<i>``, a ReduceLROnPlateau
variant) with strictly increasing steps, so each request is a new, complete report (never a
duplicate, never stale). wrk then runs one thread per connection to keep a counter per connection.

    .venv/bin/python bench/bench_http.py                 # 5 reps x 3 s per point
    .venv/bin/python bench/bench_http.py --reps 3 --duration 2 --generator python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 16
GET_RUN = "bench-get"

# warmup + cosine over two groups; the bare app computes exactly this schedule in closed form.
GROUPS = [{"name": "backbone", "lr": 1e-4, "momentum": 0.9}, {"name": "head", "lr": 1e-3}]
WARMUP_COSINE = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 100},
        {"type": "CosineAnnealingLR", "T_max": 9900, "eta_min": 1e-6},
    ],
    "milestones": [100],
}
GET_BODY = {"groups": GROUPS, "schedule": WARMUP_COSINE}
# The POST variant: the backbone follows warmup + cosine, the head a plateau on val_loss, so every
# report goes through the plateau transition.
POST_BODY = {
    "groups": GROUPS,
    "schedule": WARMUP_COSINE,
    "group_schedules": {
        "head": {
            "type": "ReduceLROnPlateau",
            "metric": "val_loss",
            "patience": 10,
            "factor": 0.5,
            "min_lr": 1e-6,
        }
    },
}

# wrk scripts. GET: a counter per thread walks the steps. POST: one thread per connection, each with
# its own run and a strictly increasing step from a start given on the command line; done() prints
# one JSON line that the parent parses.
_LUA_COMMON = """
done = function(summary, latency, requests)
  io.write(string.format(
    '\\nBENCH_JSON {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d,'
    .. ' "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""
_LUA_GET = (
    """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/v1/runs/RUN/lr?step=" .. (n % 10000))
end
""".replace("RUN", GET_RUN)
    + _LUA_COMMON
)
_LUA_POST = (
    """
local counter = 0
setup = function(thread)
  thread:set("id", counter)
  counter = counter + 1
end
local path, step
init = function(args)
  path = "/v1/runs/bench-post-" .. id .. "/metrics"
  step = tonumber(args[1])
end
request = function()
  step = step + 1
  local body = string.format('{"step": %d, "rank": 0, "values": {"val_loss": %.6f}}',
                             step, 1.0 / (1 + step % 997))
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
"""
    + _LUA_COMMON
)


@dataclass
class Point:
    """One measurement: a target, an operation, one rep."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    bad: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(cmd: list[str], env: dict[str, str], port: int, name: str) -> Iterator[int]:
    """Start a server subprocess, wait for /healthz, yield its pid, stop it."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        yield from _serve(proc, log, port, name)


def _serve(proc: subprocess.Popen[bytes], log: Any, port: int, name: str) -> Iterator[int]:
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                sys.exit(f"{name} did not start:\n{log.read().decode(errors='replace')}")
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_wrk(url: str, script: str, duration: float, args: list[str], post: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(script)
        f.flush()
        threads = CONNECTIONS if post else 1
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{CONNECTIONS}",
            f"-d{max(1, round(duration))}s",
            "-s",
            f.name,
            url,
        ]
        out = subprocess.run([*cmd, "--", *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    res: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    return res


async def _python_load(url: str, post: bool, duration: float, start: int) -> dict[str, Any]:
    latencies: list[float] = []
    bad = 0
    stop = time.perf_counter() + duration

    async def worker(i: int) -> None:
        nonlocal bad
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            step = start
            while time.perf_counter() < stop:
                step += 1
                t0 = time.perf_counter()
                if post:
                    body = {"step": step, "rank": 0, "values": {"val_loss": 1.0 / (1 + step % 997)}}
                    r = await client.post(f"/v1/runs/bench-post-{i}/metrics", json=body)
                else:
                    r = await client.get(f"/v1/runs/{GET_RUN}/lr", params={"step": step % 10000})
                latencies.append(time.perf_counter() - t0)
                bad += r.status_code >= 300

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "errors": 0,
        "non2xx": bad,
        "p50_us": int(latencies[len(latencies) // 2] * 1e6),
        "p99_us": int(latencies[int(len(latencies) * 0.99)] * 1e6),
    }


def run_python(url: str, post: bool, duration: float, start: int) -> dict[str, Any]:
    """The fallback generator, in its own process so that it does not share the GIL with us."""
    cmd = [sys.executable, __file__, "--_loadgen", json.dumps([url, post, duration, start])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def measure(generator: str, base: str, pid: int, post: bool, duration: float, start: int) -> Point:
    cpu0 = proc_cpu_s(pid)
    if generator == "wrk":
        res = run_wrk(base, _LUA_POST if post else _LUA_GET, duration, [str(start)], post)
    else:
        res = run_python(base, post, duration, start)
    cpu = proc_cpu_s(pid) - cpu0
    n = max(res["requests"], 1)
    return Point(
        rps=res["requests"] / (res["duration_us"] / 1e6),
        p50_ms=res["p50_us"] / 1000,
        p99_ms=res["p99_us"] / 1000,
        cpu_us=cpu / n * 1e6,
        bad=res["errors"] + res["non2xx"],
    )


def setup_lrserve(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.put(f"/v1/runs/{GET_RUN}", json=GET_BODY)
        assert r.status_code in (200, 201), r.text
        for i in range(CONNECTIONS):
            r = c.put(f"/v1/runs/bench-post-{i}", json=POST_BODY)
            assert r.status_code in (200, 201), r.text
        # Same shape as the bare app's answers (a sanity check that the comparison is fair).
        r = c.get(f"/v1/runs/{GET_RUN}/lr", params={"step": 150})
        assert set(r.json()["groups"]) == {"backbone", "head"}, r.text


def fmt(points: list[Point], attr: str, spec: str = ",.0f") -> str:
    vals = [getattr(p, attr) for p in points]
    return f"{statistics.median(vals):{spec}} ({min(vals):{spec}}-{max(vals):{spec}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3, help="seconds per point")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per server")
    ap.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--sync", default="NORMAL", help="bare app's SQLite synchronous setting")
    ap.add_argument("--_loadgen", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._loadgen:
        url, post, duration, start = json.loads(args._loadgen)
        print(json.dumps(asyncio.run(_python_load(url, post, duration, start))))
        return
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"

    uvicorn_flags = ["--workers", "1", "--loop", "uvloop", "--http", "httptools"]
    with tempfile.TemporaryDirectory(prefix="lrserve-bench-") as tmp:
        bare_port, lrs_port = free_port(), free_port()
        bare_cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench")]
        bare_cmd += ["_bare_app:app", "--port", str(bare_port), "--no-access-log", *uvicorn_flags]
        lrs_cmd = [sys.executable, "-m", "service", "--port", str(lrs_port), "--workers", "1"]
        lrs_cmd += ["--database", f"sqlite:///{tmp}/lrserve.db"]
        bare_env = {"BENCH_DB": f"{tmp}/bare.db", "BENCH_SYNC": args.sync}
        with (
            server(bare_cmd, bare_env, bare_port, "bare app") as bare_pid,
            server(lrs_cmd, {}, lrs_port, "lrserve") as lrs_pid,
        ):
            targets = {
                "bare": (f"http://127.0.0.1:{bare_port}", bare_pid),
                "lrserve": (f"http://127.0.0.1:{lrs_port}", lrs_pid),
            }
            setup_lrserve(targets["lrserve"][0])
            results: dict[tuple[str, str], list[Point]] = {}
            start = 0
            for base, pid in targets.values():  # warm-up, not recorded
                for post in (False, True):
                    measure(generator, base, pid, post, args.warmup, start)
                    start += 10_000_000
            for rep in range(args.reps):
                # Alternate the order each rep so that neither server always runs first.
                order = list(targets.items()) if rep % 2 == 0 else list(targets.items())[::-1]
                for op in ("GET lr", "POST metrics"):
                    for name, (base, pid) in order:
                        post = op.startswith("POST")
                        p = measure(generator, base, pid, post, args.duration, start)
                        start += 10_000_000
                        results.setdefault((op, name), []).append(p)
                        print(
                            f"rep {rep + 1}/{args.reps} {op:<12} {name:<8} {p.rps:>9,.0f} req/s"
                            f"  p50 {p.p50_ms:.2f} ms  p99 {p.p99_ms:.2f} ms"
                            f"  cpu {p.cpu_us:.0f} us/req  bad {p.bad}",
                            file=sys.stderr,
                        )

    print(
        f"\nlrserve vs bare FastAPI, {CONNECTIONS} connections, 1 worker (uvloop+httptools), "
        f"generator {generator}, {args.reps} reps x {args.duration:g} s, median (min-max)\n"
    )
    print("| endpoint | server | req/s | p50 ms | p99 ms | server CPU us/req | non-2xx |")
    print("|---|---|---|---|---|---|---|")
    for (op, name), pts in results.items():
        print(
            f"| {op} | {name} | {fmt(pts, 'rps')} | {fmt(pts, 'p50_ms', '.2f')} "
            f"| {fmt(pts, 'p99_ms', '.2f')} | {fmt(pts, 'cpu_us', '.0f')} "
            f"| {sum(p.bad for p in pts)} |"
        )
    print()
    for op, aim in (("GET lr", 0.8), ("POST metrics", 0.5)):
        # Ratio of medians, and the spread of per-rep ratios (each rep measures both back to back).
        lrs, bare = results[(op, "lrserve")], results[(op, "bare")]
        ratio = statistics.median(p.rps for p in lrs) / statistics.median(p.rps for p in bare)
        per_rep = [a.rps / b.rps for a, b in zip(lrs, bare, strict=True)]
        # CPU per request is the steadier figure on a shared, noisy machine.
        cpu = statistics.median(p.cpu_us for p in bare) / statistics.median(p.cpu_us for p in lrs)
        verdict = "meets" if ratio >= aim else "MISSES"
        print(
            f"{op}: lrserve/bare = {ratio:.2f}x req/s (per rep {min(per_rep):.2f}-"
            f"{max(per_rep):.2f}), {cpu:.2f}x by server CPU per request; aim >= {aim}x: {verdict}"
        )


if __name__ == "__main__":
    main()
