"""Decimation of long curves for plotting (pure).

Each bucket of steps contributes the steps where every series has its minimum and its
maximum (plus the range's first and last step), so a warmup spike, a step drop or a restart
inside a bucket is never smoothed away: the plot shows the true envelope.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from service.schedules.cost import WorkLimitExceeded

Values = dict[str, dict[str, npt.NDArray[np.float64]]]
CHUNK = 1 << 18


def decimate(
    evaluate: Callable[[int, int], Values],
    start: int,
    stop: int,
    points: int,
    max_values: int | None = None,
) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """Steps in ``[start, stop)`` and every series' values there, at most ~``points`` buckets.

    The steps kept are the union of every series' minima and maxima: series that peak at
    different steps (many groups, each with its own phase) keep more. ``max_values`` bounds
    the answer (steps x series): :class:`WorkLimitExceeded` as soon as it would be passed."""
    n = stop - start
    if n <= points:
        values = evaluate(start, n)
        return list(range(start, stop)), {
            g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()
        }
    n_buckets = max(1, points // 2)
    edges = start + (np.arange(n_buckets + 1, dtype=np.int64) * n) // n_buckets
    steps: list[int] = []
    out: dict[str, dict[str, list[float]]] = {}
    b = 0
    while b < n_buckets:
        # Whole buckets per chunk, so a bucket's min/max are found in one evaluated window.
        e = b + 1
        while e < n_buckets and edges[e + 1] - edges[b] <= CHUNK:
            e += 1
        lo, hi = int(edges[b]), int(edges[e])
        values = evaluate(lo, hi - lo)
        chunk_edges = edges[b : e + 1]
        rows = _bucket_index(chunk_edges)
        keep = [np.array([0] if b == 0 else [], dtype=np.int64)]
        if e == n_buckets:
            keep.append(np.array([hi - lo - 1], dtype=np.int64))
        for fs in values.values():
            for series in fs.values():
                keep.append(_first_extremes(series, chunk_edges, rows))
        idx = np.unique(np.concatenate(keep))
        answered = (len(steps) + len(idx)) * sum(len(fs) for fs in values.values())
        if max_values is not None and answered > max_values:
            raise WorkLimitExceeded(
                "this curve",
                "values",
                answered,
                max_values,
                "its series peak at different steps, so decimation keeps too many: ask for "
                "fewer points or a shorter span",
            )
        steps.extend((idx + lo).tolist())
        for g, fs in values.items():
            dest = out.setdefault(g, {})
            for f, series in fs.items():
                dest.setdefault(f, []).extend(series[idx].tolist())
        b = e
    return steps, out


def _bucket_index(edges: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | None:
    """Buckets ``[edges[k], edges[k + 1])`` (relative to ``edges[0]``, none empty) as rows of
    indices, each row padded with its bucket's last index (``None`` when every bucket has
    the same length: a reshape then does). A padded copy comes after the step it repeats, so
    a row's first minimum and maximum are its bucket's."""
    lengths = np.diff(edges)
    if lengths.min() == lengths.max():
        return None
    rel = edges - edges[0]
    cols = np.arange(int(lengths.max()), dtype=np.int64)
    return np.minimum(rel[:-1, None] + cols[None, :], rel[1:, None] - 1)


def _first_extremes(
    series: npt.NDArray[np.float64],
    edges: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64] | None,
) -> npt.NDArray[np.int64]:
    """Per bucket, the indices (relative to ``edges[0]``) of its first minimum and first
    maximum, exactly as ``np.argmin``/``np.argmax`` of each bucket give them (NaN included),
    in a few numpy calls instead of two per bucket (20 s for 10^6 steps at 1,024 groups)."""
    starts = edges[:-1] - edges[0]
    if rows is None:
        table = series[: int(edges[-1] - edges[0])].reshape(len(starts), -1)
    else:
        table = series[rows]
    return np.concatenate([starts + table.argmin(axis=1), starts + table.argmax(axis=1)])


def decimate_sampled(
    evaluate: Callable[[int, int], Values], start: int, stop: int, points: int, per_bucket: int
) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """As :func:`decimate`, but within a work budget: each of the ``points // 2`` buckets
    contributes the min and max steps of only its first ``per_bucket`` steps (and the range
    keeps its first and last step). For a span too long to evaluate densely: a change point
    inside a bucket's unsampled part shows one bucket late, never as a wrong value."""
    n = stop - start
    n_buckets = max(1, points // 2)
    edges = start + (np.arange(n_buckets + 1, dtype=np.int64) * n) // n_buckets
    keep: dict[int, dict[str, dict[str, float]]] = {}
    windows = [(int(a), min(int(a) + per_bucket, int(b))) for a, b in pairwise(edges) if b > a]
    windows.append((stop - 1, stop))
    for lo, hi in windows:
        values = evaluate(lo, hi - lo)
        chosen = {0, hi - lo - 1}
        for fs in values.values():
            for series in fs.values():
                chosen.add(int(np.argmin(series)))
                chosen.add(int(np.argmax(series)))
        for i in chosen:
            keep[lo + i] = {g: {f: float(v[i]) for f, v in fs.items()} for g, fs in values.items()}
    steps = sorted(keep)
    groups: dict[str, dict[str, list[float]]] = {}
    for step in steps:
        for g, at_step in keep[step].items():
            dest = groups.setdefault(g, {})
            for f, value in at_step.items():
                dest.setdefault(f, []).append(value)
    return steps, groups
