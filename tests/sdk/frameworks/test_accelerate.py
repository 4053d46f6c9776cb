"""accelerate: prepare() wraps RemoteScheduler, save_state/load_state carry it (2 CPU processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sdk.frameworks import accelerate_app as app
from tests.sdk.frameworks.support import assert_rates_equal, reported_steps, server_lrs
from tests.sdk.torch_support import sdk_env

STEPS = 32
WORLD = 2


def launch(cfg: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    # `python -m accelerate.commands.launch` is `accelerate launch` (the console script
    # imports timm when it is installed, which fails here without torchvision). `--cpu` with
    # several processes starts only one here (its simple launcher); `--multi_gpu` is the
    # torchrun-based launcher, and the script's Accelerator(cpu=True) makes it MULTI_CPU (gloo).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(WORLD),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(Path(app.__file__)),
            json.dumps(cfg),
        ],
        env=sdk_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = []
    for r in range(WORLD):
        raw = json.loads((tmp_path / f"{cfg['phase']}{r}.json").read_text())
        out.append(
            {
                k: {int(s): v for s, v in d.items()} if isinstance(d, dict) else d
                for k, d in raw.items()
            }
        )
    return out


@pytest.mark.slow
def test_save_state_and_load_state_carry_the_scheduler(live_server: Any, tmp_path: Path) -> None:
    cfg = {
        "url": live_server.url,
        "run": "acc",
        "steps": STEPS,
        "state": str(tmp_path / "state"),
    }
    first = launch({**cfg, "phase": "first", "out": str(tmp_path / "first{rank}.json")}, tmp_path)
    assert first[0]["prepared"] == "AcceleratedScheduler", "prepare() must wrap the scheduler"
    assert (tmp_path / "state" / "scheduler.bin").exists(), "save_state must save the scheduler"
    second = launch(
        {**cfg, "phase": "resume", "out": str(tmp_path / "resume{rank}.json")}, tmp_path
    )
    oracle = first[0]["torch"]
    assert first[1]["torch"] == oracle
    for r in range(WORLD):
        applied = {**first[r]["lrserve"], **second[r]["lrserve"]}
        assert sorted(applied) == list(range(STEPS))
        assert applied == {**first[0]["lrserve"], **second[0]["lrserve"]}, f"rank {r} differs"
        assert_rates_equal(applied, oracle, f"rank {r}: lrserve under accelerate vs torch's")
    # accelerate steps a prepared scheduler once per process per optimizer step (it counts
    # samples, not steps, when batches are not split): step k trained with schedule step 2k.
    server = server_lrs(live_server.url, "acc", WORLD * STEPS)
    assert_rates_equal(
        {s: server[WORLD * s] for s in range(STEPS)}, applied, "applied vs the server's record"
    )
    # Reports every 4 optimizer steps, for the schedule step the loop was at.
    expected = [WORLD * (k - 1) for k in range(app.REPORT_EVERY, STEPS + 1, app.REPORT_EVERY)]
    assert reported_steps(live_server.url, "acc") == expected
