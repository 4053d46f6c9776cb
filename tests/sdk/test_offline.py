"""The service going away: training continues, nothing is lost, and values catch up."""

from __future__ import annotations

import io
import math
import time
import warnings
from typing import Any

import lrserve
import pytest
import torch
from lrserve.torch import LRServeOfflineWarning, RemoteScheduler, WindowExhaustedError

from tests.conftest import free_port
from tests.sdk.torch_support import (
    WARMUP_COSINE,
    assert_same,
    hyper,
    restart_same_port,
    sgd,
    torch_scheduler,
)


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_and_restart_mid_training_loses_nothing(live_server: Any, server_factory: Any) -> None:
    opt, ref_opt = sgd(), sgd()
    ref = torch_scheduler(ref_opt, WARMUP_COSINE)
    sched = RemoteScheduler(
        opt,
        "outage",
        url=live_server.url,
        spec={"schedule": WARMUP_COSINE},
        window=400,
        poll_interval=0.05,
    )
    reported, held_steps, stale = [], 0, False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2000):
            if step == 300:
                live_server.kill()
            if step == 1200:
                restart_same_port(live_server, server_factory)
            if step >= 1200 and sched.holding:
                _wait(lambda: not sched.holding)  # a real step takes long enough for this
            if stale:
                held_steps += 1  # the optimizer holds the last known values
            else:
                assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            if step % 100 == 0:
                sched.report({"val_loss": 1.0 / (step + 1)})  # never raises (strict=False)
                reported.append(step)
            ref_opt.step()
            ref.step()
            sched.step()
            stale = sched.holding
    offline = [w for w in caught if issubclass(w.category, LRServeOfflineWarning)]
    assert 1 <= len(offline) <= 2, [str(w.message) for w in offline]  # "unreachable" (+ "holding")
    assert held_steps > 0, "the outage outlasted the window: values must have been held"
    assert not sched.holding and not sched.offline
    assert_same(hyper(opt), hyper(ref_opt), "after catch-up")
    sched.close()
    with lrserve.Client(live_server.url) as client:
        points = client.get_metrics("outage", "val_loss")["points"]
    assert sorted(p["step"] for p in points) == reported  # the reports made while down arrived


@pytest.mark.filterwarnings("ignore::lrserve.torch.LRServeOfflineWarning")
def test_values_beyond_the_window_are_held_and_strict_raises(live_server: Any) -> None:
    spec = {"schedule": {"type": "ExponentialLR", "gamma": 0.5}}
    lenient = RemoteScheduler(
        sgd(), "hold", url=live_server.url, spec=spec, window=8, poll_interval=60
    )
    strict = RemoteScheduler(
        sgd(), "hold", url=live_server.url, spec=spec, window=8, poll_interval=60, strict=True
    )
    live_server.kill()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            lenient.step()
    assert lenient.get_last_lr() == [0.1 * 0.5**7, 0.01 * 0.5**7]  # the last value it knew
    assert lenient.holding and lenient.last_epoch == 20
    assert 1 <= sum(issubclass(w.category, LRServeOfflineWarning) for w in caught) <= 2
    assert lenient.report({"val_loss": 1.0}) is None  # kept for later, not raised
    for _ in range(7):
        strict.step()
    with pytest.raises(WindowExhaustedError):
        strict.step()
    with pytest.raises(lrserve.TransportError):
        strict.report({"val_loss": 1.0})
    lenient.close()
    strict.close()


@pytest.mark.filterwarnings("ignore::lrserve.torch.LRServeOfflineWarning")
def test_starting_while_the_service_is_down(server_factory: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = {"schedule": {"type": "StepLR", "step_size": 2, "gamma": 0.1}}
    with pytest.raises(lrserve.TransportError):
        RemoteScheduler(sgd(), "late", url=url, spec=spec, strict=True)
    opt = sgd()
    with pytest.warns(LRServeOfflineWarning):
        sched = RemoteScheduler(opt, "late", url=url, spec=spec, poll_interval=0.05)
    sched.step()
    assert sched.get_last_lr() == [0.1, 0.01] and sched.holding  # the optimizer's own values
    server_factory(args=["--port", str(port)])
    _wait(lambda: sched.version is not None)  # the refresher created the run and caught up
    sched.step()
    assert sched.last_epoch == 2
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.1, 0.01 * 0.1], rel=1e-12)
    sched.close()


@pytest.mark.filterwarnings("ignore::lrserve.torch.LRServeOfflineWarning")
def test_a_none_report_kept_offline_is_checkpointed_and_delivered(
    live_server: Any, server_factory: Any
) -> None:
    """None ("no value") and NaN go through the outbox, state_dict() and the replay."""
    node = {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0}
    sched = RemoteScheduler(sgd(), "null-outbox", url=live_server.url, spec={"schedule": node})
    for _ in range(5):
        sched.step()
    live_server.kill()
    assert sched.report({"val_loss": None, "acc": torch.tensor(math.nan)}) is None  # kept
    buffer = io.BytesIO()
    torch.save({"sched": sched.state_dict()}, buffer)
    sched.close()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)["sched"]
    [(step, kept)] = state["outbox"]
    assert step == 5 and kept["val_loss"] is None and math.isnan(kept["acc"])

    restart_same_port(live_server, server_factory)
    resumed = RemoteScheduler(sgd(), "null-outbox", url=live_server.url)
    resumed.load_state_dict(state)  # sends the kept report
    assert resumed.state_dict()["outbox"] == []
    resumed.close()
    with lrserve.Client(live_server.url) as client:
        assert client.get_metrics("null-outbox", "val_loss")["points"][0]["value"] is None
        assert client.get_metrics("null-outbox", "acc")["points"][0]["value"] == "NaN"


def test_load_state_dict_replays_null_values(live_server: Any) -> None:
    spec = {"schedule": {"type": "ExponentialLR", "gamma": 0.5}}
    with RemoteScheduler(sgd(), "null-replay", url=live_server.url, spec=spec) as sched:
        sched.load_state_dict(
            {"run": "null-replay", "step": 4, "outbox": [[3, {"val_loss": None, "x": 0.5}]]}
        )
        assert sched.last_epoch == 4 and sched.state_dict()["outbox"] == []
    with lrserve.Client(live_server.url) as client:
        points = client.get_metrics("null-replay", "val_loss")["points"]
    assert [(p["step"], p["value"]) for p in points] == [(3, None)]
