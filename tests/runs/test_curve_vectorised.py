"""Vectorised curve decimation gives exactly what the per-bucket loop it replaced gave."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import pytest

from service.runs import curve
from service.runs.curve import CHUNK, Values, decimate
from service.schedules.cost import WorkLimitExceeded


def reference_decimate(
    evaluate: Callable[[int, int], Values],
    start: int,
    stop: int,
    points: int,
    max_values: int | None = None,
) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """The per-bucket Python loop (before vectorisation), kept here as the oracle."""
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
        answered = (len(steps) + len(idx)) * sum(len(fs) for fs in values.values())
        if max_values is not None and answered > max_values:
            raise WorkLimitExceeded("this curve", "values", answered, max_values, "")
        steps.extend((idx + lo).tolist())
        for g, fs in values.items():
            dest = out.setdefault(g, {})
            for f, series in fs.items():
                dest.setdefault(f, []).extend(series[idx].tolist())
        b = e
    return steps, out


def _evaluator(
    kinds: list[str], seed: int = 0
) -> Callable[[int, int], dict[str, dict[str, npt.NDArray[np.float64]]]]:
    """Series defined at absolute steps (so chunked evaluation agrees with itself)."""

    def series(kind: str, s: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        x = s.astype(np.float64)
        if kind == "cos":
            return 0.5 * (1 + np.cos(np.pi * (x % 997) / 997))
        if kind == "steps":  # long plateaus: ties everywhere, first occurrence matters
            return 0.1 ** (s // 1000).astype(np.float64)
        if kind == "const":
            return np.full(len(s), 1e-3)
        if kind == "noise":  # deterministic per step
            return np.sin(x * 12.9898 + seed) * 43758.5453 % 1.0
        if kind == "signed_zero":
            return np.where(s % 3 == 0, -0.0, 0.0)
        if kind == "spikes":
            return np.where(s % 37 == 5, 10.0, np.where(s % 41 == 7, -10.0, 1.0))
        if kind == "nan":
            return np.where(s % 53 == 11, np.nan, np.cos(x / 7))
        raise AssertionError(kind)

    def evaluate(start: int, count: int) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
        s = np.arange(start, start + count, dtype=np.int64)
        # One group per kind (one field), and one group with every kind as a field.
        return {f"g{i}": {"lr": series(k, s)} for i, k in enumerate(kinds)} | {
            "all": {k: series(k, s) for k in kinds}
        }

    return evaluate


KINDS = ["cos", "steps", "const", "noise", "signed_zero", "spikes", "nan"]


@pytest.mark.parametrize(
    ("start", "stop", "points"),
    [
        (0, 1001, 1000),  # one step more than points: buckets of 1 and 2 steps
        (0, 1000, 1000),  # dense
        (5, 12_345, 1000),  # uneven buckets
        (0, 10_007, 3),  # one bucket
        (0, 10_007, 7),  # odd points, uneven
        (123, 99_999, 1024),
        (0, 700_001, 5),  # buckets larger than a chunk: one bucket per chunk
        (0, 600_000, 2000),  # several chunks of whole buckets
        (1_000_000, 1_262_144 + 3, 511),
    ],
)
def test_vectorised_decimation_equals_the_per_bucket_loop(
    start: int, stop: int, points: int
) -> None:
    evaluate = _evaluator(KINDS)
    got_steps, got = decimate(evaluate, start, stop, points)
    want_steps, want = reference_decimate(evaluate, start, stop, points)
    assert got_steps == want_steps
    assert got.keys() == want.keys()
    for g in want:
        assert got[g].keys() == want[g].keys()
        for f in want[g]:
            # Same values, NaN in the same places, the sign of zero kept.
            np.testing.assert_array_equal(np.array(got[g][f]), np.array(want[g][f]))
            assert np.array_equal(np.signbit(got[g][f]), np.signbit(want[g][f]))


@pytest.mark.parametrize("seed", range(5))
def test_random_shapes_and_groups(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        start = int(rng.integers(0, 10**6))
        n = int(rng.integers(2, 50_000))
        points = int(rng.integers(1, n + 5))
        kinds = list(rng.choice(KINDS, size=int(rng.integers(1, 6))))
        evaluate = _evaluator(kinds, seed)
        got = decimate(evaluate, start, start + n, points)
        want = reference_decimate(evaluate, start, start + n, points)
        assert got[0] == want[0]
        for g in want[1]:
            for f in want[1][g]:
                np.testing.assert_array_equal(np.array(got[1][g][f]), np.array(want[1][g][f]))


def test_the_values_limit_is_enforced_at_the_same_size() -> None:
    evaluate = _evaluator(["noise", "cos"])
    steps, _ = reference_decimate(evaluate, 0, 100_000, 1000)
    limit = len(steps) * 4  # four series: g0, g1 and "all" with two fields
    decimate(evaluate, 0, 100_000, 1000, max_values=limit)
    with pytest.raises(WorkLimitExceeded):
        decimate(evaluate, 0, 100_000, 1000, max_values=limit - 1)


@pytest.mark.parametrize("n_buckets", [1, 2, 7, 512])
def test_per_bucket_extremes_in_one_call(n_buckets: int) -> None:
    # The helper finds every bucket's first min and max at once, even and uneven buckets.
    rng = np.random.default_rng(n_buckets)
    for n in (n_buckets, n_buckets * 3, n_buckets * 3 + 1, 10_007):
        if n < n_buckets:
            continue
        series = rng.integers(0, 4, n).astype(np.float64)  # many ties
        series[rng.integers(0, n, 3)] = np.nan
        edges = 100 + (np.arange(n_buckets + 1, dtype=np.int64) * n) // n_buckets
        got = curve._first_extremes(series, edges, curve._bucket_index(edges))
        rel = edges - edges[0]
        want = [a + int(np.argmin(series[a:z])) for a, z in pairwise(rel.tolist())]
        want += [a + int(np.argmax(series[a:z])) for a, z in pairwise(rel.tolist())]
        assert got.tolist() == want
