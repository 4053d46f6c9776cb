"""Hugging Face ``Trainer`` integration: :class:`LRServeCallback` and schedule specs.

Give the ``Trainer`` a :class:`lrserve.torch.RemoteScheduler` and the callback::

    spec = {"schedule": lrserve.hf.schedule_spec("cosine", num_warmup_steps=100,
                                                 num_training_steps=10_000)}
    sched = lrserve.torch.RemoteScheduler(opt, run="exp-42", spec=spec)
    trainer = Trainer(model, args, optimizers=(opt, sched),
                      callbacks=[lrserve.hf.LRServeCallback()])

After every evaluation the callback reports the evaluation metrics (``eval_loss``, ...) for
the step the last optimizer step trained with; a decision applies from the next optimizer
step, as the ``Trainer``'s own ``reduce_lr_on_plateau`` does. ``Trainer`` checkpoints save
the scheduler's ``state_dict`` (``scheduler.pt``) and ``resume_from_checkpoint`` loads it
after the optimizer, so a resumed run continues exactly. See docs/frameworks.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    # (transformers' optimization module imports torch: the same extra brings it.)
    if exc.name is None or exc.name.split(".")[0] not in ("transformers", "accelerate", "torch"):
        raise
    raise ModuleNotFoundError(
        "lrserve.hf needs Hugging Face transformers (and accelerate for its Trainer), which "
        "is not installed here: pip install 'lrserve[hf]'",
        name=exc.name,
    ) from exc

from ._errors import UsageError
from ._frameworks import metric_names, pick_metrics, report_after_step
from ._types import ReportResult
from .torch import RemoteScheduler

__all__ = ["LRServeCallback", "schedule_spec", "spec_from_args"]

# Evaluation "metrics" that are timings, not measurements of the model.
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second")


def schedule_spec(
    lr_scheduler_type: str | SchedulerType,
    num_warmup_steps: int = 0,
    num_training_steps: int | None = None,
    metric: str = "eval_loss",
    **scheduler_specific_kwargs: Any,
) -> dict[str, Any]:
    """The lrserve schedule node for one of ``Trainer``'s ``lr_scheduler_type`` names.

    Mirrors ``transformers.get_scheduler``: the same function (the node's ``type`` is
    ``transformers.<function name>``), given the same arguments it would pass
    (``num_warmup_steps`` and ``num_training_steps`` where the function takes them, and
    ``scheduler_specific_kwargs``, which is ``TrainingArguments.lr_scheduler_kwargs``).
    ``"reduce_lr_on_plateau"`` becomes a ``ReduceLROnPlateau`` node on ``metric``
    (the ``Trainer`` steps it with ``eval_<metric_for_best_model>``, default ``eval_loss``).

    >>> schedule_spec("cosine", num_warmup_steps=10, num_training_steps=100)["type"]
    'transformers.get_cosine_schedule_with_warmup'
    """
    try:
        name = SchedulerType(lr_scheduler_type)
    except ValueError as exc:
        raise UsageError(f"unknown lr_scheduler_type {lr_scheduler_type!r}") from exc
    kwargs = dict(scheduler_specific_kwargs)
    if name == SchedulerType.REDUCE_ON_PLATEAU:
        return {"type": "ReduceLROnPlateau", "metric": metric, **kwargs}
    if name == SchedulerType.GREEDY:
        raise UsageError("lr_scheduler_type 'greedy' has no lrserve equivalent")
    func = TYPE_TO_SCHEDULER_FUNCTION[name]
    params = inspect.signature(func).parameters  # type: ignore[arg-type]
    node: dict[str, Any] = {"type": f"transformers.{func.__name__}"}
    if name == SchedulerType.CONSTANT:
        return node  # get_scheduler passes nothing else to it
    if "num_warmup_steps" in params:
        node["num_warmup_steps"] = int(num_warmup_steps)
    if "num_training_steps" in params and num_training_steps is not None:
        node["num_training_steps"] = int(num_training_steps)
    return {**node, **kwargs}


def spec_from_args(args: TrainingArguments, num_training_steps: int) -> dict[str, Any]:
    """The schedule node of ``args`` (``lr_scheduler_type``, warmup, ``lr_scheduler_kwargs``)."""
    metric = args.metric_for_best_model or "loss"
    if not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    return schedule_spec(
        args.lr_scheduler_type,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        metric=metric,
        **dict(args.lr_scheduler_kwargs or {}),  # type: ignore[arg-type]
    )


class LRServeCallback(TrainerCallback):
    """Report evaluation metrics to the ``Trainer``'s :class:`RemoteScheduler`.

    Args:
        monitor: the metric name(s) to report, with or without the ``eval_`` prefix
            (reported under the name given); ``None`` reports every numeric evaluation
            metric except timings (``eval_runtime``, ``..._per_second``) and ``epoch``.
        scheduler: the scheduler to report to; default: the trainer's ``lr_scheduler``.
    """

    def __init__(
        self, monitor: str | Sequence[str] | None = None, scheduler: RemoteScheduler | None = None
    ) -> None:
        self.monitor = metric_names(monitor)
        self.scheduler = scheduler
        #: The server's answer to the last report (``None`` before any, or when it was kept).
        self.last_result: ReportResult | None = None

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Report after each evaluation during training (not a stand-alone ``evaluate()``)."""
        sched = self.scheduler or getattr(lr_scheduler, "scheduler", lr_scheduler)
        if not isinstance(sched, RemoteScheduler):
            raise UsageError(
                "lrserve.hf.LRServeCallback: the Trainer's lr_scheduler is "
                f"{type(sched).__name__}, not a RemoteScheduler: pass "
                "optimizers=(opt, RemoteScheduler(opt, ...)) or scheduler="
            )
        if not metrics:
            return
        found = pick_metrics(metrics, self.monitor, prefix="eval_")
        picked: dict[str, float | None]
        if self.monitor is None:
            picked = {
                k: v for k, v in found.items() if k != "epoch" and not k.endswith(_NOT_METRICS)
            }
        else:
            # Every rank must report the same step, or the others wait for it.
            picked = {name: found.get(name) for name in self.monitor}
        if picked:
            self.last_result = report_after_step(sched, picked)
