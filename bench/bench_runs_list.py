"""Run-list latency with 10,000 runs (the dashboard's list): each query against ``/healthz``.

Fills a fresh SQLite file with ``--runs`` runs through the store itself (tags, metadata and a
report each for most of them, heartbeats for some), starts ``python -m service`` on it and
times, sequentially over one keep-alive connection, the median latency of list queries (the
default page, every sort descending, status filters, a search, tags, a 1000-run page) and of
``GET /healthz`` measured in the same run, and prints each as milliseconds and as a ratio.

    .venv/bin/python bench/bench_runs_list.py                  # 10,000 runs, 30 requests each
    .venv/bin/python bench/bench_runs_list.py --runs 2000 --requests 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.runs.model import RunSpec  # noqa: E402
from service.runs.service import create_run, report  # noqa: E402
from service.store import open_store  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, n: int) -> None:
    store = open_store(url)
    store.migrate()
    teams = ["vision", "nlp", "speech", "rl"]
    try:
        for i in range(n):
            spec = RunSpec.model_validate(
                {
                    "groups": [{"name": "g", "lr": 0.1}],
                    "schedule": {"type": "CosineAnnealingLR", "T_max": 1000 + i % 5000},
                    "metadata": {
                        "tags": [teams[i % 4], f"sweep-{i % 50}"],
                        "owner": f"user{i % 37}",
                        "model": f"resnet{18 + i % 5}",
                    },
                }
            )
            run_id = f"run-{i:05d}"
            create_run(store, run_id, spec)
            if i % 3:
                report(store, run_id, i % 2000, 0, {"loss": 1.0 / (1 + i)})
            if i % 7 == 0:
                store.heartbeat(run_id, "2026-01-01T00:00:00.000000Z", None, i % 14 == 0)
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'list.db')}"
        t0 = time.perf_counter()
        fill(url, args.runs)
        print(f"filled {args.runs} runs in {time.perf_counter() - t0:.1f} s")
        port = _free_port()
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
                url,
                "--log-level",
                "warning",
            ],
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
            queries: list[tuple[str, dict[str, object]]] = [
                ("/healthz (reference)", {}),
                ("default page (50, by id)", {}),
                ("sort=-created", {"sort": "-created"}),
                ("sort=-updated", {"sort": "-updated"}),
                ("sort=-step", {"sort": "-step"}),
                ("status=running", {"status": "running"}),
                ("status=idle", {"status": "idle"}),
                ("status=finished", {"status": "finished"}),
                ("q=user3", {"q": "user3"}),
                ("tag=nlp&tag=sweep-9", {"tag": ["nlp", "sweep-9"]}),
                (
                    "status=idle&q=resnet2&sort=-step",
                    {"status": "idle", "q": "resnet2", "sort": "-step"},
                ),
                ("limit=1000&sort=-created", {"limit": 1000, "sort": "-created"}),
            ]
            with httpx.Client(base_url=base, timeout=30) as client:
                results = []
                for label, params in queries:
                    path = "/healthz" if label.startswith("/healthz") else "/v1/runs"
                    client.get(path, params=params)  # warm
                    times = []
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        r = client.get(path, params=params)
                        times.append(time.perf_counter() - t)
                        assert r.status_code == 200, r.text
                    n = len(r.json().get("runs", [])) if path != "/healthz" else 0
                    results.append((label, statistics.median(times), n))
            ref = results[0][1]
            print(f"{'query':42} {'median ms':>10} {'x healthz':>10} {'runs':>6}")
            for label, med, n in results:
                print(f"{label:42} {med * 1000:10.2f} {med / ref:10.1f} {n:6d}")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
