"""A schedule's horizon: the number of steps after which it is known to be over (pure).

``horizon(node)`` is the step count ``H`` such that the schedule's own definition says where it
ends: training is planned for steps ``0 .. H - 1`` (``OneCycleLR(total_steps=H)``,
``CosineAnnealingLR(T_max=H)``: torch's cosine climbs back up after ``T_max``), or its values
stop changing by definition at ``H`` (``LinearLR`` / ``ConstantLR`` / ``PolynomialLR``
``total_iters``). ``None`` when nothing in the spec bounds it: a schedule that keeps changing
for ever (``StepLR``, ``ExponentialLR``, ``CosineAnnealingWarmRestarts``, ``CyclicLR``, lambdas),
one driven by metrics (plateau nodes), or one that is constant from step 0 (a horizon of 0
would call every run finished at once).

Used for the run's status (a run whose completed step reached ``H - 1`` is finished) and for
the range a chart of the run shows. Rules per node type are in ``_RULES``; a composite asks its
children. Types without a rule are ``None`` (unbounded): a new node type is never mistaken for
a finished one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .base import ScheduleNode


def horizon(node: ScheduleNode) -> int | None:
    """The step count after which ``node``'s schedule ends or holds (see the module doc)."""
    rule = _RULES.get(str(getattr(node, "type", "")))
    if rule is None:
        return None
    value = rule(node)
    if value is None:
        return None
    steps = math.ceil(value)
    return steps if steps > 0 else None


def _attr(name: str) -> Callable[[Any], float | None]:
    def rule(node: Any) -> float | None:
        value = getattr(node, name, None)
        return None if value is None else float(value)

    return rule


def _one_cycle(node: Any) -> float | None:
    if node.total_steps is not None:
        return float(node.total_steps)
    if node.epochs is not None and node.steps_per_epoch is not None:
        return float(node.epochs * node.steps_per_epoch)
    return None


def _then_last(children: Sequence[Any], boundaries: Sequence[Any]) -> float | None:
    """A sequence of schedules switching at ``boundaries``: the last one's horizon, counted
    from the last boundary (it restarts at its own step 0 there)."""
    if not children:
        return None
    last = horizon(children[-1])
    if last is None:
        return None
    offset = float(boundaries[-1]) if boundaries else 0.0
    return offset + last


def _sequential(node: Any) -> float | None:
    return _then_last(list(node.schedulers), list(node.milestones))


def _chained(node: Any) -> float | None:
    # Factors multiply: the product keeps changing while any child does, so one unbounded
    # child makes the chain unbounded; otherwise it holds once the longest child is over.
    values = [horizon(child) for child in node.schedulers]
    if not values or any(v is None for v in values):
        return None
    return float(max(v for v in values if v is not None))


def _epochs(node: Any) -> float | None:
    inner = horizon(node.schedule)
    return None if inner is None else float(inner) * float(node.steps_per_epoch)


def _transformers(node: Any) -> float | None:
    total = getattr(node, "num_training_steps", None)
    return None if total is None else float(total)


def _wsd(node: Any) -> float | None:
    if getattr(node, "num_training_steps", None) is not None:
        return float(node.num_training_steps)
    parts = [node.num_warmup_steps, getattr(node, "num_stable_steps", None), node.num_decay_steps]
    known = [float(p) for p in parts if p is not None]
    return sum(known) if len(known) == len(parts) else None


def _timm_cycle(node: Any) -> float | None:
    # cycle_limit cycles of t_initial * cycle_mul**i steps, after a warmup when it is a prefix.
    limit = max(1, int(node.cycle_limit))
    length = sum(float(node.t_initial) * float(node.cycle_mul) ** i for i in range(limit))
    return length + (float(node.warmup_t) if node.warmup_prefix else 0.0)


def _optax_transition(node: Any) -> float | None:
    steps = int(node.transition_steps)
    if steps <= 0:
        return None
    return float(max(0, int(node.transition_begin)) + steps)


def _optax_sgdr(node: Any) -> float | None:
    return float(sum(int(k.decay_steps) for k in node.cosine_kwargs))


def _optax_join(node: Any) -> float | None:
    return _then_last(list(node.schedules), list(node.boundaries))


def _keras_polynomial(node: Any) -> float | None:
    # With cycle the decay starts over at every multiple of decay_steps: unbounded.
    return None if node.cycle else float(node.decay_steps)


def _keras_cosine(node: Any) -> float | None:
    return float(node.decay_steps) + float(node.warmup_steps or 0)


_RULES: dict[str, Callable[[Any], float | None]] = {
    "ConstantLR": _attr("total_iters"),
    "LinearLR": _attr("total_iters"),
    "PolynomialLR": _attr("total_iters"),
    "CosineAnnealingLR": _attr("T_max"),
    "OneCycleLR": _one_cycle,
    "LRRangeTest": _attr("num_iter"),
    "SequentialLR": _sequential,
    "ChainedScheduler": _chained,
    "Epochs": _epochs,
    "transformers.get_linear_schedule_with_warmup": _transformers,
    "transformers.get_cosine_schedule_with_warmup": _transformers,
    "transformers.get_cosine_with_hard_restarts_schedule_with_warmup": _transformers,
    "transformers.get_polynomial_decay_schedule_with_warmup": _transformers,
    "transformers.get_cosine_with_min_lr_schedule_with_warmup": _transformers,
    "transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate": _transformers,
    "transformers.get_wsd_schedule": _wsd,
    "timm.CosineLRScheduler": _timm_cycle,
    "timm.TanhLRScheduler": _timm_cycle,
    "timm.PolyLRScheduler": _timm_cycle,
    "optax.polynomial_schedule": _optax_transition,
    "optax.linear_schedule": _optax_transition,
    "optax.cosine_decay_schedule": _attr("decay_steps"),
    "optax.cosine_onecycle_schedule": _attr("transition_steps"),
    "optax.linear_onecycle_schedule": _attr("transition_steps"),
    "optax.warmup_cosine_decay_schedule": _attr("decay_steps"),
    "optax.sgdr_schedule": _optax_sgdr,
    "optax.join_schedules": _optax_join,
    "keras.PolynomialDecay": _keras_polynomial,
    "keras.CosineDecay": _keras_cosine,
}
"""Per node type: its horizon (steps), or ``None``. Every other type is unbounded."""


__all__ = ["horizon"]
