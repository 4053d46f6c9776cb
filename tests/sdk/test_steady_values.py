"""Values that stay the same over a whole window are written at its first step only.

AdamW under a schedule that does not cycle momentum gets a constant ``beta1`` column in every
window; writing it at every step was half of ``step()``'s work. These tests hold the
shortcut to what matters: every step's param groups hold the window's values, also when a
window whose steady values differ is bound while the loop runs, and the values stay torch's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lrserve._window import Window, bind
from lrserve.torch import RemoteScheduler
from torch.optim import lr_scheduler

from tests.sdk.torch_support import WARMUP_COSINE, assert_same, hyper, torch_scheduler


def _groups() -> list[dict[str, Any]]:
    return [
        {"params": [], "lr": 0.0, "betas": (0.0, 0.999), "momentum": 0.0},
        {"params": [], "lr": torch.tensor(0.0, dtype=torch.float64), "betas": (0.0, 0.99)},
    ]


def _columns(n: int) -> dict[str, dict[str, list[float]]]:
    return {
        "a": {"lr": [0.1 * (k + 1) for k in range(n)], "beta1": [0.9] * n, "momentum": [0.5] * n},
        "b": {"lr": [0.25] * n, "beta1": [0.8 - 0.01 * k for k in range(n)]},
    }


def test_steady_columns_are_split_from_the_changing_ones() -> None:
    groups = _groups()
    cols = _columns(4)
    window = Window(10, 4, 1, None, cols)
    bound = bind(window, ["a", "b"], groups)
    assert bound.steady is not None and bound.changing is not None
    changing = [window.series[j] for j in bound.changing]
    assert changing == [("a", "lr"), ("b", "beta1")]
    assert bound.rows.shape == (4, 2)
    assert bound.steady_due
    for i in range(4):
        bound.apply(i)
        assert not bound.steady_due
        assert groups[0]["lr"] == cols["a"]["lr"][i]
        assert groups[0]["betas"] == (0.9, 0.999)
        assert groups[0]["momentum"] == 0.5
        assert groups[1]["lr"].item() == 0.25
        assert groups[1]["betas"] == (cols["b"]["beta1"][i], 0.99)


def test_nothing_is_steady_in_a_one_step_window_or_with_nan() -> None:
    one = bind(Window(0, 1, 1, None, _columns(1)), ["a", "b"], _groups())
    assert one.steady is None and one.changing is None
    nan = {"a": {"lr": [math.nan] * 3}, "b": {"lr": [1.0, 2.0, 3.0]}}
    groups = _groups()
    bound = bind(Window(0, 3, 1, None, nan), ["a", "b"], groups)
    assert bound.steady is None  # NaN is not equal to itself: written every step
    bound.apply(2)
    assert math.isnan(groups[0]["lr"]) and groups[1]["lr"].item() == 3.0


def test_a_window_bound_mid_loop_brings_its_own_steady_values(live_server: Any) -> None:
    """The refresher binds a new window while step() runs on the fast path: the first step
    on it writes the new window's steady values, not only its changing ones."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(
        [{"params": torch.nn.Linear(2, 2).parameters(), "lr": 0.1, "name": "g0"}],
        betas=(0.9, 0.999),
    )
    spec = {"schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0}}
    with RemoteScheduler(
        opt, "steady-rebind", url=live_server.url, spec=spec, window=64, poll_interval=3600
    ) as sched:
        for _ in range(5):
            sched.step()
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
        assert sched._bound is not None and sched._bound.steady is not None
        # What _install does with a newer version of the run (an amendment, say).
        start = sched.last_epoch
        newer = Window(
            start,
            32,
            sched._bound.window.version + 1,
            None,
            {"g0": {"lr": [0.05] * 32, "beta1": [0.7] * 32}},
        )
        sched._install(newer, force=True)
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.05
        assert opt.param_groups[0]["betas"] == (0.7, 0.999)


def test_adamw_betas_and_rates_stay_torchs_across_windows(live_server: Any) -> None:
    """Small windows, so that many are bound (by swap and by fetch) over the loop."""

    def adamw() -> torch.optim.AdamW:
        torch.manual_seed(0)
        return torch.optim.AdamW(
            [
                {"params": torch.nn.Linear(2, 2).parameters(), "lr": 1e-3, "name": "g0"},
                {"params": torch.nn.Linear(2, 2).parameters(), "lr": 1e-2, "name": "g1"},
            ],
            betas=(0.85, 0.98),
        )

    opt, ref_opt = adamw(), adamw()
    ref: lr_scheduler.LRScheduler = torch_scheduler(ref_opt, WARMUP_COSINE)
    with RemoteScheduler(
        opt, "steady-adamw", url=live_server.url, spec={"schedule": WARMUP_COSINE}, window=48
    ) as sched:
        for step in range(1, 400):
            sched.step()
            ref.step()
            assert_same(hyper(opt), hyper(ref_opt), f"step {step}")
            assert opt.param_groups[0]["betas"] == ref_opt.param_groups[0]["betas"]
