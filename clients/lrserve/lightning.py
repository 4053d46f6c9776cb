"""PyTorch Lightning integration: :class:`LRServeCallback` reports validation metrics.

Return a :class:`lrserve.torch.RemoteScheduler` from ``configure_optimizers`` like any torch
scheduler (it is a ``torch.optim.lr_scheduler.LRScheduler``) and add the callback::

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = lrserve.torch.RemoteScheduler(opt, run="exp-42", spec=spec)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = L.Trainer(callbacks=[lrserve.lightning.LRServeCallback(monitor="val_loss")])

After every validation of ``fit`` the callback reports the monitored metrics for the step
the last optimizer step trained with; a decision (a plateau reduction) applies from the
next optimizer step, exactly when Lightning's own ``ReduceLROnPlateau`` would act. Under
DDP every rank reports (the service combines them and answers every rank the same);
checkpoints carry the scheduler's ``state_dict`` like any scheduler's, so
``fit(ckpt_path=...)`` continues the run. See docs/frameworks.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    # (Lightning installed without torch fails on torch: the same extra brings both.)
    if exc.name is None or exc.name.split(".")[0] not in ("lightning", "torch"):
        raise
    raise ModuleNotFoundError(
        "lrserve.lightning needs PyTorch Lightning, which is not installed here: pip install "
        "'lrserve[lightning]'",
        name=exc.name,
    ) from exc

from ._errors import UsageError
from ._frameworks import metric_names, pick_metrics, report_after_step
from ._types import ReportResult
from .torch import RemoteScheduler

__all__ = ["LRServeCallback"]


class LRServeCallback(pl.Callback):
    """Report the monitored metrics to the trainer's :class:`RemoteScheduler` after validation.

    Args:
        monitor: the metric name (or names) in ``trainer.callback_metrics`` to report
            (what ``self.log(...)`` logged); ``None`` reports every numeric one. A monitored
            metric that was not logged is reported as ``None`` ("no value this time"), so
            that every DDP rank still reports the same step.
        scheduler: the scheduler to report to; default: the (one) ``RemoteScheduler`` among
            the trainer's ``lr_scheduler_configs``.
        close_on_teardown: close the trainer's ``RemoteScheduler`` objects when ``fit``
            ends (stops their refreshers and delivers reports kept while offline).
    """

    def __init__(
        self,
        monitor: str | Sequence[str] | None = None,
        scheduler: RemoteScheduler | None = None,
        close_on_teardown: bool = True,
    ) -> None:
        super().__init__()
        self.monitor = metric_names(monitor)
        self.scheduler = scheduler
        self.close_on_teardown = close_on_teardown
        #: The server's answer to the last report (``None`` before any, or when it was kept).
        self.last_result: ReportResult | None = None

    def _schedulers(self, trainer: pl.Trainer) -> list[RemoteScheduler]:
        return [
            c.scheduler
            for c in trainer.lr_scheduler_configs
            if isinstance(c.scheduler, RemoteScheduler)
        ]

    def _target(self, trainer: pl.Trainer) -> RemoteScheduler:
        if self.scheduler is not None:
            return self.scheduler
        found = self._schedulers(trainer)
        if len(found) != 1:
            raise UsageError(
                f"LRServeCallback: the trainer has {len(found)} RemoteScheduler objects in its "
                "lr_scheduler_configs; pass scheduler= to say which one to report to"
            )
        return found[0]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report after a validation run of ``fit`` (not the sanity check, not ``validate()``)."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        sched = self._target(trainer)
        metrics: dict[str, Any] = pick_metrics(trainer.callback_metrics, self.monitor)
        if self.monitor is not None:
            # Every rank must report the same step, or the others wait for it.
            metrics = {name: metrics.get(name) for name in self.monitor}
        if not metrics:
            return
        self.last_result = report_after_step(sched, metrics)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the schedulers at the end of ``fit`` (their refresher threads stop)."""
        if stage != TrainerFn.FITTING.value or not self.close_on_teardown:
            return
        for sched in self._schedulers(trainer):
            sched.close()
