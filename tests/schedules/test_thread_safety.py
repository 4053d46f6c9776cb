"""A compiled Program is an immutable value: evaluating it from many threads at once gives
exactly what a serial evaluation of a freshly compiled one gives.

The service shares one compiled Program per run (an ``lru_cache``) and evaluates it on the
event loop and in worker threads at once. Each case below evaluates one Program from 8 threads
released together by a barrier (windows at random, far-apart starts, so the lazily filled
caches are extended concurrently) and compares every value, bit for bit, with a serial
evaluation on a fresh Program. The GIL switch interval is shortened meanwhile so that threads
interleave inside the cache-filling code rather than only between numpy calls.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from service.schedules import Program, ScheduleSpec

THREADS = 8
Values = dict[str, dict[str, np.ndarray]]

MULTIPLICATIVE = {"type": "MultiplicativeLR", "lr_lambda": "0.99999 + 0.000001 * cos(epoch)"}
# eta_min > 0: CosineAnnealingLR adds to the lr, so the chain is scanned (no closed form),
# with a checkpoint every 2**18 steps.
CHAINED = {
    "type": "ChainedScheduler",
    "schedulers": [
        {"type": "CosineAnnealingLR", "T_max": 1000, "eta_min": 1e-4},
        {"type": "ExponentialLR", "gamma": 0.999999},
    ],
}
GROUPS = [
    {"name": "a", "lr": 0.1, "momentum": 0.9},
    {"name": "b", "lr": 0.02},
]


@pytest.fixture(autouse=True)
def _frequent_switches() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _spec(schedule: dict[str, Any], **extra: Any) -> ScheduleSpec:
    return ScheduleSpec.model_validate({"groups": GROUPS, "schedule": schedule, **extra})


def _concurrently(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run every job in its own thread, all released at once; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _assert_same(got: Values, expected: Values, what: str) -> None:
    assert got.keys() == expected.keys()
    for group, fields in expected.items():
        assert got[group].keys() == fields.keys(), what
        for field, values in fields.items():
            ours = got[group][field]
            if not np.array_equal(ours, values, equal_nan=True):
                bad = int(np.flatnonzero(~np.isclose(ours, values, rtol=0, atol=0))[0])
                raise AssertionError(
                    f"{what}: {group}.{field} differs from a serial evaluation at offset {bad}: "
                    f"{ours[bad]!r} != {values[bad]!r}"
                )


def _check_windows(spec: ScheduleSpec, starts: list[int], count: int, trials: int) -> None:
    serial = Program(spec)
    expected = {s: serial.evaluate(None, s, count) for s in starts}
    for trial in range(trials):
        shared = Program(spec)  # fresh caches: the threads fill them together
        order = np.random.default_rng(trial).permutation(len(starts))
        per_thread = [[starts[int(i)] for i in order[k::THREADS]] for k in range(THREADS)]

        def job(mine: list[int], program: Program = shared) -> list[tuple[int, Values]]:
            return [(s, program.evaluate(program.initial_state(), s, count)) for s in mine]

        for results in _concurrently([lambda mine=mine: job(mine) for mine in per_thread]):
            for start, got in results:
                _assert_same(got, expected[start], f"trial {trial}, window at {start}")


def _far_apart(seed: int, n: int, high: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted({int(s) for s in rng.integers(0, high, n)})


def test_multiplicative_checkpoints() -> None:
    """MultiplicativeLR's running-product checkpoints (every 2**16 steps) and its unit curve."""
    _check_windows(_spec(MULTIPLICATIVE), _far_apart(1, THREADS, 300_000), 1000, trials=6)


def test_multiplicative_in_a_chain() -> None:
    """ChainedScheduler's closed-form product asks MultiplicativeLR for its unit factor."""
    chain = {"type": "ChainedScheduler", "schedulers": [MULTIPLICATIVE, {"type": "StepLR",
             "step_size": 1000, "gamma": 0.9}]}  # fmt: skip
    _check_windows(_spec(chain), _far_apart(2, THREADS, 300_000), 1000, trials=4)


def test_chained_scan_checkpoints() -> None:
    """ChainedScheduler's scan checkpoints (every 2**18 steps past its horizon)."""
    _check_windows(_spec(CHAINED), _far_apart(3, THREADS, 1_200_000), 500, trials=3)


def test_one_step_memo() -> None:
    """The one-step memo (256-step blocks of state-independent parts) under concurrent
    misses and hits: parts for the shared schedule, one group schedule and a param schedule."""
    spec = ScheduleSpec.model_validate(
        {
            "groups": [
                {"name": "a", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
                {"name": "b", "lr": 0.02, "weight_decay": 0.01},
            ],
            "schedule": {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 400_000},
            "group_schedules": {"b": MULTIPLICATIVE},
            "param_schedules": {"weight_decay": {"type": "ExponentialLR", "gamma": 0.9999}},
        }
    )
    # More blocks than the memo holds (it evicts while the threads read it).
    steps = _far_apart(4, 40, 300_000)
    steps += [s + d for s in steps[:8] for d in (1, 255, 256)]  # block edges, repeated asks
    serial = Program(spec)
    expected = {s: serial.evaluate(None, s, 1) for s in steps}
    for trial in range(4):
        shared = Program(spec)
        rng = np.random.default_rng(trial)
        per_thread = [[int(s) for s in rng.permutation(steps)] for _ in range(THREADS)]

        def job(mine: list[int], program: Program = shared) -> list[tuple[int, Values]]:
            return [(s, program.evaluate(None, s, 1)) for s in mine]

        for results in _concurrently([lambda mine=mine: job(mine) for mine in per_thread]):
            for step, got in results:
                _assert_same(got, expected[step], f"trial {trial}, step {step}")


def test_one_step_memo_is_a_bounded_lru() -> None:
    """The memo holds at most its byte budget and evicts the least recently used block (it
    used to empty itself when full)."""
    from service.schedules.program import _BLOCK, _BLOCKS_MAX_BYTES

    spec = ScheduleSpec.model_validate(
        {"groups": [{"name": "a", "lr": 0.1}], "schedule": MULTIPLICATIVE}
    )
    program = Program(spec)
    memo = program._blocks
    capacity = memo.cache_info().maxsize
    assert capacity is not None and capacity * _BLOCK * 8 <= _BLOCKS_MAX_BYTES
    for k in range(capacity + 10):
        program.evaluate(None, k * _BLOCK, 1)
        program.evaluate(None, 0, 1)  # block 0 stays the most recently used
    assert memo.cache_info().currsize == capacity
    misses = memo.cache_info().misses
    program.evaluate(None, 5, 1)  # kept: recently used
    assert memo.cache_info().misses == misses
    program.evaluate(None, _BLOCK + 5, 1)  # block 1: evicted long ago
    assert memo.cache_info().misses == misses + 1
