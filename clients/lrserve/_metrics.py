"""Metric values: what a report accepts, their wire form, and how ranks' values combine.

Pure Python (no numpy, torch or server imports): numpy scalars and tensors are recognised
by their ``item()``/``dtype``, not by importing their packages.

The wire has three kinds of value: a finite number, ``null`` ("no value": the metric
was not measured this time) and the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(JSON has no literals for them). :func:`aggregate` combines the ranks' values exactly as
the service does (``service.runs.model.aggregate``; ``tests/sdk/test_metrics.py``
compares the two on generated inputs), so chief mode, where rank 0 combines the ranks'
metrics itself, makes the decisions every-rank mode would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from ._errors import UsageError

__all__ = ["aggregate", "encode_metric", "metric_number", "metric_values"]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _not_a_number(name: str, value: Any, what: str | None = None) -> UsageError:
    got = what or f"{type(value).__name__} {value!r}"[:120]
    return UsageError(
        f"metric {name!r}: expected a number or None, got {got} "
        "(numpy scalars and one-element tensors are accepted)"
    )


def _scalar(name: str, value: Any, original: Any) -> float:
    """A plain Python number (already unwrapped from numpy/torch) as a float."""
    if isinstance(value, bool):
        # float(True) is 1.0: a flag reported as a metric is a mistake, not a value.
        raise _not_a_number(name, original, f"the boolean {value!r}")
    if isinstance(value, str):
        if value in _NONFINITE:
            return _NONFINITE[value]
        raise _not_a_number(name, original, f"the string {value!r}"[:120])
    try:
        # ints, floats (numpy.float64 is one), Decimal, Fraction, anything with __float__.
        return float(value)
    except OverflowError:
        raise _not_a_number(name, original, "an integer too large for a float") from None
    except Exception:
        raise _not_a_number(name, original) from None


def metric_number(name: str, value: Any) -> float | None:
    """One reported value as a ``float``, or ``None`` for "no value".

    Accepts numbers, numpy scalars, 0-d (one-element) tensors (``loss.detach()``, read
    with ``.item()``), ``None`` and the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``. Anything else (other strings, booleans, arrays of several values,
    complex numbers, other objects) raises :class:`~lrserve.UsageError` (a
    ``ValueError``) naming the metric.
    """
    if value is None:
        return None
    if type(value) is float:  # the common case, first
        return value
    item = getattr(value, "item", None)
    if callable(item) and hasattr(value, "dtype"):  # numpy scalar/array, torch tensor
        numel = getattr(value, "numel", None)  # torch: a method; numpy: .size, an int
        size = numel() if callable(numel) else getattr(value, "size", 1)
        if size != 1:
            what = f"a {type(value).__name__} of {size} values"
            raise _not_a_number(name, value, what)
        try:
            inner = item()
        except Exception:
            raise _not_a_number(name, value) from None
        if inner is None:
            return None
        return _scalar(name, inner, value)
    return _scalar(name, value, value)


def metric_values(metrics: Mapping[Any, Any]) -> dict[str, float | None]:
    """A report's ``{name: value}`` as ``{str: float | None}`` (see :func:`metric_number`)."""
    if not isinstance(metrics, Mapping):
        raise UsageError(
            f"metrics must be a mapping of metric name to number, got {type(metrics).__name__}"
        )
    return {str(k): metric_number(str(k), v) for k, v in metrics.items()}


def encode_metric(name: str, value: Any) -> float | str | None:
    """A metric value in its wire form: JSON has no NaN/inf, the contract uses strings."""
    number = metric_number(name, value)
    if number is None:
        return None
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return number


def aggregate(ranks: Sequence[Mapping[str, float | None]], how: str) -> dict[str, float | None]:
    """Combine per-rank metrics (``ranks[r]`` is rank ``r``'s) the way the service does.

    The service's rules (``service.runs.model.aggregate``), step for step: ``None`` is "no
    value" and is left out (a metric no rank has a value for is ``None``); a metric any
    rank reported is in the result, whichever ranks reported it; NaN and infinities take
    part and propagate (``mean`` sums them, ``min``/``max`` give NaN when any value is
    NaN); an all-finite ``mean`` is ``math.fsum`` (exactly rounded) over the count;
    ``rank0`` is rank 0's values alone, ``None`` included.

    One deliberate difference: where the all-finite sum overflows a float
    (``math.fsum`` raises ``OverflowError``), the mean is computed exactly instead.
    """
    if how == "rank0":
        if not ranks:
            return {}
        return {k: (None if v is None else float(v)) for k, v in ranks[0].items()}
    columns: dict[str, list[float]] = {}
    for values in ranks:
        for k, v in values.items():
            col = columns.setdefault(k, [])
            if v is not None:
                col.append(float(v))
    out: dict[str, float | None] = {}
    for k, col in columns.items():
        if not col:
            out[k] = None
        elif len(col) == 1:
            out[k] = col[0]
        elif how == "mean":
            if all(math.isfinite(v) for v in col):
                try:
                    total = math.fsum(col)
                except OverflowError:
                    # Finite values whose sum is beyond a float: their mean is not.
                    out[k] = float(sum(map(Fraction, col), Fraction(0)) / len(col))
                    continue
            else:
                total = sum(col)
            out[k] = total / len(col)
        elif any(math.isnan(v) for v in col):
            out[k] = math.nan
        else:
            out[k] = min(col) if how == "min" else max(col)
    return out
