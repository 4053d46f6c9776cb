"""A compiled Program is shared between threads (the service's program cache, the event loop and
its worker threads): concurrent evaluation must give exactly what serial evaluation gives.

For every example of the contract table (plus a few compositions with caches of their own), a
freshly compiled Program is evaluated from 8 threads started together (``threading.Barrier``),
each asking random windows and single steps, far ones first so that the threads race to fill
the lazily built caches (MultiplicativeLR's running-product checkpoints, ChainedScheduler's
scan checkpoints, the program's one-step memo). Every result must equal, bit for bit, the same
query on another freshly compiled Program evaluated serially.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.schedules import Program
from tests.schedules.test_contract import EXAMPLES, compile_program, observed_state

THREADS = 8
ROUNDS = 2
"""Fresh programs per spec: each round races on empty caches again."""
QUERIES = 10
"""Queries per thread per round."""
FAR = 300_000
"""Largest start asked (past MultiplicativeLR's 65,536-step and the chain's 262,144-step
checkpoints)."""

EXTRA: dict[str, dict[str, Any]] = {
    # A scanned ChainedScheduler (eta_min: not multiplicative) with scan checkpoints.
    "chained-scan": {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "CosineAnnealingLR", "T_max": 25, "eta_min": 1e-4},
            {"type": "ExponentialLR", "gamma": 0.99999},
        ],
    },
    # MultiplicativeLR as a ChainedScheduler child (its unit recursion, ChainedScheduler.factor).
    "chained-multiplicative": {
        "type": "ChainedScheduler",
        "schedulers": [EXAMPLES["MultiplicativeLR"], {"type": "StepLR", "step_size": 1000}],
    },
}
SPECS = {**EXAMPLES, **EXTRA}

Query = tuple[int, int]
Result = dict[str, dict[str, np.ndarray]]


@pytest.fixture(autouse=True)
def _fast_thread_switches() -> Iterator[None]:
    """Switch threads every 10 us instead of 5 ms so that races show within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


SCANNED = {"chained-scan"}
"""Specs whose windows below the first scan checkpoint (262,144) rescan from step 0: their
later queries stay near 0 or past the checkpoint, to keep the file fast."""


def queries(rng: random.Random, kind: str) -> list[Query]:
    """A far window first (every thread fills caches at once), then a mix of single steps and
    windows anywhere in [0, FAR)."""
    out: list[Query] = [(rng.randrange(FAR - 30_000, FAR), rng.randrange(1, 300))]
    low = 270_000 if kind in SCANNED else 0
    for _ in range(QUERIES - 1):
        start = rng.choice([rng.randrange(0, 300), rng.randrange(low, FAR)])
        out.append((start, 1 if rng.random() < 0.5 else rng.randrange(2, 1500)))
    return out


def concurrent(program: Program, state: dict[str, Any], plans: list[list[Query]]) -> list[Any]:
    """Each thread evaluates its plan; returns per thread its results or the exception."""
    barrier = threading.Barrier(len(plans))
    results: list[Any] = [None] * len(plans)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [program.evaluate(state, start, count) for start, count in plans[i]]
        except BaseException as exc:  # reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def difference(got: Result, want: Result) -> str | None:
    """Where ``got`` is not bit for bit ``want`` (``None`` where it is)."""
    if got.keys() != want.keys():
        return f"groups {sorted(got)} != {sorted(want)}"
    for g in want:
        if got[g].keys() != want[g].keys():
            return f"{g}: fields {sorted(got[g])} != {sorted(want[g])}"
        for f, w in want[g].items():
            a = got[g][f]
            if not np.array_equal(a, w, equal_nan=True):
                k = int(np.flatnonzero(~((a == w) | (np.isnan(a) & np.isnan(w))))[0])
                return f"{g}.{f}[{k}] = {a[k]!r}, serially {w[k]!r}"
    return None


@pytest.mark.parametrize("kind", list(SPECS))
def test_concurrent_evaluation_equals_serial(kind: str) -> None:
    rng = random.Random(f"concurrency-{kind}")
    first = compile_program(SPECS[kind])
    state = observed_state(first) if first.metric_names else {}
    for rnd in range(ROUNDS):
        plans = [queries(rng, kind) for _ in range(THREADS)]
        results = concurrent(compile_program(SPECS[kind]), state, plans)
        serial = compile_program(SPECS[kind])
        for i, (plan, got) in enumerate(zip(plans, results, strict=True)):
            if isinstance(got, BaseException):
                raise AssertionError(f"round {rnd}, thread {i} raised {got!r}") from got
            for (start, count), values in zip(plan, got, strict=True):
                diff = difference(values, serial.evaluate(state, start, count))
                assert diff is None, (
                    f"round {rnd}, thread {i}: evaluate(state, {start}, {count}) differs from a "
                    f"serial evaluation: {diff}"
                )
