"""lrserve.torch.RemoteScheduler against a live server, with torch's schedulers as the oracle."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import httpx
import lrserve
import numpy as np
import pytest
import torch
from lrserve.torch import RemoteScheduler, groups_from_optimizer
from torch.optim import lr_scheduler

from tests.sdk.torch_support import WARMUP_COSINE, assert_same, hyper, sgd, torch_scheduler


def test_values_equal_torch_over_thousands_of_steps(live_server: Any) -> None:
    opt, ref_opt = sgd(), sgd()
    ref = torch_scheduler(ref_opt, WARMUP_COSINE)
    # A small window forces dozens of refreshes (background and, when the loop outruns
    # the refresher, on the step path) over the 3000 steps.
    with RemoteScheduler(
        opt, "warmup-cosine", url=live_server.url, spec={"schedule": WARMUP_COSINE}, window=256
    ) as sched:
        for step in range(3000):
            assert sched.last_epoch == step
            assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
            ref_opt.step()
            ref.step()
            sched.step()
        assert_same(hyper(opt), hyper(ref_opt), "step 3000")
        assert sched.version is not None and not sched.holding


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_one_cycle_cycles_momentum_and_beta1(live_server: Any, optim: str) -> None:
    node = {"type": "OneCycleLR", "max_lr": [0.5, 0.05], "total_steps": 400, "pct_start": 0.25}

    def make() -> torch.optim.Optimizer:
        a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        groups = [{"params": a.parameters(), "lr": 0.1}, {"params": b.parameters(), "lr": 0.01}]
        if optim == "sgd":
            return torch.optim.SGD(groups, momentum=0.9)
        return torch.optim.Adam(groups, betas=(0.9, 0.99))

    opt, ref_opt = make(), make()
    spec_groups = groups_from_optimizer(opt)  # before torch's constructor writes into ref_opt
    ref = torch_scheduler(ref_opt, node)
    with RemoteScheduler(
        opt,
        f"onecycle-{optim}",
        url=live_server.url,
        spec={"groups": spec_groups, "schedule": node},
    ) as sched:
        for step in range(399):
            assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            if optim == "adam":
                assert opt.param_groups[0]["betas"][1] == 0.99
            ref_opt.step()
            ref.step()
            sched.step()


def test_plateau_report_applies_from_the_next_step(live_server: Any) -> None:
    node = {"type": "ReduceLROnPlateau", "metric": "val_loss", "factor": 0.5, "patience": 1}
    opt, ref_opt = sgd(), sgd()
    ref = lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.5, patience=1)
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9]
    with RemoteScheduler(opt, "plateau", url=live_server.url, spec={"schedule": node}) as sched:
        reduced_at = []
        for step in range(1, 101):
            sched.step()
            assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            if step % 10 == 0:
                before = hyper(opt)
                res = sched.report({"val_loss": losses[step // 10 - 1]})
                assert res is not None and res["applies_from"] == step + 1
                # The decision is for the next step: the current values do not move.
                assert hyper(opt) == before
                ref.step(losses[step // 10 - 1])
                if res["decision"] and res["decision"].get("reduced"):
                    reduced_at.append(step)
        assert reduced_at, "the scripted losses must reduce at least once"
        assert hyper(opt)[0][0] < 0.1


def test_attach_to_an_existing_run_and_idempotent_create(live_server: Any) -> None:
    spec = {"schedule": {"type": "StepLR", "step_size": 3, "gamma": 0.5}}
    first = RemoteScheduler(sgd(), "attach", url=live_server.url, spec=spec)
    first.close()
    # Same spec again: fine (200); no spec: attach; both see the same values.
    again = RemoteScheduler(sgd(), "attach", url=live_server.url, spec=spec)
    attached_opt = sgd()
    attached = RemoteScheduler(attached_opt, "attach", url=live_server.url)
    for _ in range(7):
        again.step()
        attached.step()
    assert attached.get_last_lr() == again.get_last_lr() == [0.1 * 0.25, 0.01 * 0.25]
    again.close()
    attached.close()
    with pytest.raises(lrserve.RunConflictError):
        RemoteScheduler(
            sgd(),
            "attach",
            url=live_server.url,
            spec={"schedule": {"type": "ExponentialLR", "gamma": 0.9}},
        )
    with pytest.raises(lrserve.RunNotFoundError):
        RemoteScheduler(sgd(), "no-such-run", url=live_server.url)
    with pytest.raises(lrserve.UsageError, match="param groups"):
        RemoteScheduler(sgd([0.1, 0.2, 0.3]), "attach", url=live_server.url)


def test_override_arrives_through_etag_revalidation(live_server: Any) -> None:
    opt = sgd()
    spec = {"schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}}
    with RemoteScheduler(
        opt, "override", url=live_server.url, spec=spec, poll_interval=0.05, window=64
    ) as sched:
        version = sched.version
        with lrserve.Client(live_server.url) as client:
            # Step 50 is in the window the scheduler holds: refused, with the first step
            # every trainer is guaranteed to apply it from (with some headroom).
            with pytest.raises(lrserve.TooLateError) as late:
                client.override("override", from_step=50, action="scale", value=0.5)
            first = late.value.earliest_step
            assert first is not None and first >= 64
            client.override("override", from_step=first, action="scale", value=0.5)
        for _ in range(200):
            if sched.version != version:
                break
            threading.Event().wait(0.05)
        assert sched.version is not None and version is not None and sched.version > version
        for _ in range(first - 1):
            sched.step()
        assert sched.get_last_lr() == [0.1, 0.01]
        sched.step()
        assert sched.get_last_lr() == [0.05, 0.005]


class _CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that records which thread sent each request."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.threads.append(threading.get_ident())
        return super().handle_request(request)


def test_no_network_on_the_step_path(live_server: Any) -> None:
    transport = _CountingTransport()
    client = lrserve.Client(live_server.url, transport=transport)
    opt = sgd()
    sched = RemoteScheduler(
        opt,
        "quiet",
        client=client,
        spec={"schedule": WARMUP_COSINE},
        window=2000,
        poll_interval=0.01,
    )
    main = threading.get_ident()
    sent_before = sum(1 for t in transport.threads if t == main)
    for _ in range(300):  # stays inside the first half of the window
        sched.step()
        time.sleep(0.001)  # a training step's worth of time for the refresher to run
    assert sum(1 for t in transport.threads if t == main) == sent_before
    sched.close()
    assert sched._thread is not None and not sched._thread.is_alive()
    assert len(transport.threads) > sent_before  # the refresher did revalidate meanwhile
    client.close()


def test_param_groups_replaced_by_optimizer_load_state_dict(live_server: Any) -> None:
    opt, ref_opt = sgd(), sgd()
    ref = torch_scheduler(ref_opt, WARMUP_COSINE)
    with RemoteScheduler(
        opt, "reload", url=live_server.url, spec={"schedule": WARMUP_COSINE}
    ) as sched:
        for _ in range(10):
            sched.step()
            ref_opt.step()
            ref.step()
        opt.load_state_dict(opt.state_dict())  # new param group dicts
        for _ in range(10):
            sched.step()
            ref_opt.step()
            ref.step()
        assert_same(hyper(opt), hyper(ref_opt), "after reload")


def test_scheduled_weight_decay_is_applied(live_server: Any) -> None:
    wd_node = {"type": "CosineAnnealingLR", "T_max": 100, "eta_min": 0.001}

    def adamw() -> torch.optim.AdamW:
        a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        return torch.optim.AdamW(
            [
                {"params": a.parameters(), "lr": 1e-3, "weight_decay": 0.1},
                {"params": b.parameters(), "lr": 1e-2},
            ]
        )

    opt = adamw()
    spec = {"schedule": WARMUP_COSINE, "param_schedules": {"weight_decay": wd_node}}
    # The oracle for weight decay: torch's scheduler on a stand-in whose "lr" is the decay.
    wd_ref_opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": g["weight_decay"]}
            for g in opt.param_groups
        ]
    )
    wd_ref = torch_scheduler(wd_ref_opt, wd_node)
    with RemoteScheduler(opt, "weight-decay", url=live_server.url, spec=spec) as sched:
        for step in range(150):
            expected = [float(g["lr"]) for g in wd_ref_opt.param_groups]
            actual = [g["weight_decay"] for g in opt.param_groups]
            assert actual == pytest.approx(expected, rel=1e-12), f"step {step}"
            wd_ref_opt.step()
            wd_ref.step()
            sched.step()


def test_report_accepts_none_numpy_scalars_and_one_element_tensors(live_server: Any) -> None:
    """None is "no value" (null on the wire); numpy scalars and tensors are read as numbers."""
    node = {"type": "ReduceLROnPlateau", "metric": "val_loss", "factor": 0.5, "patience": 0}
    with RemoteScheduler(
        sgd(), "report-values", url=live_server.url, spec={"schedule": node}
    ) as sched:
        sched.step()
        res = sched.report({"val_loss": None})  # no value this time: the plateau skips it
        assert res is not None and res["decision"]["reduced"] is False
        sched.step()
        values = {
            "val_loss": torch.tensor(0.5, requires_grad=True) * 1.0,
            "np32": np.float32(0.25),
            "np64": np.float64(-1.5),
            "t1": torch.tensor([0.125], dtype=torch.float64),
            "nan": torch.tensor(math.nan),
            "inf": np.float64(math.inf),
            "none": None,
        }
        assert sched.report(values) is not None
        sched.step()
        assert sched.report({"val_loss": np.float64(0.75)}) is not None  # worse: reduced
        sched.step()
        assert sched.get_last_lr() == [0.05, 0.005]
    with lrserve.Client(live_server.url) as client:

        def stored(name: str) -> list[tuple[int, Any]]:
            return [
                (p["step"], p["value"]) for p in client.get_metrics("report-values", name)["points"]
            ]

        assert stored("val_loss") == [(1, None), (2, 0.5), (3, 0.75)]
        assert stored("np32") == [(2, 0.25)] and stored("np64") == [(2, -1.5)]
        assert stored("t1") == [(2, 0.125)] and stored("none") == [(2, None)]
        assert stored("nan") == [(2, "NaN")] and stored("inf") == [(2, "Infinity")]


def test_report_of_a_non_number_raises_naming_the_metric(live_server: Any) -> None:
    bad_values = [
        "0.5",
        "high",
        True,
        object(),
        [0.5],
        torch.tensor([0.5, 0.6]),
        np.array([1.0, 2.0]),
        1j,
    ]
    with RemoteScheduler(
        sgd(), "report-bad", url=live_server.url, spec={"schedule": WARMUP_COSINE}
    ) as sched:
        sched.step()
        for bad in bad_values:
            with pytest.raises(ValueError, match="metric 'val_loss'"):
                sched.report({"ok": 1.0, "val_loss": bad})
        # Nothing was sent or kept, and the scheduler carries on.
        assert sched.state_dict()["outbox"] == []
        assert sched.report({"ok": 2.0}) is not None
    with lrserve.Client(live_server.url) as client:
        assert [p["value"] for p in client.get_metrics("report-bad", "ok")["points"]] == [2.0]


def test_a_run_deleted_and_created_again_is_not_taken_for_the_old_one(live_server: Any) -> None:
    """Versions restart at 1 for a new run under the same id: the ETag tells them apart."""
    opt = sgd()
    spec = {"schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}}
    with RemoteScheduler(
        opt, "reborn", url=live_server.url, spec=spec, poll_interval=0.05, window=64
    ) as sched:
        with lrserve.Client(live_server.url) as client:
            for step in range(3):
                client.report("reborn", step, {"loss": 1.0})
            # Reports change no value (the values version stays); overrides do: the old run's
            # windows reach version 4.
            for _ in range(3):
                client.override("reborn", from_step=10**6, action="scale", value=1.0)
            for _ in range(200):  # ... and the scheduler holds it
                if sched.version == 4:
                    break
                threading.Event().wait(0.05)
            assert sched.version == 4
            client.delete_run("reborn")
            groups = [
                {"name": "g0", "lr": 0.3, "momentum": 0.9},
                {"name": "g1", "lr": 0.03, "momentum": 0.9},
            ]
            client.create_run("reborn", {**spec, "groups": groups})
        for _ in range(200):
            threading.Event().wait(0.05)
            if sched.version == 1:
                break
        sched.step()
        assert sched.get_last_lr() == [0.3, 0.03]
