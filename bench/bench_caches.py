"""Server CPU per ``GET /v1/runs/{id}/lr?step=N`` cycling over many runs vs over one run.

Fills a fresh SQLite file with ``--runs`` runs (each its own spec: a warmup + cosine
SequentialLR with its own ``T_max``, ``--groups`` groups), starts ``python -m service`` on it
with the default settings and reads the server process's CPU time (``/proc/<pid>/stat``) around
``--requests`` sequential requests over one keep-alive connection:

- *many, cold*: the first request to every run (nothing compiled or cached yet);
- *many, warm*: request ``i`` goes to run ``i % runs``;
- *one*: every request to the same run (the reference).

Every request asks for the run's next step ``--stride`` steps on, as a trainer that reads its
lr every ``stride`` steps does, in both phases alike: so a lease write (every 64 steps) and a
new values block (every 1,024 steps) come as often per request whatever the number of runs.
The ratio many/one is what the caches cost when many runs are active (issue 12: 3-9x when the
caches held 512 compiled runs; 1.0 means none).

    .venv/bin/python bench/bench_caches.py                     # 1,000 runs, 3,000 requests
    .venv/bin/python bench/bench_caches.py --groups 32 --cache-bytes 536870912

At 32 groups a run's values block is 256 KiB, so 1,000 runs need more than the default 64 MiB
values cache: with the default the blocks of the least recently read runs are rebuilt (what
``LRSERVE_CACHE_BYTES`` is for; docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.runs.model import RunSpec  # noqa: E402
from service.runs.service import create_run  # noqa: E402
from service.store import open_store  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    for port in range(18500, 18600):  # (the range this bench may use on a shared machine)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18500-18599")


def _cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def fill(url: str, runs: int, groups: int) -> list[str]:
    store = open_store(url)
    store.migrate()
    ids = []
    try:
        for i in range(runs):
            spec = RunSpec.model_validate(
                {
                    "groups": [{"name": f"g{k}", "lr": 0.1 / (k + 1)} for k in range(groups)],
                    "schedule": {
                        "type": "SequentialLR",
                        "schedulers": [
                            {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
                            {"type": "CosineAnnealingLR", "T_max": 100_000 + i, "eta_min": 1e-6},
                        ],
                        "milestones": [500],
                    },
                    "metadata": {"owner": f"user{i}"},
                }
            )
            run_id = f"run-{i:05d}"
            create_run(store, run_id, spec)
            ids.append(run_id)
    finally:
        store.close()
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument(
        "--cache-bytes",
        type=int,
        default=None,
        help="LRSERVE_CACHE_BYTES for the server (default: the server's default, 64 MiB)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'caches.db')}"
        t0 = time.perf_counter()
        ids = fill(url, args.runs, args.groups)
        print(f"filled {args.runs} runs ({args.groups} groups) in {time.perf_counter() - t0:.1f} s")
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LRSERVE_")}
        env["PYTHONPATH"] = str(ROOT)
        if args.cache_bytes is not None:
            env["LRSERVE_CACHE_BYTES"] = str(args.cache_bytes)
        command = [sys.executable, "-m", "service", "--port", str(port), "--database", url]
        proc = subprocess.Popen(
            [*command, "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.1)
            steps = dict.fromkeys(ids, 0)
            with httpx.Client(base_url=base, timeout=60) as client:

                def phase(targets: list[str]) -> float:
                    """Server CPU ms per request over ``targets`` (in order)."""
                    before = _cpu(proc.pid)
                    for run_id in targets:
                        r = client.get(f"/v1/runs/{run_id}/lr", params={"step": steps[run_id]})
                        assert r.status_code == 200, r.text
                        steps[run_id] += args.stride
                    return (_cpu(proc.pid) - before) * 1000 / len(targets)

                n = args.requests
                cold = phase(ids)
                many = phase([ids[i % len(ids)] for i in range(n)])
                one = phase([ids[0]] * n)
                many_again = phase([ids[i % len(ids)] for i in range(n)])
            print(f"{'phase':34} {'server CPU ms/request':>22} {'x one run':>10}")
            for label, ms in (
                ("one run (reference)", one),
                (f"{args.runs} runs, first request each", cold),
                (f"{args.runs} runs, cycling", many),
                (f"{args.runs} runs, cycling again", many_again),
            ):
                print(f"{label:34} {ms:22.3f} {ms / one:10.2f}")
            warm = (many + many_again) / 2
            print(f"ratio many/one (warm, mean of both passes): {warm / one:.2f}")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
