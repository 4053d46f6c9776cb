"""A tiny model trained by Hugging Face's ``Trainer``: lrserve's scheduler or the Trainer's own.

The evaluation loss is ``support.val_loss(i)`` for the ``i``-th evaluation, computed from a
persistent buffer counting training steps (saved in checkpoints, so a resumed run sees the
same stream).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lrserve.hf
import lrserve.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.sdk.frameworks.support import val_loss

EVAL_EVERY = 4
WARMUP = 4


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(torch.relu(self.body(x)))
        if self.training:
            self.seen += 1
            return {"loss": torch.nn.functional.mse_loss(out, labels)}
        i = int(self.seen) // EVAL_EVERY
        return {"loss": torch.tensor(val_loss(i), dtype=torch.float64) + 0 * out.sum()}


class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.x[i].sum(0, keepdim=True)}


class Rates(TrainerCallback):
    """The rates every optimizer step trains with, by global step."""

    def __init__(self) -> None:
        self.rates: dict[int, list[float]] = {}

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
    ) -> None:
        self.rates[state.global_step] = [float(g["lr"]) for g in optimizer.param_groups]


def optimizer(model: Net) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [
            {"params": model.body.parameters(), "lr": 0.1, "name": "body"},
            {"params": model.head.parameters(), "lr": 0.01, "name": "head"},
        ],
        momentum=0.9,
    )


def train(
    lr_scheduler_type: str,
    max_steps: int,
    out: Path,
    url: str | None = None,
    run: str = "",
    save_steps: int | None = None,
    resume: str | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> Rates:
    """Train to ``max_steps``; with ``url`` on lrserve, else on the Trainer's own scheduler."""
    model = Net()
    opt = optimizer(model)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        lr_scheduler_type=lr_scheduler_type,
        lr_scheduler_kwargs=scheduler_kwargs or {},
        warmup_steps=WARMUP,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    rates = Rates()
    callbacks: list[Any] = [rates]
    sched: Any = None
    if url is not None:
        spec = {"schedule": lrserve.hf.spec_from_args(args, max_steps)}
        sched = lrserve.torch.RemoteScheduler(opt, run=run, url=url, spec=spec, poll_interval=0.2)
        callbacks.append(lrserve.hf.LRServeCallback())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Data(4 * 8),
        eval_dataset=Data(4),
        optimizers=(opt, sched),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    if sched is not None:
        sched.close()
    return rates
