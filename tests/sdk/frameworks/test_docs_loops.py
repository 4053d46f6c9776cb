"""The training loops of README.md and docs/sdk-torch.md, run as written against torch.

Each block is taken from the document, its server URL pointed at a live server, and run with
a real model, real AdamW and a validation loss that stops improving; the rate of each group
at every step must equal torch's own ``SequentialLR`` (backbone) and ``ReduceLROnPlateau``
(head) stepped in torch's order: ``opt.step(); sched.step(); plateau.step(val_loss)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler

from tests.sdk.frameworks.support import assert_rates_equal, reductions
from tests.sdk.torch_support import torch_scheduler

ROOT = Path(__file__).resolve().parents[3]
STEPS = 3501  # evaluations at 0, 1000, 2000, 3000 (README), every 500 (sdk-torch)


def python_block(doc: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in ``doc``."""
    text = doc.read_text()
    start = text.index(heading)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {heading!r} in {doc}"
    return m.group(1)


def stalling_loss() -> Any:
    """Validation losses: improves once, then stays worse than the best (plateau)."""
    values = iter([1.0, 0.9] + [0.95] * 100)
    return lambda: next(values)


def run_block(code: str, url: str) -> tuple[dict[int, list[float]], dict[str, Any], int]:
    code, n = re.subn(r'url="[^"]*"', f'url="{url}"', code)
    assert n == 1, "the block names the server once"
    torch.manual_seed(0)
    backbone, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    rates: dict[int, list[float]] = {}
    ns: dict[str, Any] = {}

    def model(batch: torch.Tensor) -> torch.Tensor:
        # Called once per step, before opt.step(): the rates that step trains with.
        rates[len(rates)] = [float(g["lr"]) for g in ns["opt"].param_groups]
        return head(torch.relu(backbone(batch))).pow(2).mean()

    batch = torch.randn(4, 8)
    ns.update(
        backbone=backbone,
        head=head,
        model=model,
        loader=[batch] * STEPS,
        evaluate=stalling_loss(),
        eval_every=500,
    )
    exec(compile(code, "<doc block>", "exec"), ns)
    sched = ns["sched"]
    assert sched.last_epoch == STEPS
    spec = dict(sched._spec)
    sched.close()
    every = 1000 if "step % 1000" in code else int(ns["eval_every"])
    return rates, spec, every


def torch_loop(spec: dict[str, Any], every: int) -> dict[int, list[float]]:
    """torch's own schedulers for the same spec, in torch's order."""
    plateau_node = spec["group_schedules"]["head"]
    torch.manual_seed(0)
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    body_opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-4}])
    head_opt = torch.optim.AdamW([{"params": [p2], "lr": 1e-3}])
    sched = torch_scheduler(body_opt, spec["schedule"])
    plateau = lr_scheduler.ReduceLROnPlateau(
        head_opt, factor=plateau_node["factor"], patience=plateau_node["patience"]
    )
    evaluate = stalling_loss()
    rates: dict[int, list[float]] = {}
    for step in range(STEPS):
        rates[step] = [float(body_opt.param_groups[0]["lr"]), float(head_opt.param_groups[0]["lr"])]
        body_opt.step()
        head_opt.step()
        sched.step()
        if step % every == 0:
            plateau.step(evaluate())
    return rates


@pytest.mark.parametrize(
    ("doc", "heading"),
    [("README.md", "## In a training loop"), ("docs/sdk-torch.md", "## Quick start")],
    ids=["README", "sdk-torch"],
)
def test_documented_loop_matches_torch_with_a_plateau(
    live_server: Any, doc: str, heading: str
) -> None:
    code = python_block(ROOT / doc, heading)
    rates, spec, every = run_block(code, live_server.url)
    expected = torch_loop(spec, every)
    assert reductions(expected, group=1) >= 2, "the head's plateau must reduce in this run"
    assert_rates_equal(rates, expected, f"{doc} loop vs torch")
