"""examples/train_two_groups.py runs against a live server and its rates are the served ones."""

from __future__ import annotations

import json
from typing import Any

import lrserve
import pytest

from tests.sdk.torch_support import ROOT, run_python


@pytest.mark.slow
def test_two_group_example_trains_against_a_live_server(live_server: Any) -> None:
    proc = run_python(
        ROOT / "examples" / "train_two_groups.py",
        "--url",
        live_server.url,
        "--run",
        "example",
        "--steps",
        "400",
        "--eval-every",
        "20",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 400
    backbone, head = summary["final_lr"]
    with lrserve.Client(live_server.url) as client:
        served = client.get_lr("example", step=400)["groups"]
        mid = client.get_lr("example", step=200)["groups"]
        events = client.get_events("example")["events"]
    assert backbone == served["backbone"]["lr"] and head == served["head"]["lr"]
    assert mid["head"]["lr"] > mid["backbone"]["lr"]  # different rates (both end at eta_min)
    assert summary["reductions"] >= 1, proc.stdout
    assert any(e["type"] == "reduced" for e in events)
