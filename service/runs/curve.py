"""Decimation of long curves for plotting (pure).

Each bucket of steps contributes the steps where every series has its minimum and its
maximum (plus the range's first and last step), so a warmup spike, a step drop or a restart
inside a bucket is never smoothed away: the plot shows the true envelope.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Values = dict[str, dict[str, npt.NDArray[np.float64]]]
CHUNK = 1 << 18


def decimate(
    evaluate: Callable[[int, int], Values], start: int, stop: int, points: int
) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """Steps in ``[start, stop)`` and every series' values there, at most ~``points`` buckets."""
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
        keep: set[int] = set()
        if b == 0:
            keep.add(0)
        if e == n_buckets:
            keep.add(hi - lo - 1)
        for fs in values.values():
            for series in fs.values():
                for k in range(b, e):
                    a, z = int(edges[k]) - lo, int(edges[k + 1]) - lo
                    seg = series[a:z]
                    keep.add(a + int(np.argmin(seg)))
                    keep.add(a + int(np.argmax(seg)))
        idx = np.fromiter(sorted(keep), dtype=np.int64)
        steps.extend((idx + lo).tolist())
        for g, fs in values.items():
            dest = out.setdefault(g, {})
            for f, series in fs.items():
                dest.setdefault(f, []).extend(series[idx].tolist())
        b = e
    return steps, out
