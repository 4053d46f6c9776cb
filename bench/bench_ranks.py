"""Many ranks (issue 12): server CPU per report, and how fast waiting ranks are answered.

Starts the real lrserve server (``python -m service``, default settings: SQLite, 1 worker) on a
fresh database and drives it over HTTP with a raw asyncio client (keep-alive sockets, requests
pre-encoded, on uvloop when it is installed, so the client's own cost stays small next to the
server's: this one process stands for a thousand trainers on other machines). In one run:

1. **CPU per report.** The same number of reports two ways, interleaved rep by rep: 16 runs of
   ``world_size=1`` reporting step after step (the reference), and one run of ``world_size=512``
   whose 512 ranks report every step (16 connections, completing reports included). Server CPU
   (user + sys from /proc) per report, and the ratio. Aim: <= 1.5x.
2. **Waiting ranks.** ``world_size=1024``: 1,023 ranks POST ``?wait=30`` and wait (the server's
   ``lrserve_report_waits`` gauge says when they all are), then the last rank reports. Time
   from sending the last report to the last waiting rank's complete answer; the same with one
   waiting rank (``world_size=2``) as the reference. Aim: <= 50 ms. The server's and this
   client's CPU over that time are printed too (from /proc, in 10 ms ticks): when the
   client's is as large as the server's, the figure is the client's.
   Before the last report, the server's CPU over 3 s of the ranks just waiting (what holding
   1,023 waits costs, against one).
3. **The completing report.** The same 1,024-rank step reported on one connection with nobody
   waiting: the last report's own latency (it aggregates every rank's values) against the
   median partial report's.

    .venv/bin/python bench/bench_ranks.py                # 3 reps
    .venv/bin/python bench/bench_ranks.py --reps 1 --steps 2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 16
T = TypeVar("T")


def spec(world_size: int) -> dict[str, Any]:
    """Two groups, a plateau on val_loss: every completion goes through its transition."""
    return {
        "groups": [{"name": "g0", "lr": 0.1}, {"name": "g1", "lr": 0.01}],
        "schedule": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 10**6},
        "world_size": world_size,
    }


def proc_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Conn:
    """One keep-alive HTTP/1.1 connection: send a request, read one response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, request: bytes) -> None:
        self.writer.write(request)

    async def response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)

    async def call(self, request: bytes) -> tuple[int, bytes]:
        self.send(request)
        return await self.response()

    def close(self) -> None:
        self.writer.close()


def post(run_id: str, step: int, rank: int, loss: float, wait: float = 0) -> bytes:
    body = json.dumps({"step": step, "rank": rank, "values": {"val_loss": loss}}).encode()
    query = f"?wait={wait:g}" if wait else ""
    return (
        f"POST /v1/runs/{run_id}/metrics{query} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def reports(port: int, requests: list[list[bytes]]) -> int:
    """Send each connection's requests in order (a barrier between the lists' rounds is the
    caller's: here one list per connection); returns how many were not 200."""
    conns = [await Conn.open(port) for _ in requests]
    bad = 0

    async def drive(conn: Conn, reqs: list[bytes]) -> None:
        nonlocal bad
        for r in reqs:
            status, _ = await conn.call(r)
            bad += status != 200

    await asyncio.gather(*(drive(c, reqs) for c, reqs in zip(conns, requests, strict=True)))
    for c in conns:
        c.close()
    return bad


async def cpu_one_rank(port: int, pid: int, tag: str, steps: int, per_step: int) -> float:
    """Server CPU µs per report: 16 runs of one rank, ``steps * per_step`` reports in all."""
    total = steps * per_step
    per_conn = total // CONNECTIONS
    ids = [f"one-{tag}-{i}" for i in range(CONNECTIONS)]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        for i in ids:
            assert c.put(f"/v1/runs/{i}", json=spec(1)).status_code == 201
    work = [[post(i, s, 0, 1.0 + (s % 7)) for s in range(per_conn)] for i in ids]
    cpu0 = proc_cpu_s(pid)
    bad = await reports(port, work)
    cpu = proc_cpu_s(pid) - cpu0
    assert bad == 0
    return cpu / (per_conn * CONNECTIONS) * 1e6


async def cpu_many_ranks(port: int, pid: int, tag: str, steps: int, ranks: int) -> float:
    """Server CPU µs per report: one run of ``ranks`` ranks, every rank reports every step."""
    run_id = f"many-{tag}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        assert c.put(f"/v1/runs/{run_id}", json=spec(ranks)).status_code == 201
    cpu = 0.0
    for s in range(steps):
        # The step's ranks spread over the connections; the next step once it is complete.
        work = [
            [post(run_id, s, r, 1.0 + r % 5) for r in range(i, ranks, CONNECTIONS)]
            for i in range(CONNECTIONS)
        ]
        cpu0 = proc_cpu_s(pid)
        bad = await reports(port, work)
        cpu += proc_cpu_s(pid) - cpu0
        assert bad == 0
    return cpu / (steps * ranks) * 1e6


async def completing(port: int, tag: str, ranks: int) -> tuple[float, float]:
    """(ms of the report that completes a ``ranks``-rank step, median ms of the partial
    reports before it), one connection, nobody waiting: what the completing report itself
    costs (it reads and aggregates every rank's values)."""
    run_id = f"complete-{tag}-{ranks}"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        assert c.put(f"/v1/runs/{run_id}", json=spec(ranks)).status_code == 201
    conn = await Conn.open(port)
    partial: list[float] = []
    for r in range(ranks - 1):
        t0 = time.perf_counter()
        status, _ = await conn.call(post(run_id, 0, r, 1.0 + r % 5))
        partial.append(time.perf_counter() - t0)
        assert status == 200
    t0 = time.perf_counter()
    status, body = await conn.call(post(run_id, 0, ranks - 1, 1.0))
    last = time.perf_counter() - t0
    assert status == 200 and json.loads(body)["complete"], body[:200]
    conn.close()
    return last * 1e3, statistics.median(partial) * 1e3


def waits(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    for line in text.splitlines():
        if line.startswith("lrserve_report_waits "):
            return float(line.split()[1])
    return 0.0


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed (it is with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on Linux
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


FANOUT_CPU: list[tuple[float, float]] = []
"""(server, client) CPU ms over each 1,024-rank fan-out timed by :func:`answered`."""
IDLE_CPU: dict[int, list[float]] = {}
"""Per number of waiting ranks, the server's CPU (fraction of a core) while they wait."""
IDLE_SECONDS = 3.0


async def answered(port: int, tag: str, ranks: int, pid: int | None = None) -> float:
    """ms from sending the last rank's report to the last waiting rank's complete answer
    (with ``pid``, the server's: the CPU both sides used meanwhile goes to FANOUT_CPU)."""
    run_id = f"wait-{tag}-{ranks}"
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as c:
        created = c.put(f"/v1/runs/{run_id}", json=spec(ranks))
        assert created.status_code == 201
    before = waits(port)
    conns = [await Conn.open(port) for _ in range(ranks)]
    for r, conn in enumerate(conns[:-1]):
        conn.send(post(run_id, 0, r, 1.0, wait=30))
    deadline = time.monotonic() + 60
    # Every waiting report stored (each bumps the run's version; the gauge counts a wait
    # from before its write), and every one waiting: only then is the last report the last.
    stored = created.json()["version"] + ranks - 1
    while (
        waits(port) < before + ranks - 1
        or httpx.get(f"{base}/v1/runs/{run_id}", timeout=60).json()["version"] < stored
    ):
        assert time.monotonic() < deadline, "the waits did not all start"
        await asyncio.sleep(0.02)
    if pid:
        # Nothing happens while they wait: what holding them costs the server.
        idle0 = proc_cpu_s(pid)
        await asyncio.sleep(IDLE_SECONDS)
        IDLE_CPU.setdefault(ranks - 1, []).append((proc_cpu_s(pid) - idle0) / IDLE_SECONDS)
    done: list[float] = []

    async def read(conn: Conn) -> None:
        status, body = await conn.response()
        assert status == 200 and json.loads(body)["complete"], body[:200]
        done.append(time.perf_counter())

    readers = [asyncio.create_task(read(c)) for c in conns[:-1]]
    # This one process stands for 1,023 trainers: its collector walking their 1,023
    # connections' objects (20-40 ms, seen mid fan-out) is no server's latency.
    gc.collect()
    gc.disable()
    try:
        server0 = proc_cpu_s(pid) if pid else 0.0
        client0 = time.process_time()
        t0 = time.perf_counter()
        status, body = await conns[-1].call(post(run_id, 0, ranks - 1, 1.0))
        assert status == 200 and json.loads(body)["complete"], body[:200]
        await asyncio.gather(*readers)
        if pid:
            server_ms = (proc_cpu_s(pid) - server0) * 1e3
            FANOUT_CPU.append((server_ms, (time.process_time() - client0) * 1e3))
    finally:
        gc.enable()
    for conn in conns:
        conn.close()
    return (max(done) - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="reporting steps of the 512-rank run")
    ap.add_argument("--ranks", type=int, default=512)
    ap.add_argument("--wait-ranks", type=int, default=1024)
    ap.add_argument("--port", type=int, default=18250)
    ap.add_argument("--database", default=None, help="default: a fresh SQLite file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    database = args.database or f"sqlite:///{tmp / 'lrserve.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "service", "--port", str(args.port), "--database", database]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed with the server
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        dialect = database.split(":")[0]
        print(f"lrserve on {dialect}, 1 worker; {args.ranks} ranks x {args.steps} steps")
        one, many, wait_one, wait_many, last, partial = [], [], [], [], [], []
        for rep in range(args.reps):
            tag = f"r{rep}"
            point = (args.port, proc.pid, tag, args.steps, args.ranks)
            one.append(run(cpu_one_rank(*point)))
            many.append(run(cpu_many_ranks(*point)))
            wait_one.append(run(answered(args.port, tag, 2, proc.pid)))
            wait_many.append(run(answered(args.port, tag, args.wait_ranks, proc.pid)))
            done = run(completing(args.port, tag, args.wait_ranks))
            last.append(done[0])
            partial.append(done[1])
            print(
                f"rep {rep}: CPU/report 1 rank {one[-1]:.0f} us, {args.ranks} ranks "
                f"{many[-1]:.0f} us ({many[-1] / one[-1]:.2f}x); all answered "
                f"{wait_one[-1]:.1f} ms (1 waiting), {wait_many[-1]:.1f} ms "
                f"({args.wait_ranks - 1} waiting; CPU {FANOUT_CPU[-1][0]:.0f} ms server, "
                f"{FANOUT_CPU[-1][1]:.0f} ms client); completing report {last[-1]:.2f} ms "
                f"(partial ones {partial[-1]:.2f} ms)"
            )
        ratio = statistics.median(m / o for m, o in zip(many, one, strict=True))
        ms = statistics.median(wait_many)
        print(
            f"server CPU per report, {args.ranks} ranks / 1 rank: {ratio:.2f}x (median of "
            f"{args.reps}; aim <= 1.5x: {'ok' if ratio <= 1.5 else 'MISSED'})"
        )
        print(
            f"{args.wait_ranks}-rank step answered to all waiting ranks {ms:.1f} ms after the "
            f"last report (median; {ms / statistics.median(wait_one):.1f}x one waiting rank's "
            f"{statistics.median(wait_one):.1f} ms; aim <= 50 ms: {'ok' if ms <= 50 else 'MISSED'})"
        )
        idle_many = statistics.median(IDLE_CPU[args.wait_ranks - 1])
        idle_one = statistics.median(IDLE_CPU[1])
        print(
            f"server CPU while {args.wait_ranks - 1} ranks wait (nothing else happening): "
            f"{idle_many * 100:.1f}% of a core, {idle_one * 100:.1f}% with one waiting "
            f"(median of {args.reps}, {IDLE_SECONDS:g} s each; "
            f"{(idle_many - idle_one) * 1e6 / (args.wait_ranks - 2):.1f} us/s per wait)"
        )
        last_ms, partial_ms = statistics.median(last), statistics.median(partial)
        print(
            f"the report completing a {args.wait_ranks}-rank step (nobody waiting): "
            f"{last_ms:.2f} ms, {last_ms / partial_ms:.1f}x a partial report's "
            f"{partial_ms:.2f} ms (median of {args.reps})"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


if __name__ == "__main__":
    main()
