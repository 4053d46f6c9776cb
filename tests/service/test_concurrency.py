"""Exact under concurrency, over HTTP: many requests at once never change a served value.

One server process evaluates every request of a run with the same compiled program (and
every run with the same spec shares it), on the event loop and in worker threads. These
tests send long curves, windows and previews at once, then compare what the server answers
with torch's own scheduler; and retried reports at once on PostgreSQL (one stored report,
no 503).
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import ServerProcess
from tests.service.helpers import close, new_id

LAMBDA = "0.99999 + 0.000001 * cos(epoch)"
HORIZON = 200_000
BASE_LR = 0.1


def _torch_multiplicative(n: int) -> list[float]:
    """lr after 0..n-1 steps of torch's MultiplicativeLR with ``LAMBDA``."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = torch.optim.lr_scheduler.MultiplicativeLR(
        opt, lr_lambda=lambda epoch: 0.99999 + 0.000001 * math.cos(epoch)
    )
    out = [opt.param_groups[0]["lr"]]
    for _ in range(n - 1):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.fixture(scope="module")
def oracle() -> list[float]:
    return _torch_multiplicative(HORIZON)


def _spec(round_: int = 0) -> dict[str, Any]:
    # The metadata makes each round's spec text new, so its compiled program starts cold.
    return {
        "groups": [{"name": "all", "lr": BASE_LR}],
        "schedule": {"type": "MultiplicativeLR", "lr_lambda": LAMBDA},
        "metadata": {"round": round_},
    }


def _requests(server: ServerProcess, run_id: str, spec: dict[str, Any]) -> list[Callable[[], Any]]:
    """Requests that make the server fill a cold program's lazily computed parts from many
    places at once: long decimated curves (worker threads), far-apart windows (the event
    loop) and previews of the same spec (threads, another program of the same spec)."""
    rng = random.Random(run_id)
    schedule_part = {k: v for k, v in spec.items() if k != "metadata"}

    def curve() -> Any:
        with server.client() as c:
            return c.get(f"/v1/runs/{run_id}/curve", params={"stop": HORIZON, "points": 200})

    def window() -> Any:
        with server.client() as c:
            start = rng.randrange(0, HORIZON - 4096)
            return c.get(f"/v1/runs/{run_id}/lr", params={"start": start, "count": 4096})

    def preview() -> Any:
        with server.client() as c:
            start = rng.randrange(0, HORIZON - 1000)
            return c.post(
                "/v1/schedules/preview", json={**schedule_part, "start": start, "count": 1000}
            )

    return [curve] * 8 + [window] * 4 + [preview] * 2


def test_concurrent_curves_windows_and_previews_serve_torchs_values(
    live_server: ServerProcess, oracle: list[float]
) -> None:
    wrong: list[tuple[int, str, int]] = []
    for round_ in range(8):
        run_id = new_id("conc")
        spec = _spec(round_)
        with live_server.client() as c:
            assert c.put(f"/v1/runs/{run_id}", json=spec).status_code == 201
        calls = _requests(live_server, run_id, spec)
        barrier = threading.Barrier(len(calls))

        def go(call: Callable[[], Any], barrier: threading.Barrier = barrier) -> Any:
            barrier.wait(timeout=10)
            return call()

        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(go, calls))
        failed = [a.text for a in answers if a.status_code != 200]
        assert not failed, failed[:2]

        with live_server.client() as c:
            # Single steps across every chunk of the program's running product...
            for step in [0, 1, 65_535, 65_536, 65_537, 131_072, 149_999, 199_999]:
                body = c.get(f"/v1/runs/{run_id}/lr", params={"step": step}).json()
                if not close([body["groups"]["all"]["lr"]], [oracle[step]]):
                    wrong.append((round_, "step", step))
            # ... windows ...
            for start in [0, 60_000, 130_000, 195_000]:
                body = c.get(f"/v1/runs/{run_id}/lr", params={"start": start, "count": 5000}).json()
                if not close(body["groups"]["all"]["lr"], oracle[start : start + 5000]):
                    wrong.append((round_, "window", start))
            # ... a curve, whose every sampled step must be torch's ...
            body = c.get(f"/v1/runs/{run_id}/curve", params={"stop": HORIZON, "points": 400}).json()
            if not close(body["groups"]["all"]["lr"], [oracle[s] for s in body["steps"]]):
                wrong.append((round_, "curve", 0))
            # ... and a preview of the same spec.
            preview = {**spec, "start": 180_000, "count": 2000}
            del preview["metadata"]
            body = c.post("/v1/schedules/preview", json=preview).json()
            if not close(body["groups"]["all"]["lr"], oracle[180_000:182_000]):
                wrong.append((round_, "preview", 180_000))
    assert wrong == []


@pytest.mark.postgres
def test_concurrent_duplicate_reports_on_postgres(
    server_factory: Callable[..., ServerProcess], postgres_url: str
) -> None:
    """80 retries of one report at once: every answer 200 with the same decision, one row.

    The duplicate path reads the step's stored decision; on a second pooled connection while
    the transaction held the first, 40 concurrent duplicates ran the pool dry (up to 37 x 503).
    """
    server = server_factory(database=postgres_url)
    run_id = new_id("dup")
    spec = {
        "groups": [{"name": "all", "lr": 0.1}],
        "schedule": {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0},
    }
    report = {"step": 10, "values": {"loss": 1.0}}
    with server.client() as c:
        assert c.put(f"/v1/runs/{run_id}", json=spec).status_code == 201
        first = c.post(f"/v1/runs/{run_id}/metrics", json=report)
        assert first.status_code == 200, first.text
    barrier = threading.Barrier(80)

    def retry(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=10)
            return c.post(f"/v1/runs/{run_id}/metrics", json=report)

    with ThreadPoolExecutor(80) as pool:
        answers = list(pool.map(retry, range(80)))
    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200], [a.text for a in answers if a.status_code != 200][:3]
    expected = first.json()
    for a in answers:
        body = a.json()
        assert body["complete"] and body["decision"] == expected["decision"]
        assert body["groups"] == expected["groups"]
    with server.client() as c:
        history = c.get(f"/v1/runs/{run_id}/metrics", params={"name": "loss"}).json()
        run = c.get(f"/v1/runs/{run_id}").json()
    assert history["points"] == [{"step": 10, "rank": 0, "value": 1.0, "branch": 0}]
    assert run["version"] == expected["version"]
