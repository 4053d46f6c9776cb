"""Expensive evaluations, off the event loop: the heavy-work pool, sampled curves, previews.

An evaluation over ``INLINE_WORK`` (a long window or curve, a preview, a page of metric
history) runs in one of ``MAX_HEAVY`` lower-priority worker threads (:func:`heavy`): the
event loop, and every trainer's ``GET lr`` on it, never waits on one, and at most
``MAX_HEAVY`` of them hold memory at once. :func:`sample` evaluates a curve densely or
decimated; :func:`preview` is the values of a spec without a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from anyio import to_thread

from service.runs.curve import decimate
from service.runs.errors import InvalidArgument
from service.runs.limits import MAX_WINDOW_VALUES, check_span, check_spec_limits, check_values
from service.runs.model import Values
from service.runs.views import Sampled
from service.schedules import Program, ScheduleSpec
from service.schedules.cost import WORK_BUDGET, check_work

T = TypeVar("T")

MAX_HEAVY = 2
"""Evaluations over ``INLINE_WORK`` run in worker threads, at most this many at once (the
others wait for one): what bounds the memory of expensive requests together."""
HEAVY_SWITCH_INTERVAL = 0.0002
"""``sys.setswitchinterval`` once a :func:`heavy` thread has started (see ``_lower_priority``)."""


def _lower_priority() -> None:
    # Linux gives each thread its own nice value (PRIO_PROCESS, 0 is the calling thread):
    # on a busy machine the event loop's thread is scheduled before an evaluation's.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, 10)
    # Once evaluations compete with the event loop for the GIL, the loop waits at most
    # 0.2 ms for it. The wait is paid again at every point a request releases the GIL (each
    # socket operation, each SQLite call): at Python's default, 5 ms, a GET lr beside a history
    # read took tens of ms; at 1 ms its p99 was 6-7 ms, at 0.2 ms 5 ms, with the history read
    # no slower (bench/bench_history.py, docs/benchmarks.md).
    sys.setswitchinterval(min(sys.getswitchinterval(), HEAVY_SWITCH_INTERVAL))


_HEAVY_POOL = ThreadPoolExecutor(
    MAX_HEAVY, thread_name_prefix="lrserve-heavy", initializer=_lower_priority
)
"""Expensive evaluations: ``MAX_HEAVY`` threads of lower priority; the others queue."""


async def heavy(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in one of the ``MAX_HEAVY`` evaluation threads (an expensive window,
    curve or preview): the event loop (and ``/healthz``) never waits on it, and at most
    ``MAX_HEAVY`` such evaluations hold memory at once."""
    return await asyncio.get_running_loop().run_in_executor(_HEAVY_POOL, partial(fn, *args))


def sample(
    window: Callable[[int, int], Values], start: int, stop: int, points: int | None
) -> Sampled:
    """Every step of ``[start, stop)``, or at most about ``points`` of them (min/max per
    bucket, so no change point is smoothed away)."""
    if points is None:
        values = window(start, stop - start)
        groups = {g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()}
        return Sampled(stop - start, None, groups)
    steps, groups = decimate(window, start, stop, points, MAX_WINDOW_VALUES)
    return Sampled(len(steps), steps, groups)


async def preview(
    spec: ScheduleSpec,
    start: int,
    count: int | None,
    points: int | None,
    stop: int | None,
    max_span: int,
    max_work: int = WORK_BUDGET,
) -> Sampled:
    """A spec's values without a run: ``count`` steps from ``start`` (default 100), or about
    ``points`` steps of ``[start, stop)`` (a span of at most ``max_span``)."""
    if points is not None and count is not None:
        raise InvalidArgument(("points",), "give either count or points with stop")
    if stop is not None and points is None:
        raise InvalidArgument(("points",), "stop needs points")
    if points is not None and stop is None:
        raise InvalidArgument(("stop",), "points needs stop")
    program = await to_thread.run_sync(Program, spec)
    # A preview is asked once, for its own span: the spec is held to that span only.
    end = stop if stop is not None else start + (count if count is not None else 100)
    check_spec_limits(program, max_work, horizon=max(end, 1))
    state = program.initial_state()

    def window(a: int, n: int) -> Values:
        return program.evaluate(state, start=a, count=n)

    if points is not None:
        assert stop is not None
        check_span(start, stop, max_span)
        check_work(program, start, stop - start, max_work, "this preview")
        return await heavy(sample, window, start, stop, points)
    n = 100 if count is None else count
    check_values(program.series, n, "this preview")
    check_work(program, start, n, max_work, "this preview", window=True)
    return await heavy(sample, window, start, start + n, None)
