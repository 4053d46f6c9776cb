"""A custom accelerate loop, run by ``accelerate launch`` on CPU processes (see test_accelerate).

``python -m accelerate.commands.launch --cpu --num_processes 2 accelerate_app.py CONFIG_JSON``.
Phases: ``first`` trains the torch oracle (torch's own schedulers, prepared the same way) to
``steps`` and the lrserve run to ``steps // 2``, then ``save_state``; ``resume`` builds
everything anew, ``load_state`` and trains the lrserve run on to ``steps``. Every rank writes
the rates each optimizer step trained with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make tests.* and lrserve importable
    _root = Path(__file__).resolve().parents[3]
    sys.path[:0] = [str(_root), str(_root / "clients")]

import lrserve.torch

from tests.sdk.frameworks.support import val_loss
from tests.sdk.torch_support import torch_scheduler

REPORT_EVERY = 4
SCHEDULE: dict[str, Any] = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 8},
        {"type": "CosineAnnealingLR", "T_max": 56, "eta_min": 1e-4},
    ],
    "milestones": [8],
}


def build(acc: Accelerator, cfg: dict[str, Any], mode: str) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1, "name": "body"},
            {"params": model[2].parameters(), "lr": 0.01, "name": "head"},
        ],
        momentum=0.9,
    )
    remote = None
    if mode == "lrserve":
        remote = lrserve.torch.RemoteScheduler(
            opt, run=cfg["run"], url=cfg["url"], spec={"schedule": SCHEDULE}, poll_interval=0.2
        )
        sched: Any = remote
    else:
        sched = torch_scheduler(opt, SCHEDULE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    return model, opt, sched, loader, remote


def train(
    acc: Accelerator, parts: tuple[Any, ...], start: int, stop: int
) -> dict[int, list[float]]:
    model, opt, sched, loader, remote = parts
    rates: dict[int, list[float]] = {}
    batches = iter(loader)
    for step in range(start, stop):
        x, y = next(batches)
        rates[step] = [float(g["lr"]) for g in opt.param_groups]
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if remote is not None and (step + 1) % REPORT_EVERY == 0:
            # Before sched.step(), as in a plain torch loop (the wrapper has no report()).
            remote.report({"val_loss": val_loss(step // REPORT_EVERY)})
        sched.step()
    return rates


def main() -> None:
    cfg = json.loads(sys.argv[1])
    acc = Accelerator(cpu=True)
    steps, out = cfg["steps"], {}
    if cfg["phase"] == "first":
        out["torch"] = train(acc, build(acc, cfg, "torch"), 0, steps)
        acc.free_memory()  # forget the oracle's objects: save_state holds only the next ones
        parts = build(acc, cfg, "lrserve")
        out["lrserve"] = train(acc, parts, 0, steps // 2)
        acc.save_state(cfg["state"])
    else:
        parts = build(acc, cfg, "lrserve")
        acc.load_state(cfg["state"])
        out["lrserve"] = train(acc, parts, steps // 2, steps)
    out["prepared"] = type(parts[2]).__name__
    if parts[4] is not None:
        parts[4].close()
    Path(cfg["out"].replace("{rank}", str(acc.process_index))).write_text(json.dumps(out))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
