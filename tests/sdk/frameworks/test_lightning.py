"""Lightning: RemoteScheduler taken as a torch LRScheduler, LRServeCallback, DDP, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sdk.frameworks import lightning_app as app
from tests.sdk.frameworks.support import (
    assert_rates_equal,
    reductions,
    reported_steps,
    server_lrs,
)
from tests.sdk.torch_support import sdk_env

STEPS = 32


@pytest.fixture(scope="module")
def torch_rates(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[float]]:
    """The oracle: the same training with torch's own schedulers, stepped by Lightning."""
    net = app.fit("torch", STEPS, tmp_path_factory.mktemp("torch"))
    assert reductions(net.rates) >= 2, "the oracle run must contain plateau reductions"
    return net.rates


def test_fit_matches_lightnings_own_schedulers_and_the_server(
    live_server: Any, tmp_path: Path, torch_rates: dict[int, list[float]]
) -> None:
    net = app.fit("lrserve", STEPS, tmp_path, url=live_server.url, run="lt-fit")
    assert_rates_equal(net.rates, torch_rates, "lrserve vs torch under Lightning")
    server = server_lrs(live_server.url, "lt-fit", STEPS)
    assert_rates_equal(net.rates, server, "applied vs the server's record")
    # One report per validation, for the step the last optimizer step trained with.
    expected = [s - 1 for s in range(app.VAL_EVERY, STEPS + 1, app.VAL_EVERY)]
    assert reported_steps(live_server.url, "lt-fit") == expected


def test_resume_with_ckpt_path_continues_exactly(
    live_server: Any, tmp_path: Path, torch_rates: dict[int, list[float]]
) -> None:
    ckpt = str(tmp_path / "half.ckpt")
    first = app.fit("lrserve", STEPS // 2, tmp_path, url=live_server.url, run="lt-res", save=ckpt)
    # A new process would do exactly this: a fresh module and trainer, fit(ckpt_path=...).
    second = app.fit("lrserve", STEPS, tmp_path, url=live_server.url, run="lt-res", ckpt_path=ckpt)
    assert sorted(first.rates) == list(range(STEPS // 2))
    assert sorted(second.rates) == list(range(STEPS // 2, STEPS))
    assert_rates_equal({**first.rates, **second.rates}, torch_rates, "resumed vs torch")
    assert_rates_equal(
        second.rates,
        {s: r for s, r in server_lrs(live_server.url, "lt-res", STEPS).items() if s >= STEPS // 2},
        "resumed vs server",
    )


def test_resume_from_an_older_checkpoint_forgets_the_abandoned_steps(
    live_server: Any, tmp_path: Path, torch_rates: dict[int, list[float]]
) -> None:
    """fit(ckpt_path=...) in a new process from a checkpoint older than the run: one rewind,
    no 409 warnings, rates as if the abandoned steps never happened."""
    ckpt = str(tmp_path / "half.ckpt")
    url, run = live_server.url, "lt-old"
    first = app.fit("lrserve", STEPS // 2, tmp_path, url=url, run=run, save=ckpt)
    # The job goes on and diverges (validation losses 10 higher): that branch is abandoned.
    app.fit("lrserve", STEPS, tmp_path, url=url, run=run, ckpt_path=ckpt, val_offset=10.0)
    out = tmp_path / "again.json"
    cfg = {"url": url, "run": run, "steps": STEPS, "root": str(tmp_path), "out": str(out),
           "devices": 1, "ckpt_path": ckpt}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(Path(app.__file__)), json.dumps(cfg)],
        env=sdk_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    again = {int(k): v for k, v in json.loads(out.read_text()).items()}
    messages = json.loads((tmp_path / "again.json.warnings.json").read_text())
    assert not [m for m in messages if "ignored" in m or "409" in m], messages
    assert len([m for m in messages if f"rewound to step {STEPS // 2}" in m]) == 1, messages
    assert sorted(again) == list(range(STEPS // 2, STEPS))
    assert_rates_equal({**first.rates, **again}, torch_rates, "resumed vs torch")
    assert_rates_equal(
        again,
        {s: r for s, r in server_lrs(url, run, STEPS).items() if s >= STEPS // 2},
        "resumed vs server",
    )


@pytest.mark.slow
def test_ddp_two_cpu_processes_apply_identical_rates(
    live_server: Any, tmp_path: Path, torch_rates: dict[int, list[float]]
) -> None:
    cfg = {
        "url": live_server.url,
        "run": "lt-ddp",
        "steps": STEPS,
        "root": str(tmp_path),
        "out": str(tmp_path / "rank{rank}.json"),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(app.__file__)), json.dumps(cfg)],
        env=sdk_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [
        {int(k): v for k, v in json.loads((tmp_path / f"rank{r}.json").read_text()).items()}
        for r in range(2)
    ]
    assert sorted(ranks[0]) == list(range(STEPS))
    assert ranks[0] == ranks[1], "ranks applied different rates"
    assert_rates_equal(ranks[0], torch_rates, "DDP vs torch")
    assert_rates_equal(ranks[0], server_lrs(live_server.url, "lt-ddp", STEPS), "DDP vs server")
