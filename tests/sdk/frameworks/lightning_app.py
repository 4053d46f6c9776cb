"""A small LightningModule trained with lrserve's RemoteScheduler or torch's own schedulers.

Used in-process by test_lightning.py and as a script for the DDP test
(``python lightning_app.py CONFIG_JSON``: Lightning's DDP launcher runs this file again for
rank 1). The validation loss is ``support.val_loss(i)`` for the ``i``-th validation, logged
with ``sync_dist=True``, so it is the same on every rank and in every run.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make tests.* and lrserve importable
    sys.path[:0] = [
        str(Path(__file__).resolve().parents[3]),
        str(Path(__file__).resolve().parents[3] / "clients"),
    ]

import lrserve.lightning
import lrserve.torch

from tests.sdk.frameworks.support import val_loss

VAL_EVERY = 4
BATCHES_PER_EPOCH = 8
GAMMA = 0.97
# One group's rate: LinearLR warmup, then ExponentialLR, reduced on plateaus of val_loss.
# torch's equivalent is the three schedulers stepped by Lightning (LinearLR and ExponentialLR
# every step, ReduceLROnPlateau after each validation): a ChainedScheduler with the plateau
# node first (docs/schedules.md, "Plateau in compositions").
SPEC: dict[str, Any] = {
    "schedule": {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "ReduceLROnPlateau", "metric": "val_loss", "factor": 0.5, "patience": 0},
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": 8},
            {"type": "ExponentialLR", "gamma": GAMMA},
        ],
    }
}


class Net(L.LightningModule):
    """Two param groups (different base rates) on a tiny regression."""

    def __init__(self, mode: str, url: str = "", run: str = "", val_offset: float = 0.0) -> None:
        super().__init__()
        self.mode, self.url, self.run = mode, url, run
        self.val_offset = val_offset  # a diverging branch: every validation loss this higher
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)
        self.rates: dict[int, list[float]] = {}
        self.validations = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # The rates this optimizer step trains with, recorded by global step.
        opt = self.optimizers().optimizer  # type: ignore[union-attr]
        self.rates[self.global_step] = [float(g["lr"]) for g in opt.param_groups]
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # Deterministic: the i-th validation of the whole run (global step / VAL_EVERY).
        i = self.global_step // VAL_EVERY
        self.log("val_loss", val_loss(i) + self.val_offset, sync_dist=True, batch_size=1)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            [
                {"params": self.body.parameters(), "lr": 0.1, "name": "body"},
                {"params": self.head.parameters(), "lr": 0.01, "name": "head"},
            ],
            momentum=0.9,
        )
        if self.mode == "lrserve":
            sched = lrserve.torch.RemoteScheduler(
                opt, run=self.run, url=self.url, spec=SPEC, poll_interval=0.2
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        # torch's own schedulers, stepped by Lightning.
        warm = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=8)
        decay = lr_scheduler.ExponentialLR(opt, gamma=GAMMA)
        plateau = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        return [opt], [
            {"scheduler": warm, "interval": "step"},
            {"scheduler": decay, "interval": "step"},
            {
                "scheduler": plateau,
                "interval": "step",
                "frequency": VAL_EVERY,
                "monitor": "val_loss",
            },
        ]


def data() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 4, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def trainer(max_steps: int, root: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        val_check_interval=VAL_EVERY,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
        **kwargs,
    )


def fit(
    mode: str,
    max_steps: int,
    root: Path,
    url: str = "",
    run: str = "",
    ckpt_path: str | None = None,
    save: str | None = None,
    val_offset: float = 0.0,
    **kwargs: Any,
) -> Net:
    """Train to ``max_steps`` (from ``ckpt_path`` if given); the module holds the rates."""
    net = Net(mode, url, run, val_offset)
    cbs = [lrserve.lightning.LRServeCallback(monitor="val_loss")] if mode == "lrserve" else []
    t = trainer(max_steps, root, cbs, **kwargs)
    t.fit(net, train_dataloaders=data(), val_dataloaders=data(), ckpt_path=ckpt_path)
    if save:
        t.save_checkpoint(save)
    return net


def main() -> None:
    """A training process: DDP on ``devices`` CPU processes (default 2, gloo), or one process
    (``devices: 1``, e.g. resuming from ``ckpt_path``). Every rank writes the rates it trained
    with to ``out`` and the warnings it saw to ``out`` + ``.warnings.json``."""
    cfg = json.loads(sys.argv[1])
    devices = int(cfg.get("devices", 2))
    parallel: dict[str, Any] = {"strategy": "ddp", "devices": devices} if devices > 1 else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = fit(
            "lrserve",
            cfg["steps"],
            Path(cfg["root"]),
            url=cfg["url"],
            run=cfg["run"],
            ckpt_path=cfg.get("ckpt_path"),
            val_offset=float(cfg.get("val_offset", 0.0)),
            **parallel,
        )
    out = cfg["out"].replace("{rank}", str(net.global_rank))
    Path(out).write_text(json.dumps(net.rates))
    Path(out + ".warnings.json").write_text(json.dumps([str(w.message) for w in caught]))


if __name__ == "__main__":
    main()
