"""The LR range test, run by the service: one curve, one stop step, one suggestion for all ranks.

>>> from lrserve.range_test import range_test, adopt                     # doctest: +SKIP
>>> found = range_test(model, opt, loader, run="rt-42", criterion=loss_fn) # doctest: +SKIP
>>> found.suggestions                                                     # doctest: +SKIP
{'steepest': 0.0123, 'valley': 0.0051, 'minimum': 0.031}
>>> adopt(client, "rt-42", "exp-42", total_steps=10_000)                  # doctest: +SKIP

:func:`range_test` creates (idempotently) a run whose schedule is an ``LRRangeTest`` node,
drives the model with a :class:`lrserve.torch.RemoteScheduler` on it, reports the loss every
step, stops when the service says ``stop`` (the smoothed loss diverged, or the last step), then
puts the model and the optimizer back as they were (torch-lr-finder's ``reset()``) and returns
the server's curve and suggestions. In a data-parallel job every rank calls it: every rank
reports its own loss and the service aggregates them (or, with ``chief=True``, rank 0 reports
the ranks' combined loss), so every rank trains with the same rate at every step and stops at
the same step. :func:`adopt` creates the real run from a suggestion in one call.

Only :func:`range_test` needs torch (imported when it is called); :func:`suggested_rates`,
:func:`adopted_spec` and :func:`adopt` work with the core SDK alone (the command line uses them).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._client import Client
from ._errors import LRServeError, UsageError
from ._types import CreateRunResult, RangeTestResult

if TYPE_CHECKING:  # pragma: no cover - typing only; torch is imported when range_test runs
    import torch

__all__ = [
    "RULES",
    "RangeTestOutcome",
    "adopt",
    "adopted_spec",
    "range_test",
    "range_test_spec",
    "suggested_rates",
]

Rule = Literal["steepest", "valley", "minimum"]
RULES: tuple[Rule, ...] = ("steepest", "valley", "minimum")


@dataclass(frozen=True)
class RangeTestOutcome:
    """What :func:`range_test` returns: the server's curve and its suggestions."""

    run: str
    curve: RangeTestResult
    """The ``GET /v1/runs/{id}/range-test`` answer (steps, lr, loss, smoothed, ...)."""
    iterations: int
    """Steps this process trained before the service said stop."""

    @property
    def suggestions(self) -> dict[str, float | None]:
        s = self.curve["suggestions"]
        return {"steepest": s["steepest"], "valley": s["valley"], "minimum": s["minimum"]}

    @property
    def stopped_at(self) -> int | None:
        return self.curve["stopped_at"]

    def suggestion(self, rule: Rule = "steepest") -> float:
        """The rate ``rule`` suggests; :class:`lrserve.UsageError` if the curve is too short."""
        return float(_checked(self.curve, rule))

    def rates(self, rule: Rule = "steepest") -> dict[str, float]:
        """Every group's rate at ``rule``'s point (see :func:`suggested_rates`)."""
        return suggested_rates(self.curve, rule)


def _checked(curve: Mapping[str, Any], rule: str) -> float:
    if rule not in RULES:
        raise UsageError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    value = curve["suggestions"].get(rule)
    if value is None:
        raise UsageError(
            f"range test {curve.get('run')!r} has no {rule!r} suggestion: its curve has "
            f"{len(curve.get('steps', []))} points, too few for that rule (steepest needs 17; "
            "valley and minimum need more than num_iter // 10 + 5); run more iterations"
        )
    return float(value)


def suggested_rates(curve: Mapping[str, Any], rule: Rule = "steepest") -> dict[str, float]:
    """Every range-test group's rate at ``rule``'s point: the suggestion scaled by the group's
    ratio to the first group at that step (the first group gets the suggestion itself)."""
    value = _checked(curve, rule)
    step = curve["suggested_steps"][rule]
    i = list(curve["steps"]).index(step)
    first = float(curve["lr"][i])
    return {
        name: value if j == 0 else value * (float(series[i]) / first)
        for j, (name, series) in enumerate(curve["groups"].items())
    }


def range_test_spec(
    *,
    start_lr: float | Sequence[float] | None = None,
    end_lr: float | Sequence[float] = 10.0,
    num_iter: int = 100,
    step_mode: Literal["exp", "linear"] = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    metric: str = "loss",
) -> dict[str, Any]:
    """The ``LRRangeTest`` node (torch-lr-finder's ``range_test`` arguments and defaults)."""
    node: dict[str, Any] = {
        "type": "LRRangeTest",
        "end_lr": list(end_lr) if isinstance(end_lr, Sequence) else end_lr,
        "num_iter": num_iter,
        "step_mode": step_mode,
        "smooth_f": smooth_f,
        "diverge_th": diverge_th,
        "metric": metric,
    }
    if start_lr is not None:
        node["start_lr"] = list(start_lr) if isinstance(start_lr, Sequence) else start_lr
    return node


def adopted_spec(
    source: Mapping[str, Any],
    curve: Mapping[str, Any],
    *,
    rule: Rule = "steepest",
    total_steps: int | None = None,
    schedule: Mapping[str, Any] | None = None,
    onecycle: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run body of a training run adopting a range test's suggestion.

    ``source`` is the range-test run's spec (its groups keep their names, momentum, betas and
    weight decay). Two ways, one of ``total_steps`` or ``schedule``:

    - ``total_steps``: OneCycleLR with ``max_lr`` = every group's suggested rate
      (:func:`suggested_rates`) over ``total_steps``; ``onecycle`` adds OneCycleLR's other
      arguments (``pct_start``, ``div_factor``, ``cycle_momentum``, ...).
    - ``schedule``: the groups' base ``lr`` become their suggested rates and ``schedule`` (a
      cosine, a warmup, ...) runs from them.
    """
    if (total_steps is None) == (schedule is None):
        raise UsageError("give either total_steps (OneCycleLR) or schedule (base rates)")
    rates = suggested_rates(curve, rule)
    groups = []
    for g in source["groups"]:
        group = dict(g)
        if group["name"] in rates:
            group["lr"] = rates[group["name"]]
        groups.append(group)
    if total_steps is not None:
        names = [g["name"] for g in groups]
        node: dict[str, Any] = {
            "type": "OneCycleLR",
            "max_lr": [rates.get(n, float(g["lr"])) for n, g in zip(names, groups, strict=True)],
            "total_steps": int(total_steps),
            **dict(onecycle or {}),
        }
    else:
        assert schedule is not None
        node = dict(schedule)
    body: dict[str, Any] = {
        "groups": groups,
        "schedule": node,
        "metadata": {
            "range_test": curve.get("run"),
            "rule": rule,
            "suggestion": _checked(curve, rule),
            **dict(metadata or {}),
        },
    }
    for key in ("world_size", "aggregate"):
        if key in source:
            body[key] = source[key]
    return body


def adopt(
    client: Client,
    range_run: str,
    run: str,
    *,
    rule: Rule = "steepest",
    total_steps: int | None = None,
    schedule: Mapping[str, Any] | None = None,
    onecycle: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> CreateRunResult:
    """Create the training run ``run`` from range test ``range_run``'s suggestion, in one call
    (idempotent: the same arguments again answer the run as it is). See :func:`adopted_spec`."""
    source = client.get_run(range_run)["spec"]
    curve = client.range_test(range_run)
    body = adopted_spec(
        source,
        curve,
        rule=rule,
        total_steps=total_steps,
        schedule=schedule,
        onecycle=onecycle,
        metadata=metadata,
    )
    return client.create_run(run, body)


# -- running the test (torch) -------------------------------------------------------------


def _batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches for ever, restarting it when it runs out (torch-lr-finder's
    ``TrainDataLoaderIter(auto_reset=True)``)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UsageError("the data loader yielded no batch")


def _to(obj: Any, device: Any) -> Any:
    if device is None:
        return obj
    if hasattr(obj, "to"):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    *,
    run: str,
    criterion: Callable[[Any, Any], torch.Tensor] | None = None,
    step_fn: Callable[[Any], torch.Tensor] | None = None,
    url: str | None = None,
    token: str | None = None,
    start_lr: float | Sequence[float] | None = None,
    end_lr: float | Sequence[float] = 10.0,
    num_iter: int = 100,
    step_mode: Literal["exp", "linear"] = "exp",
    smooth_f: float = 0.05,
    diverge_th: float = 5.0,
    accumulation_steps: int = 1,
    amp: Mapping[str, Any] | None = None,
    grad_scaler: Any = None,
    device: Any = None,
    chief: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    process_group: Any = None,
    metric: str = "loss",
    restore: bool = True,
    metadata: Mapping[str, Any] | None = None,
    report_timeout: float = 120.0,
    timeout: float = 10.0,
) -> RangeTestOutcome:
    """Run an LR range test on ``model`` through the lrserve run ``run`` and return its curve.

    Each iteration trains one optimizer step at the run's rate for that step: ``step_fn(batch)``
    returns the loss (or, without it, ``criterion(model(inputs), targets)`` for batches
    ``(inputs, targets, *rest)``), over ``accumulation_steps`` batches (each loss divided by
    it, the reported loss their sum, as torch-lr-finder does; a DDP model skips the gradient
    all-reduce on all but the last), under ``torch.autocast(**amp)`` when ``amp`` is given and
    with ``grad_scaler`` (a ``torch.amp.GradScaler``) scaling the backward pass and stepping.
    The loss is reported every step; the test ends when the answer says ``stop``.

    Afterwards the model's and the optimizer's state (and the scaler's) are put back exactly as
    they were (``restore=False`` keeps the trained state), and the run's curve is returned.

    Data parallel: call it on every rank with the same ``run`` (every rank reports, the service
    aggregates), or with ``chief=True`` (rank 0 alone talks to the service; see
    :class:`lrserve.torch.RemoteScheduler`). ``rank``/``world_size`` default to
    ``torch.distributed``'s.
    """
    import torch

    from .torch import RemoteScheduler

    if (criterion is None) == (step_fn is None):
        raise UsageError("give either criterion (with (inputs, targets) batches) or step_fn")
    if isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise UsageError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
    spec: dict[str, Any] = {
        "schedule": range_test_spec(
            start_lr=start_lr,
            end_lr=end_lr,
            num_iter=num_iter,
            step_mode=step_mode,
            smooth_f=smooth_f,
            diverge_th=diverge_th,
            metric=metric,
        ),
        "metadata": {"range_test": True, **dict(metadata or {})},
    }
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_scaler = copy.deepcopy(grad_scaler.state_dict()) if grad_scaler is not None else None
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    was_training = model.training
    no_sync = getattr(model, "no_sync", None)
    batches = _batches(train_loader)
    iterations = 0
    try:
        sched = RemoteScheduler(
            optimizer,
            run,
            url=url,
            spec=spec,
            token=token,
            rank=rank,
            world_size=world_size,
            chief=chief,
            process_group=process_group,
            window=max(2, min(num_iter + 1, 100_000)),
            report_timeout=report_timeout,
            strict=True,  # a range test without its service has no stop and no curve
            timeout=timeout,
        )
        try:
            model.train()
            for _ in range(num_iter):
                optimizer.zero_grad()
                total: torch.Tensor | None = None
                for k in range(accumulation_steps):
                    batch = _to(next(batches), device)
                    # DDP: all-reduce the gradients once, on the last accumulated batch.
                    last = k == accumulation_steps - 1
                    sync = no_sync() if no_sync is not None and not last else None
                    with sync if sync is not None else contextlib.nullcontext():
                        autocast = torch.autocast(**dict(amp)) if amp else contextlib.nullcontext()
                        with autocast:
                            if step_fn is not None:
                                loss = step_fn(batch)
                            else:
                                assert criterion is not None
                                inputs, targets = batch[0], batch[1]
                                loss = criterion(model(inputs), targets)
                        loss = loss / accumulation_steps
                        if grad_scaler is not None:
                            grad_scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    # Summed as a tensor and read once, as torch-lr-finder does (same value).
                    part = loss.detach()
                    total = part if total is None else total + part
                if grad_scaler is not None:
                    grad_scaler.step(optimizer)
                    grad_scaler.update()
                else:
                    optimizer.step()
                assert total is not None
                value = {metric: float(total.item())}
                answer = sched.report(value)
                if answer is not None and not answer.get("complete", True):
                    # Completed after the server's wait: its "stop" predates the step's
                    # decision. The same report again is a duplicate, answered as stored now.
                    answer = sched.report(value)
                iterations += 1
                if answer is None:  # pragma: no cover - strict mode raises instead
                    raise LRServeError(f"range test {run!r}: the report was not answered")
                if answer.get("stop"):
                    break
                sched.step()
            rank_now = sched.rank
            collective = sched.chief and sched.world_size > 1
            talks = not collective or rank_now == 0
        finally:
            sched.close()
    finally:
        if restore:
            model.load_state_dict(saved_model)
            optimizer.load_state_dict(saved_opt)
            if grad_scaler is not None and saved_scaler is not None:
                grad_scaler.load_state_dict(saved_scaler)
            with torch.no_grad():
                for p, g in zip(model.parameters(), saved_grads, strict=True):
                    p.grad = g
        model.train(was_training)
    curve: Any = None
    if talks:
        with Client(url, token=token) as client:
            curve = client.range_test(run)
    if collective:
        import torch.distributed as dist

        box = [curve if rank_now == 0 else None]
        dist.broadcast_object_list(box, src=0, group=process_group)
        curve = box[0]
    return RangeTestOutcome(run=run, curve=curve, iterations=iterations)
