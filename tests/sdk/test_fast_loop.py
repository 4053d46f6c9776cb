"""RemoteScheduler under a training loop that runs as fast as it can (default settings).

A loop with nothing in it but ``step()`` uses a 4096-step window in milliseconds: the next
windows are asked for early and may grow (within bounds), the switch interval is lowered
while a fetch the loop needs is in flight and put back after, and every value applied is
still torch's own. (Nothing here asserts a duration: whether the loop is judged fast
depends on the machine, so only what holds either way is checked.)
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any

import httpx
import lrserve
import pytest
import torch
from lrserve import torch as lrtorch
from lrserve.torch import RemoteScheduler

from .torch_support import torch_scheduler

SCHEDULE: dict[str, Any] = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
        {"type": "CosineAnnealingLR", "T_max": 20000, "eta_min": 1e-6},
    ],
    "milestones": [500],
}


class _RecordingTransport(httpx.HTTPTransport):
    """A real HTTP transport that records each window request and the switch interval."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[int, int, float]] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/lr"):
            q = request.url.params
            with self._lock:
                self.windows.append((int(q["start"]), int(q["count"]), sys.getswitchinterval()))
        return super().handle_request(request)


def _adamw(n: int) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3 * 0.97**i} for i in range(n)
    ]
    return torch.optim.AdamW(groups, foreach=False)


def _spec(n: int) -> dict[str, Any]:
    return {
        "groups": [{"name": f"g{i}", "lr": 1e-3 * 0.97**i} for i in range(n)],
        "schedule": SCHEDULE,
    }


@pytest.mark.parametrize("n", [8, 96])
def test_a_tight_loop_applies_torchs_values_through_growing_windows(
    live_server: Any, n: int
) -> None:
    steps = 14_000
    transport = _RecordingTransport()
    client = lrserve.Client(live_server.url, transport=transport)
    opt = _adamw(n)
    before = sys.getswitchinterval()
    first: list[float] = []  # group 0 at every step (cheap: the loop stays tight)
    every: dict[int, list[float]] = {}  # every group, every 97th step
    with RemoteScheduler(opt, f"tight-{n}", client=client, spec=_spec(n)) as sched:
        groups = opt.param_groups
        g0 = groups[0]
        for step in range(steps + 1):
            first.append(g0["lr"])
            if step % 97 == 0:
                every[step] = [g["lr"] for g in groups]
            sched.step()
        assert not sched.holding
    client.close()
    assert sys.getswitchinterval() == pytest.approx(before)

    ref = _adamw(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        oracle = torch_scheduler(ref, SCHEDULE)
        for step in range(steps + 1):
            # torch's chainable form drifts by an ulp or so from the closed form.
            assert first[step] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12), step
            if step in every:
                theirs = [g["lr"] for g in ref.param_groups]
                assert every[step] == pytest.approx(theirs, rel=1e-12), step
            oracle.step()

    windows = transport.windows
    assert sum(c for _, c, _ in windows) >= steps  # the values came in windows, not held
    # A window grows to at most 4x the default and at most FETCH_VALUES values (at least
    # n columns: a learning rate per group); at 96 groups that is no growth at all.
    assert lrtorch.FETCH_VALUES // 96 < 4096 <= lrtorch.FETCH_VALUES // (4 * 8)
    limit = 4 * 4096 if n == 8 else 4096
    assert max(c for _, c, _ in windows) <= limit, windows
    # The loop reached half way through a window (at the latest): the fetch it woke the
    # refresher for ran with the short switch interval.
    short = [iv for _, _, iv in windows if iv == pytest.approx(lrtorch.FETCH_SWITCH_INTERVAL)]
    assert short, windows


def test_the_switch_interval_the_user_set_is_put_back(live_server: Any) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.01)
    try:
        transport = _RecordingTransport()
        client = lrserve.Client(live_server.url, transport=transport)
        opt = _adamw(2)
        with RemoteScheduler(opt, "switch", client=client, spec=_spec(2), window=64) as sched:
            for _ in range(1000):  # many window boundaries, each a fetch with it lowered
                sched.step()
        client.close()
        lowered = [iv for _, _, iv in transport.windows if iv < 0.01]
        assert lowered and all(
            iv == pytest.approx(lrtorch.FETCH_SWITCH_INTERVAL) for iv in lowered
        ), transport.windows
        assert sys.getswitchinterval() == pytest.approx(0.01)
    finally:
        sys.setswitchinterval(old)
