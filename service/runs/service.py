"""Use cases: everything a request can do to a run or read from it.

Two levels:

- **Transactions** (``create_run``, ``report``, ``add_override``, ``step_status``): blocking
  functions over a :class:`~service.runs.repository.Store`. A mutation runs inside
  ``store.transaction(run_id)`` (the run row locked until commit), so two reports for one run,
  on any process or replica, are applied one after the other. Callable from any thread.
- :class:`Runs`, the application service the HTTP layer calls: one ``async`` method per use
  case, reads included (a window of values, a curve, metric history, events, waiting for a
  step). It decides where each call runs: on the event loop when the store says the call never
  waits (a SQLite WAL read; a SQLite write that fails fast when the lock is taken, retried
  briefly) and in a worker thread otherwise. It owns the values cache.

Results are domain values (:class:`Run`, :class:`ReportOutcome`, ...), never HTTP bodies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import anyio
from anyio import to_thread

from service.runs.curve import decimate
from service.runs.errors import InvalidArgument, RunConflict, RunNotFound
from service.runs.model import (
    OverrideChange,
    ReportPlan,
    RunSpec,
    Values,
    at_step,
    canonical_values,
    check_rank,
    compile_spec,
    evaluate,
    make_override,
    plan_report,
)
from service.runs.repository import (
    ReportRow,
    RunRecord,
    RunSummary,
    Store,
    WouldBlock,
    dumps,
    utcnow,
)
from service.runs.values import ValuesCache
from service.schedules import Program, ScheduleSpec
from service.schedules.base import MAX_STEP

T = TypeVar("T")

BLOCK = 1024
"""Steps per cached block for one-step reads: a block costs about what one step costs, and a
trainer asks for step after step while every rank asks for the same one."""

HEAVY_VALUES = 1 << 16
"""Windows with more values than this (steps x series) are evaluated in a worker thread."""


# -- domain values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A run as the use cases see it: the spec compiled, state and overrides parsed."""

    id: str
    spec_text: str
    """The normalised spec (canonical JSON): also the idempotency key."""
    spec: RunSpec
    program: Program
    state: dict[str, Any]
    overrides: list[dict[str, Any]]
    version: int
    step: int | None
    completed_step: int | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, record: RunRecord, state: dict[str, Any] | None = None) -> Run:
        """The run of a stored row (``state``: the row's state already parsed, if at hand)."""
        compiled = compile_spec(record.spec)
        return cls(
            id=record.id,
            spec_text=record.spec,
            spec=compiled.spec,
            program=compiled.program,
            state=json.loads(record.state) if state is None else state,
            overrides=[] if record.overrides == "[]" else json.loads(record.overrides),
            version=record.version,
            step=record.step,
            completed_step=record.completed_step,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def spec_document(self) -> dict[str, Any]:
        """The normalised spec as a JSON object."""
        document: dict[str, Any] = json.loads(self.spec_text)
        return document

    def values(self, start: int, count: int) -> Values:
        """Every group's values for ``[start, start + count)``: schedule, then overrides."""
        return evaluate(self.program, self.state, self.overrides, start, count)


# The hot paths' results are NamedTuples: a frozen dataclass costs microseconds to build.


class RunVersion(NamedTuple):
    """What identifies a run's values: ``(version, created_at)``; and its current step."""

    version: int
    created_at: str
    step: int | None


class StepValues(NamedTuple):
    run_id: str
    step: int
    version: int
    groups: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Window:
    run_id: str
    start: int
    count: int
    version: int
    values: Values


class ReportOutcome(NamedTuple):
    """A report's effect and the step's status, with the values from ``step + 1``."""

    run_id: str
    step: int
    rank: int
    complete: bool
    reported_ranks: int
    version: int
    decision: dict[str, Any] | None
    """The step's decision once complete (``None`` before)."""
    groups: dict[str, dict[str, float]]
    """Every group's values at ``step + 1``."""
    duplicate: bool
    completed_now: bool


@dataclass(frozen=True)
class Sampled:
    """Values at chosen steps (a decimated curve or preview)."""

    count: int
    steps: list[int] | None
    """``None`` for a dense window (every step from ``start``)."""
    groups: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class CurveValues:
    run_id: str
    version: int
    start: int
    stop: int
    steps: list[int]
    groups: dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class MetricPoint:
    step: int
    rank: int
    value: float | None


@dataclass(frozen=True)
class MetricHistory:
    run_id: str
    name: str
    points: list[MetricPoint]
    aggregate: list[tuple[int, float | None]]
    """``(step, value)`` the metric-driven nodes saw, per completed step."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]


# -- transactions (blocking; any thread) -------------------------------------------------


@dataclass
class ReportResult:
    """What :func:`report` did, as stored at commit."""

    run: RunRecord
    step: int
    rank: int
    complete: bool
    reported_ranks: int
    decision: dict[str, Any] | None
    duplicate: bool = False
    completed_now: bool = False
    state: dict[str, Any] | None = None
    """``run.state`` parsed (the caller's answer evaluates with it; saves parsing it again)."""


def create_run(store: Store, run_id: str, spec: RunSpec) -> tuple[RunRecord, bool]:
    """Create the run, or return the existing one when its normalised spec is the same.

    Raises :class:`RunConflict` for an existing id with another spec, and lets the engine's
    ``SpecError`` through for a spec that cannot be compiled (nothing is written then).
    """
    text = spec.normalised()
    compiled = compile_spec(text)
    record = RunRecord(id=run_id, spec=text, state=dumps(compiled.program.initial_state()))
    stored, created = store.create_run(record, {"world_size": spec.world_size})
    if not created and stored.spec != text:
        raise RunConflict(
            f"run {run_id!r} already exists with a different spec; delete it first or use "
            "another id"
        )
    return stored, created


def report(
    store: Store, run_id: str, step: int, rank: int, values: Mapping[str, float | None]
) -> ReportResult:
    """Record one rank's report; when it completes the step, observe and decide.

    One transaction with the run locked. The report row is inserted first (unless its key
    exists): for a run with one rank that answers "did this rank report this step?" without
    a read, and a refused report rolls the insert back with everything else. Every read in
    here uses the transaction's own connection (a second pooled one could starve the pool).
    """
    values_text = canonical_values(values)
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        compiled = compile_spec(run.spec)
        check_rank(compiled, rank)
        inserted = tx.insert_report_if_absent(ReportRow(step, rank, values_text, tx.now))
        if inserted and compiled.spec.world_size == 1:
            existing: list[tuple[int, str]] = []
        else:
            existing = [
                (r.rank, r.values) for r in tx.reports_at(step) if r.rank != rank or not inserted
            ]
        state = json.loads(run.state)
        plan: ReportPlan = plan_report(
            compiled, state, run.completed_step, step, rank, values_text, existing
        )
        if plan.duplicate:
            decision = None
            if plan.complete:
                event = tx.event_at("report_completed", step)
                if event is not None:
                    decision = json.loads(event.data).get("decision")
            return ReportResult(
                run,
                step,
                rank,
                plan.complete,
                plan.reported_ranks,
                decision,
                duplicate=True,
                state=state,
            )
        assert inserted  # plan_report refuses a different report for an existing key
        run.step = step if run.step is None else max(run.step, step)
        run.version += 1
        if plan.completes_now:
            assert plan.new_state is not None and plan.decision is not None
            state = plan.new_state
            run.state = dumps(state)
            run.completed_step = step
            tx.add_event(
                "report_completed",
                step,
                {
                    "aggregate": plan.aggregate,
                    "ranks": plan.reported_ranks,
                    "decision": plan.decision,
                    "version": run.version,
                },
            )
            if plan.decision.get("reduced"):
                tx.add_event(
                    "reduced",
                    step,
                    {"applies_from": step + 1, "nodes": plan.decision.get("nodes", [])},
                )
        tx.save()
        return ReportResult(
            run,
            step,
            rank,
            plan.complete,
            plan.reported_ranks,
            plan.decision,
            completed_now=plan.completes_now,
            state=state,
        )


def step_status(
    store: Store, run_id: str, step: int
) -> tuple[RunRecord, bool, int, dict[str, Any] | None]:
    """(run, complete, reported ranks, decision) of ``step`` as stored now."""
    run = store.get_run(run_id)
    if run is None:
        raise RunNotFound(run_id)
    compiled = compile_spec(run.spec)
    event = store.event_at(run_id, "report_completed", step)
    if event is not None:
        data = json.loads(event.data)
        return run, True, int(data.get("ranks", compiled.spec.world_size)), data.get("decision")
    return run, False, store.count_reports(run_id, step), None


def add_override(store: Store, run_id: str, change: OverrideChange) -> RunRecord:
    """Record an operator override (audited as an ``override`` event; bumps the version)."""
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        override = make_override(compile_spec(run.spec).program, change, utcnow())
        overrides = json.loads(run.overrides)
        overrides.append(override)
        run.overrides = dumps(overrides)
        run.version += 1
        tx.add_event("override", change.from_step, {**override, "version": run.version})
        tx.save()
        return run


def delete_run(store: Store, run_id: str) -> None:
    if not store.delete_run(run_id):
        raise RunNotFound(run_id)


def sample(
    window: Callable[[int, int], Values], start: int, stop: int, points: int | None
) -> Sampled:
    """Every step of ``[start, stop)``, or at most about ``points`` of them (min/max per
    bucket, so no change point is smoothed away)."""
    if points is None:
        values = window(start, stop - start)
        groups = {g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()}
        return Sampled(stop - start, None, groups)
    steps, groups = decimate(window, start, stop, points)
    return Sampled(len(steps), steps, groups)


async def preview(
    spec: ScheduleSpec,
    start: int,
    count: int | None,
    points: int | None,
    stop: int | None,
    max_span: int,
) -> Sampled:
    """A spec's values without a run: ``count`` steps from ``start`` (default 100), or about
    ``points`` steps of ``[start, stop)`` (a span of at most ``max_span``)."""
    if points is not None and count is not None:
        raise InvalidArgument(("points",), "give either count or points with stop")
    if stop is not None and points is None:
        raise InvalidArgument(("points",), "stop needs points")
    if points is not None and stop is None:
        raise InvalidArgument(("stop",), "points needs stop")
    program = Program(spec)
    state = program.initial_state()

    def window(a: int, n: int) -> Values:
        return program.evaluate(state, start=a, count=n)

    if points is not None:
        assert stop is not None
        check_span(start, stop, max_span)
        return await to_thread.run_sync(sample, window, start, stop, points)
    n = 100 if count is None else count
    return await to_thread.run_sync(sample, window, start, start + n, None)


def check_span(start: int, stop: int, max_span: int) -> None:
    if stop <= start:
        raise InvalidArgument(("stop",), f"stop ({stop}) must be greater than start ({start})")
    if stop - start > max_span:
        raise InvalidArgument(
            ("stop",), f"a curve spans at most {max_span} steps (asked {stop - start})"
        )


# -- the application service -------------------------------------------------------------

# Pauses before retrying an inline write whose lock was taken (7.5 ms in all), then a thread.
_INLINE_RETRY_DELAYS = (0.0, 0.0005, 0.001, 0.002, 0.004)


class Runs:
    """Every use case of lrserve over one store, as the HTTP layer calls them.

    ``max_wait_seconds`` caps a report's ``wait``; ``wait_poll_seconds`` is how often a waiting
    report looks at the database (the completing report may reach another worker or replica,
    so a process-local event would not do); ``max_curve_span`` caps a curve's or preview's
    range of steps.
    """

    def __init__(
        self,
        store: Store,
        *,
        cache: ValuesCache | None = None,
        max_wait_seconds: float = 300.0,
        wait_poll_seconds: float = 0.02,
        max_curve_span: int = 10_000_000,
    ) -> None:
        self.store = store
        self.cache = cache if cache is not None else ValuesCache()
        self.max_wait_seconds = max_wait_seconds
        self.wait_poll_seconds = wait_poll_seconds
        self.max_curve_span = max_curve_span

    # -- where calls run ------------------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read: on the event loop when the store's reads never wait, else in a thread."""
        if self.store.inline_reads:
            return fn(*args)
        return await to_thread.run_sync(fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """A write that never waits for a lock on the event loop.

        Where the store can fail fast (SQLite), the write is tried inline first; if the lock
        is taken it raised :class:`WouldBlock` before writing anything. The loop then sleeps a
        little and tries again (the lock is usually held for a short commit or checkpoint),
        and only then makes the same call in a worker thread, where waiting is harmless.
        Going to a thread at the first refusal cascaded: a thread's write holds the lock
        longer, so more inline writes were refused and the whole stream moved to threads.
        """
        store = self.store
        if store.inline_writes:
            for delay in _INLINE_RETRY_DELAYS:
                if delay:
                    await anyio.sleep(delay)
                try:
                    with store.nowait():
                        return fn(*args)
                except WouldBlock:
                    pass
        return await to_thread.run_sync(fn, *args)

    # -- runs -----------------------------------------------------------------------------

    async def create(self, run_id: str, spec: RunSpec) -> tuple[Run, bool]:
        """Create a run idempotently; ``(run, created)``."""
        record, created = await self._write(create_run, self.store, run_id, spec)
        return Run.of(record), created

    async def get(self, run_id: str) -> Run:
        record = await self._read(self.store.get_run, run_id)
        if record is None:
            raise RunNotFound(run_id)
        return Run.of(record)

    async def list_runs(self, limit: int, after: str | None) -> tuple[list[RunSummary], bool]:
        """Up to ``limit`` runs by id after ``after``, and whether more follow."""
        rows = await self._read(self.store.list_runs, limit + 1, after)
        return rows[:limit], len(rows) > limit

    async def delete(self, run_id: str) -> None:
        await self._write(delete_run, self.store, run_id)

    async def add_override(self, run_id: str, change: OverrideChange) -> Run:
        return Run.of(await self._write(add_override, self.store, run_id, change))

    # -- reports ----------------------------------------------------------------------------

    async def report(
        self,
        run_id: str,
        step: int,
        rank: int,
        values: Mapping[str, float | None],
        wait: float = 0.0,
    ) -> ReportOutcome:
        """Record a report; with ``wait`` (seconds), answer once the step is complete or the
        wait is over. The outcome carries every group's values at ``step + 1``."""
        result = await self._write(report, self.store, run_id, step, rank, values)
        run, complete, ranks, decision = (
            result.run,
            result.complete,
            result.reported_ranks,
            result.decision,
        )
        if not complete and wait > 0:
            status = await self._wait_for_step(run_id, step, min(wait, self.max_wait_seconds))
            if status is not None:
                run, complete, ranks, decision = status
        if complete and decision is None:
            run, complete, ranks, decision = await self._read(step_status, self.store, run_id, step)
        # The state parsed by the report is the stored one unless a wait re-read the run.
        state = result.state if run is result.run and result.state is not None else None
        groups = at_step(
            evaluate(
                compile_spec(run.spec).program,
                json.loads(run.state) if state is None else state,
                [] if run.overrides == "[]" else json.loads(run.overrides),
                step + 1,
                1,
            )
        )
        return ReportOutcome(
            run_id=run_id,
            step=step,
            rank=rank,
            complete=complete,
            reported_ranks=ranks,
            version=run.version,
            decision=decision if complete else None,
            groups=groups,
            duplicate=result.duplicate,
            completed_now=result.completed_now,
        )

    async def _wait_for_step(
        self, run_id: str, step: int, timeout: float
    ) -> tuple[RunRecord, bool, int, dict[str, Any] | None] | None:
        """The step's status once it completes within ``timeout``, else ``None``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await anyio.sleep(min(self.wait_poll_seconds, max(0.0, deadline - time.monotonic())))
            exists, completed = await self._read(self.store.completed_step, run_id)
            if not exists:
                raise RunNotFound(run_id)
            if completed is not None and completed >= step:
                return await self._read(step_status, self.store, run_id, step)
        return None

    # -- values -----------------------------------------------------------------------------

    async def version(self, run_id: str) -> RunVersion:
        """The run's ``(version, created_at, step)``: one cheap indexed read."""
        store = self.store
        if store.inline_reads:  # (the hot path: one coroutine less than _read)
            current = store.run_version(run_id)
        else:
            current = await to_thread.run_sync(store.run_version, run_id)
        if current is None:
            raise RunNotFound(run_id)
        return RunVersion(*current)

    async def values_at(self, run_id: str, step: int, known: RunVersion) -> StepValues:
        """Every group's values at ``step``, for the run as of ``known`` (or newer: the run is
        read again on a cache miss, and the answer names the version it was computed for)."""
        first = step - step % BLOCK
        values = self.cache.get((run_id, known.created_at, known.version, first))
        version = known.version
        if values is None:
            run = await self.get(run_id)
            values = run.values(first, min(BLOCK, MAX_STEP - first))
            version = run.version
            self.cache.put((run_id, run.created_at, version, first), values)
        i = step - first
        groups = {g: {f: float(a[i]) for f, a in fields.items()} for g, fields in values.items()}
        return StepValues(run_id, step, version, groups)

    async def window(self, run_id: str, start: int, count: int, known: RunVersion) -> Window:
        """Every group's values for ``[start, start + count)`` (see :meth:`values_at`)."""
        key = (run_id, known.created_at, known.version, start, count)
        values = self.cache.get(key)
        version = known.version
        if values is None:
            run = await self.get(run_id)
            if count * _series(run) > HEAVY_VALUES:
                values = await to_thread.run_sync(run.values, start, count)
            else:
                values = run.values(start, count)
            version = run.version
            self.cache.put((run_id, run.created_at, version, start, count), values)
        return Window(run_id, start, count, version, values)

    async def curve(self, run_id: str, start: int, stop: int | None, points: int) -> CurveValues:
        """Values over ``[start, stop)`` decimated to about ``points`` steps; ``stop``
        defaults to ``max(1000, step + 1)``."""
        run = await self.get(run_id)
        stop = max(1000, (run.step or 0) + 1) if stop is None else stop
        check_span(start, stop, self.max_curve_span)
        # Up to millions of steps of numpy work: off the event loop.
        sampled = await to_thread.run_sync(sample, run.values, start, stop, points)
        assert sampled.steps is not None
        return CurveValues(run_id, run.version, start, stop, sampled.steps, sampled.groups)

    # -- history ----------------------------------------------------------------------------

    async def metric_history(self, run_id: str, name: str) -> MetricHistory:
        """Every report's value of ``name`` and the aggregate each completed step saw."""
        return await to_thread.run_sync(self._metric_history, run_id, name)

    def _metric_history(self, run_id: str, name: str) -> MetricHistory:
        store = self.store
        if store.run_version(run_id) is None:
            raise RunNotFound(run_id)
        points = []
        for r in store.reports(run_id):
            values = json.loads(r.values)
            if name in values:
                points.append(MetricPoint(r.step, r.rank, _number(values[name])))
        aggregate = []
        for e in store.events_of_type(run_id, "report_completed"):
            agg = json.loads(e.data).get("aggregate", {})
            if name in agg and e.step is not None:
                aggregate.append((e.step, _number(agg[name])))
        return MetricHistory(run_id, name, points, aggregate)

    async def events(self, run_id: str, after: int, limit: int) -> list[Event]:
        """The run's events with ``seq > after``, oldest first, at most ``limit``."""
        if await self._read(self.store.run_version, run_id) is None:
            raise RunNotFound(run_id)
        rows = await self._read(self.store.events, run_id, after, limit)
        return [Event(e.seq, e.type, e.step, e.at, json.loads(e.data)) for e in rows]


def _series(run: Run) -> int:
    return sum(len(fields) for fields in run.program.fields.values())


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "BLOCK",
    "CurveValues",
    "Event",
    "MetricHistory",
    "MetricPoint",
    "ReportOutcome",
    "Run",
    "RunVersion",
    "Runs",
    "Sampled",
    "StepValues",
    "Window",
    "add_override",
    "create_run",
    "delete_run",
    "preview",
    "report",
    "step_status",
]
