"""What the framework integrations share: picking metrics, reporting after a framework's step.

Kept free of any framework import so that each integration module imports only its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["metric_names", "pick_metrics", "report_after_step"]


def metric_names(monitor: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``monitor`` as a tuple of names (``None``: every numeric metric)."""
    if monitor is None:
        return None
    if isinstance(monitor, str):
        return (monitor,)
    names = tuple(str(m) for m in monitor)
    if not names:
        raise ValueError("monitor names no metric")
    return names


def _number(value: Any) -> float | None:
    """A float for a number or a one-element tensor/array, else ``None`` (not a metric)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    n = size() if callable(size) else size
    if callable(item) and n == 1:
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def pick_metrics(
    logs: Mapping[str, Any], names: Iterable[str] | None, prefix: str = ""
) -> dict[str, float]:
    """The metrics to report from a framework's ``logs``.

    ``names`` given: those metrics, looked up as they are and with ``prefix`` (Hugging
    Face's ``eval_``), reported under the name asked for; missing ones are left out. Not
    given: every numeric value in ``logs``.
    """
    out: dict[str, float] = {}
    if names is None:
        for key, value in logs.items():
            v = _number(value)
            if v is not None:
                out[str(key)] = v
        return out
    for name in names:
        for key in (name, prefix + name):
            if key in logs:
                v = _number(logs[key])
                if v is not None:
                    out[name] = v
                break
    return out


def report_after_step(sched: Any, metrics: Mapping[str, float | None]) -> Any:
    """Report ``metrics`` to a ``RemoteScheduler`` the framework has already stepped.

    Lightning, ``Trainer`` and accelerate loops call ``scheduler.step()`` right after
    ``optimizer.step()`` and evaluate afterwards; their own ``ReduceLROnPlateau`` then acts
    on the next optimizer step. To match, the report is for the step the last optimizer
    step trained with (``last_epoch - 1``), whose decision applies from ``last_epoch``,
    and the current step's values are written again with it.
    """
    step = max(int(sched.last_epoch) - 1, 0)
    res = sched.report(dict(metrics), step=step)
    sched._reapply()
    return res
