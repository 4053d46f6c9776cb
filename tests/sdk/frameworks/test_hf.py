"""Hugging Face Trainer: RemoteScheduler + LRServeCallback against the Trainer's own schedulers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.sdk.frameworks import hf_app as app
from tests.sdk.frameworks.support import (
    assert_rates_equal,
    reductions,
    reported_steps,
    server_lrs,
)

STEPS = 32

CASES = {
    "cosine": {},
    "warmup_stable_decay": {"num_decay_steps": 10, "min_lr_ratio": 0.1},
    "reduce_lr_on_plateau": {"factor": 0.5, "patience": 0},
}


@pytest.mark.parametrize("kind", list(CASES))
def test_trainer_rates_equal_the_trainers_own_scheduler(
    live_server: Any, tmp_path: Path, kind: str
) -> None:
    own = app.train(kind, STEPS, tmp_path / "own", scheduler_kwargs=CASES[kind]).rates
    if kind == "reduce_lr_on_plateau":
        assert reductions(own) >= 2, "the Trainer's own plateau must reduce in this run"
    got = app.train(
        kind,
        STEPS,
        tmp_path / "lrs",
        url=live_server.url,
        run=f"hf-{kind}",
        scheduler_kwargs=CASES[kind],
    ).rates
    assert_rates_equal(got, own, f"lrserve vs Trainer's {kind}")
    assert_rates_equal(got, server_lrs(live_server.url, f"hf-{kind}", STEPS), "vs server")
    expected = [s - 1 for s in range(app.EVAL_EVERY, STEPS + 1, app.EVAL_EVERY)]
    assert reported_steps(live_server.url, f"hf-{kind}") == expected


def test_resume_from_checkpoint_continues_exactly(live_server: Any, tmp_path: Path) -> None:
    kind, kw = "reduce_lr_on_plateau", CASES["reduce_lr_on_plateau"]
    own = app.train(kind, STEPS, tmp_path / "own", scheduler_kwargs=kw).rates
    out = tmp_path / "lrs"
    first = app.train(
        kind,
        STEPS // 2,
        out,
        url=live_server.url,
        run="hf-res",
        save_steps=STEPS // 2,
        scheduler_kwargs=kw,
    ).rates
    ckpt = out / f"checkpoint-{STEPS // 2}"
    assert (ckpt / "scheduler.pt").exists()
    second = app.train(
        kind,
        STEPS,
        out,
        url=live_server.url,
        run="hf-res",
        resume=str(ckpt),
        scheduler_kwargs=kw,
    ).rates
    assert sorted(second) == list(range(STEPS // 2, STEPS))
    assert_rates_equal({**first, **second}, own, "resumed vs the Trainer's own")
