"""docs/range-test.md's Lightning and Hugging Face recipes, run: the range test replaces
``Tuner.lr_find`` / a hand-rolled finder, and ``fit`` / ``Trainer.train`` then follow the
adopted run's values exactly (no run conflict: the finder never touches a run's base rate)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import lrserve
import lrserve.torch
import torch
from lrserve.range_test import adopt, range_test
from transformers import Trainer, TrainerCallback, TrainingArguments

from tests.sdk.range_test_script import same_state

STEPS = 24


def _data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return torch.utils.data.TensorDataset(x, x @ torch.randn(6, 1, generator=g))


def _server_lrs(url: str, run: str, n: int) -> list[float]:
    with lrserve.Client(url) as client:
        window = client.get_lr_window(run, 0, n)
    assert window.values is not None
    return [float(v) for v in window.values["group0"]["lr"]]


class Net(L.LightningModule):
    """A LightningModule whose optimizer is scheduled by an existing lrserve run."""

    def __init__(self, url: str, run: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.url, self.run = url, run
        self.seen: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(float(self.trainer.optimizers[0].param_groups[0]["lr"]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        sched = lrserve.torch.RemoteScheduler(opt, run=self.run, url=self.url)  # attach only
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_range_test_then_fit(live_server: Any) -> None:
    url = live_server.url
    module = Net(url, "lt-train")
    loader = torch.utils.data.DataLoader(_data(), batch_size=16)
    before = copy.deepcopy(module.state_dict())
    # Instead of Tuner(trainer).lr_find(module): the module's own training_step, one curve.
    opt = torch.optim.SGD(module.parameters(), lr=1e-6, momentum=0.9)
    found = range_test(
        module,
        opt,
        loader,
        run="lt-rt",
        url=url,
        step_fn=lambda batch: module.training_step(batch, 0),
        end_lr=10.0,
        num_iter=80,
    )
    assert same_state(module.state_dict(), before)  # fit starts from the same weights
    with lrserve.Client(url) as client:
        adopt(client, "lt-rt", "lt-train", total_steps=STEPS)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    trainer.lr_scheduler_configs[0].scheduler.close()  # type: ignore[union-attr]
    assert module.seen == _server_lrs(url, "lt-train", STEPS)
    # OneCycleLR peaks at the suggestion (max_lr), reached inside the run.
    assert max(module.seen) <= found.suggestion("steepest")
    assert max(module.seen) > 0.5 * found.suggestion("steepest")


class HFNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.x, self.y = _data().tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Rates(TrainerCallback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
    ) -> None:
        self.rates.append(float(optimizer.param_groups[0]["lr"]))


def test_hugging_face_range_test_then_train(live_server: Any, tmp_path: Path) -> None:
    url = live_server.url
    model = HFNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Rows(), batch_size=16)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    # The model's own loss, as the Trainer computes it (batches of dicts with labels).
    found = range_test(
        model, opt, loader, run="hf-rt", url=url, step_fn=lambda b: model(**b)["loss"], num_iter=60
    )
    assert same_state(model.state_dict(), before[0]) and same_state(opt.state_dict(), before[1])
    with lrserve.Client(url) as client:
        adopt(client, "hf-rt", "hf-train", rule="valley", total_steps=STEPS)
    sched = lrserve.torch.RemoteScheduler(opt, run="hf-train", url=url)
    rates = Rates()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=16,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=Rows(), optimizers=(opt, sched), callbacks=[rates]
    ).train()
    sched.close()
    assert rates.rates == _server_lrs(url, "hf-train", STEPS)
    assert max(rates.rates) <= found.suggestion("valley")
