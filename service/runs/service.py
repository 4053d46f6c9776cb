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

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache, partial
from typing import Any, NamedTuple, TypeVar, cast

import anyio
from anyio import to_thread

from service.runs.curve import decimate, decimate_sampled
from service.runs.errors import InvalidArgument, RewindConflict, RunConflict, RunNotFound
from service.runs.gcpause import gc_paused
from service.runs.groupcommit import GroupWriter
from service.runs.listing import (
    DEFAULT_IDLE_AFTER,
    Status,
    active_since,
    derive,
    run_horizon,
    run_status,
    run_tags,
)
from service.runs.model import (
    AmendmentChange,
    OverrideChange,
    ReportPlan,
    RewindChange,
    RunSpec,
    Values,
    amendment_key,
    at_step,
    canonical_values,
    check_not_too_late,
    check_rank,
    compile_run,
    compile_spec,
    evaluate,
    lease_end,
    make_amendment,
    make_override,
    plan_report,
    stored_amendment_key,
    withdraw_override,
)
from service.runs.range_test import RangeTestCurveValues, range_test_curve, report_stop
from service.runs.repository import (
    ReportRow,
    RunPulse,
    RunQuery,
    RunRecord,
    RunSummary,
    RunTx,
    Store,
    StoreBusy,
    WouldBlock,
    dumps,
    utcnow,
)
from service.runs.states import full_state, load_in, read_state, save_in
from service.runs.timeline import Timeline
from service.runs.values import ValuesCache
from service.schedules import Program, ScheduleSpec
from service.schedules.base import MAX_STEP
from service.schedules.cost import (
    INLINE_WORK,
    WORK_BUDGET,
    WorkLimitExceeded,
    check_work,
)

T = TypeVar("T")

BLOCK = 1024
"""Steps per cached block for one-step reads: a block costs about what one step costs, and a
trainer asks for step after step while every rank asks for the same one."""

MAX_WINDOW_VALUES = 1 << 20
"""Most values (steps x series) one window, preview or curve answers: bounds a body to about
25 MB and the request's memory to about 150 MB (see docs/operations.md)."""
MAX_HEAVY = 2
"""Evaluations over ``INLINE_WORK`` run in worker threads, at most this many at once (the
others wait for one): what bounds the memory of expensive requests together."""
MIN_GUARANTEED_WINDOW = 256
"""Every accepted spec answers a window of this many steps at step 0 within the budget."""
MIN_GUARANTEED_STEP = 1 << 20
"""... and a single step at any step below this one (a recursion's cost grows with the step)."""
MAX_SPEC_NODES = 4096
"""Most schedule nodes one spec (every part together) may have."""


def check_values(series: int, count: int, what: str) -> None:
    """Refuse an answer of more than ``MAX_WINDOW_VALUES`` values (``count`` steps of
    ``series`` series), naming the largest count that fits."""
    if count * series > MAX_WINDOW_VALUES:
        fits = max(1, MAX_WINDOW_VALUES // max(series, 1))
        raise WorkLimitExceeded(
            what,
            "values",
            count * series,
            MAX_WINDOW_VALUES,
            f"the run has {series} series (groups x fields): ask for count <= {fits}",
            fits,
        )


def check_spec_limits(
    program: Program, budget: int = WORK_BUDGET, horizon: int | None = None
) -> None:
    """Refuse a spec that an accepted run could not serve within the work budget: more than
    ``MAX_SPEC_NODES`` nodes, a ``MIN_GUARANTEED_WINDOW``-step window over the budget, or a
    recursion whose single step at ``MIN_GUARANTEED_STEP`` (or at the run's ``horizon``, when
    it names an earlier end) is over it.

    A run that says how long it trains (``metadata.total_steps``, or a schedule with an end)
    is held to its own length: a ChainedScheduler that scans is accepted for the steps it will
    be asked for, and a request past its end is refused when it comes, with the same message.
    """
    if program.nodes > MAX_SPEC_NODES:
        raise WorkLimitExceeded(
            "this spec",
            "spec nodes",
            program.nodes,
            MAX_SPEC_NODES,
            "split the schedule, or write repeated children as one node (StepLR with a "
            "smaller gamma, MultiStepLR with its milestones)",
        )
    window = MIN_GUARANTEED_WINDOW
    check_work(program, 0, window, budget, f"a {window}-step window of this spec")
    guaranteed = MIN_GUARANTEED_STEP if horizon is None else min(MIN_GUARANTEED_STEP, horizon)
    last = max(guaranteed - 1, 0)
    try:
        check_work(program, last, 1, budget, "one step")
    except WorkLimitExceeded as exc:
        raise WorkLimitExceeded(
            f"one step at step {last:,} of this spec",
            exc.limit,
            exc.amount,
            exc.maximum,
            "it is evaluated step by step from the start (MultiplicativeLR, or a "
            "ChainedScheduler with a child that adds to the lr): set metadata.total_steps to "
            "the run's length when it is shorter, use fewer groups, a shorter expression or a "
            "closed-form schedule, or raise the server's LRSERVE_MAX_REQUEST_WORK",
        ) from None


# -- domain values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A run as the use cases see it: the spec compiled, state and overrides parsed."""

    id: str
    spec_text: str
    """The normalised spec (canonical JSON): also the idempotency key."""
    spec: RunSpec
    schedule: Timeline
    """The whole schedule: the spec's program and the amendments."""
    state: dict[str, Any]
    overrides: list[dict[str, Any]]
    amendments: list[dict[str, Any]]
    rewinds: list[dict[str, Any]]
    version: int
    step: int | None
    completed_step: int | None
    leased_until: int
    branch: int
    created_at: str
    updated_at: str
    last_report_at: str | None = None
    values_version: int = 1
    """Changes only when the values change (what window and GET lr ETags name)."""
    heartbeat_at: str | None = None
    heartbeat_step: int | None = None
    finished: bool = False
    """A heartbeat said the job finished (see :func:`~service.runs.listing.run_status`)."""
    horizon: int | None = None
    tags: tuple[str, ...] = ()
    active_since: str = ""
    """Activity at or after this makes the run ``running`` (``Runs`` sets it when it reads the
    run; empty: the default ``idle_after`` from now)."""

    @property
    def status(self) -> Status:
        """``running``, ``idle`` or ``finished`` (:func:`~service.runs.listing.run_status`)."""
        since = self.active_since or active_since(datetime.now(timezone.utc), DEFAULT_IDLE_AFTER)
        return run_status(
            finished=self.finished,
            horizon=self.horizon,
            completed_step=self.completed_step,
            last_report_at=self.last_report_at,
            heartbeat_at=self.heartbeat_at,
            active_since=since,
        )

    @classmethod
    def of(
        cls, record: RunRecord, state: dict[str, Any] | None = None, active_since: str = ""
    ) -> Run:
        """The run of a stored row (``state``: the row's state already parsed, if at hand)."""
        return cls(
            id=record.id,
            spec_text=record.spec,
            spec=compile_spec(record.spec).spec,
            schedule=compile_run(record.spec, record.amendments),
            state=full_state(record) if state is None else state,
            overrides=_list(record.overrides),
            amendments=_list(record.amendments),
            rewinds=_list(record.rewinds),
            version=record.version,
            values_version=record.values_version,
            step=record.step,
            completed_step=record.completed_step,
            leased_until=record.leased_until,
            branch=record.branch,
            created_at=record.created_at,
            updated_at=record.updated_at,
            last_report_at=record.last_report_at,
            heartbeat_at=record.heartbeat_at,
            heartbeat_step=record.heartbeat_step,
            finished=record.finished,
            horizon=run_horizon(record.spec, record.amendments),
            tags=tuple(run_tags(compile_spec(record.spec).spec.metadata)),
            active_since=active_since,
        )

    def spec_document(self) -> dict[str, Any]:
        """The normalised spec as a JSON object."""
        document: dict[str, Any] = json.loads(self.spec_text)
        return document

    def values(self, start: int, count: int) -> Values:
        """Every group's values for ``[start, start + count)``: schedule, then overrides."""
        return evaluate(self.schedule, self.state, self.overrides, start, count)


def _list(text: str) -> list[dict[str, Any]]:
    return [] if text == "[]" else list(json.loads(text))


# The hot paths' results are NamedTuples: a frozen dataclass costs microseconds to build.


class RunVersion(NamedTuple):
    """What identifies a run's values: ``(version, created_at)``, where ``version`` is the
    run's *values* version (``values_version``: it changes only when values change, not on
    a partial report); its current step, and how far trainers have been handed values
    (``leased_until``, exclusive)."""

    version: int
    created_at: str
    step: int | None
    leased_until: int = 0


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
    stop: bool = False
    """A range test is finished at ``step`` (diverged, or its last step): trainers stop."""
    values_version: int | None = None
    """The run's values version with this answer: a trainer whose window carries it keeps it."""


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
class ChangePreview:
    """A dry run of a change: the run before and as the change would leave it, and its
    curve over the same steps before and after."""

    before: Run
    after: Run
    before_curve: CurveValues
    after_curve: CurveValues


@dataclass(frozen=True)
class MetricPoint:
    step: int
    rank: int
    value: float | None
    branch: int = 0
    """The run's branch when the report arrived (the number of rewinds before it)."""
    abandoned_by: int = 0
    """0 for a point on the run's timeline; else the rewind that set it aside."""


@dataclass(frozen=True)
class MetricHistory:
    run_id: str
    name: str
    points: list[MetricPoint]
    """The reports on the run's timeline, by step and rank."""
    aggregate: list[tuple[int, float | None, int]]
    """``(step, value, branch)`` the metric-driven nodes saw, per completed step."""
    abandoned: list[MetricPoint]
    """Reports that rewinds set aside (an abandoned branch), by rewind, step and rank."""
    next_after_step: int | None = None
    """More steps follow: ask again with this ``after_step`` (``None``: this is the end)."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    step: int | None
    at: str
    data: dict[str, Any]
    branch: int = 0
    abandoned_by: int = 0


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
    next_groups: dict[str, dict[str, float]] | None = None
    """The values at ``step + 1`` once an answer computed them (every waiter woken by this
    completion answers with them: evaluated once, not once per rank)."""


def create_run(
    store: Store, run_id: str, spec: RunSpec, max_work: int = WORK_BUDGET
) -> tuple[RunRecord, bool]:
    """Create the run, or return the existing one when its normalised spec is the same.

    A spec an accepted run could not serve within ``max_work`` is refused first
    (:class:`WorkLimitExceeded`, see :func:`check_spec_limits`).

    Raises :class:`RunConflict` for an existing id with another spec, and lets the engine's
    ``SpecError`` through for a spec that cannot be compiled (nothing is written then).
    """
    text = spec.normalised()
    compiled = compile_spec(text)
    derived = derive(run_id, text)
    check_spec_limits(compiled.program, max_work, derived.horizon)
    record = RunRecord(
        id=run_id,
        spec=text,
        state=dumps(compiled.program.initial_state()),
        horizon=derived.horizon,
        tags=dumps(derived.tags),
        search=derived.search,
        metadata=derived.metadata,
    )
    stored, created = store.create_run(record, {"world_size": spec.world_size})
    if not created and stored.spec != text:
        raise RunConflict(
            f"run {run_id!r} already exists with a different spec; delete it first or use "
            "another id"
        )
    return (stored if created else read_state(store, stored)), created


def report(
    store: Store,
    run_id: str,
    step: int,
    rank: int,
    values: Mapping[str, float | None],
    max_work: int = WORK_BUDGET,
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
        # The answer carries the values of step + 1: refused before anything is written. (A
        # schedule without a recursion costs the same at every step: PUT checked that.)
        schedule = compile_run(run.spec, run.amendments)
        if schedule.recursive:
            check_work(schedule, step + 1, 1, max_work, "one step")
        inserted = tx.insert_report_if_absent(
            ReportRow(step, rank, values_text, tx.now, run.branch)
        )
        world_size = compiled.spec.world_size
        # The step's count is kept incrementally: a partial report reads no other rank's row
        # (with N ranks, reading them made a step cost O(N^2)). Only the completing report
        # reads the step's rows, once, to aggregate them; a repeated key reads them to
        # answer as the first time did.
        counted = tx.count_step_report(step) if inserted and world_size > 1 else 1
        existing: list[tuple[int, str]] = []
        if not inserted or counted >= world_size > 1:
            existing = [
                (r, text) for r, text in tx.rank_values_at(step) if r != rank or not inserted
            ]
        state = load_in(tx)
        plan: ReportPlan = plan_report(
            compiled,
            schedule,
            state,
            run.completed_step,
            step,
            rank,
            values_text,
            existing,
        )
        if inserted and not plan.complete:
            # plan_report saw this rank alone (and refused a stale step): the count is kept.
            plan = dataclasses.replace(plan, reported_ranks=counted)
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
        # The run list's columns, in the same row write (service/runs/listing.py).
        run.last_report_at = tx.now
        if run.finished and step > (-1 if run.finished_step is None else run.finished_step):
            run.finished = False  # the job went on past the step it said it finished at
        if run.metric_names is not None and values:
            known = _metric_names(run.metric_names)
            if not known.issuperset(values):
                run.metric_names = dumps(sorted(known.union(values)))
        # The answer hands out the values of step + 1: they are leased like a window's.
        run.leased_until = max(run.leased_until, step + 2)
        if plan.completes_now:
            assert plan.new_state is not None and plan.decision is not None
            if plan.decision.get("reduced") or _reductions(plan.new_state) != _reductions(state):
                # The values changed from step + 1 on: cached windows are stale now.
                run.values_version += 1
            state = plan.new_state
            save_in(tx, state)
            run.completed_step = step
            tx.announce_completed(step)
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


@lru_cache(maxsize=4096)
def _metric_names(text: str) -> frozenset[str]:
    """A stored ``metric_names`` text parsed (cached: a run's changes only with a new name,
    and every report asks whether its names are known)."""
    return frozenset(json.loads(text))


def _reductions(state: Mapping[str, Any]) -> list[int]:
    """What of a program state the values depend on, in short: how many reductions each
    metric-driven node has decided (its value changes only through them, see
    ``MetricCurve``, and they are only ever appended). Counters like ``best`` or
    ``num_bad_epochs`` change no value, so a completion that only moves them keeps every
    trainer's window valid."""
    return [
        len(node.get("reductions", ())) if isinstance(node, dict) else -1 for node in state.values()
    ]


def read_run(store: Store, run_id: str) -> RunRecord | None:
    """The run as stored, its whole state read (``None`` when it does not exist)."""
    record = store.get_run(run_id)
    return None if record is None else read_state(store, record)


def step_status(
    store: Store, run_id: str, step: int
) -> tuple[RunRecord, bool, int, dict[str, Any] | None]:
    """(run, complete, reported ranks, decision) of ``step`` as stored now."""
    run = read_run(store, run_id)
    if run is None:
        raise RunNotFound(run_id)
    compiled = compile_spec(run.spec)
    event = store.event_at(run_id, "report_completed", step)
    if event is not None:
        data = json.loads(event.data)
        return run, True, int(data.get("ranks", compiled.spec.world_size)), data.get("decision")
    return run, False, store.count_reports(run_id, step), None


def add_override(store: Store, run_id: str, change: OverrideChange) -> RunRecord:
    """Record an operator override (audited as an ``override`` event; bumps the version).

    Refused with :class:`TooLate` from a step a trainer may already have been handed.
    """
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        overrides = json.loads(run.overrides)
        schedule = compile_run(run.spec, run.amendments)
        override = make_override(schedule, change, tx.now, n=len(overrides) + 1)
        check_not_too_late("an override", change.from_step, run.leased_until)
        overrides.append(override)
        run.overrides = dumps(overrides)
        run.version += 1
        run.values_version += 1
        tx.add_event("override", change.from_step, {**override, "version": run.version})
        tx.save()
        load_in(tx)  # the answer shows the whole run
        return run


def remove_override(
    store: Store, run_id: str, n: int, from_step: int | None
) -> tuple[RunRecord, dict[str, Any]]:
    """Withdraw override ``n`` from ``from_step`` (default: the earliest guaranteed step);
    an ``override_withdrawn`` event. Returns the run and the withdrawn override."""
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        overrides = json.loads(run.overrides)
        for i, ov in enumerate(overrides):
            ov.setdefault("n", i + 1)  # overrides stored before they were numbered
        ov = withdraw_override(overrides, n, from_step, run.leased_until, tx.now)
        run.overrides = dumps(overrides)
        run.version += 1
        run.values_version += 1
        tx.add_event(
            "override_withdrawn",
            int(ov["until_step"]),
            {"n": n, "from_step": int(ov["until_step"]), "version": run.version},
        )
        tx.save()
        load_in(tx)
        return run, ov


def add_amendment(store: Store, run_id: str, change: AmendmentChange) -> tuple[RunRecord, bool]:
    """Amend the run's schedule from ``change.from_step`` on; ``(run, created)``.

    The same change again (same step and content) is answered with the run as it is and
    writes nothing. Otherwise refused with :class:`TooLate` from a step a trainer may already
    have been handed, or :class:`InvalidArgument` / ``SpecError`` when it does not compile.
    """
    key = amendment_key(change)
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        state = load_in(tx)
        amendments = json.loads(run.amendments)
        if any(stored_amendment_key(a) == key for a in amendments):
            return run, False
        check_not_too_late("an amendment", change.from_step, run.leased_until)
        compiled = compile_spec(run.spec)
        amendment = make_amendment(
            compiled.spec, compiled.program, amendments, state, change, tx.now
        )
        amendments.append(amendment)
        run.amendments = dumps(amendments)
        amended = compile_run(run.spec, run.amendments)
        # The amended run must serve what an accepted spec serves (refused before saving).
        horizon = run_horizon(run.spec, run.amendments)
        check_spec_limits(amended.programs()[-1], horizon=horizon)
        # The new parts' metric-driven nodes start fresh.
        save_in(tx, {**amended.initial_state(), **state})
        run.horizon = horizon
        run.version += 1
        run.values_version += 1
        tx.add_event(
            "amended",
            change.from_step,
            {
                "n": amendment["n"],
                "from_step": change.from_step,
                "parts": sorted(k for k in change.parts if change.parts[k] is not None),
                "restart": change.restart,
                "base": change.base,
                "note": change.note,
                "version": run.version,
            },
        )
        tx.save()
        return run, True


def rewind(store: Store, run_id: str, change: RewindChange) -> tuple[RunRecord, bool]:
    """Take the run back to how it was when ``change.to_step`` completed; ``(run, rewound)``.

    Reports after ``to_step`` are set aside (kept, readable, as the abandoned branch) with the
    decisions they caused; the metric-driven state is replayed from the completed steps that
    remain; overrides and amendments stay. A ``key`` already used answers with the run as it
    is (``rewound`` false); the same key for another step is a :class:`RewindConflict`.
    """
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        load_in(tx)  # also what the answer shows when the key was used before
        rewinds = json.loads(run.rewinds)
        if change.key is not None:
            for done in rewinds:
                if done.get("key") != change.key:
                    continue
                if int(done["to_step"]) != change.to_step:
                    raise RewindConflict(
                        f"rewind key {change.key!r} was used for a rewind to step "
                        f"{done['to_step']}, not {change.to_step}; use another key"
                    )
                return run, False
        if run.step is None or change.to_step > run.step:
            raise InvalidArgument(
                ("to_step",),
                f"the run has not reached step {change.to_step} (its highest reported step is "
                f"{run.step}); nothing to rewind",
            )
        number = run.branch + 1
        moved = tx.set_aside_after(change.to_step, number)
        schedule = compile_run(run.spec, run.amendments)
        state = schedule.initial_state()
        completed: int | None = None
        for event in tx.completed_after_rewind():
            assert event.step is not None and event.step <= change.to_step
            state, _ = schedule.observe(state, event.step, json.loads(event.data)["aggregate"])
            completed = event.step
        from_step = run.step
        run.completed_step = completed
        run.step = tx.highest_report_step()
        run.branch = number
        # The replayed reductions are rewritten as the new branch's rows.
        save_in(tx, state, rewrite=True)
        # The resumed job takes values from to_step on; the abandoned branch's leases end.
        run.leased_until = change.to_step + 1
        # A job resumed from a checkpoint is not finished, whatever it said before.
        run.finished = False
        run.version += 1
        run.values_version += 1
        record = {
            "n": number,
            "key": change.key,
            "to_step": change.to_step,
            "from_step": from_step,
            "note": change.note,
            "reports_set_aside": moved,
            "at": tx.now,
        }
        rewinds.append(record)
        run.rewinds = dumps(rewinds)
        tx.add_event(
            "rewound",
            change.to_step,
            {**{k: v for k, v in record.items() if k != "at"}, "version": run.version},
        )
        tx.save()
        return run, True


def extend_lease(
    store: Store, run_id: str, until: int, count: int = 1, max_work: int | None = None
) -> RunRecord:
    """Record that values up to ``until`` (exclusive) are being handed out (rounded up to the
    lease grain); changes from an earlier step are refused from now on. With ``max_work``,
    the ``count`` steps before ``until`` are checked against the work limits first: a
    window that will be refused leases nothing."""
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        if max_work is not None:
            schedule = compile_run(run.spec, run.amendments)
            what = "this window" if count > 1 else "one step"
            if count > 1:
                check_values(sum(len(f) for f in schedule.fields.values()), count, what)
            check_work(schedule, until - count, count, max_work, what, window=count > 1)
        if until > run.leased_until:
            run.leased_until = lease_end(until)
            tx.save_lease()
        return run


def _heartbeat(store: Store, run_id: str, rank: int, step: int | None, finished: bool) -> RunRecord:
    run = store.get_run(run_id)
    if run is None:
        raise RunNotFound(run_id)
    check_rank(compile_spec(run.spec), rank)
    record = store.heartbeat(run_id, utcnow(), step, finished)
    if record is None:
        raise RunNotFound(run_id)
    return read_state(store, record)


def delete_run(store: Store, run_id: str) -> None:
    if not store.delete_run(run_id):
        raise RunNotFound(run_id)


# -- dry runs ----------------------------------------------------------------------------


class _RolledBack(Exception):
    """Ends a dry run's transaction: the store rolls back everything it wrote."""

    def __init__(self, before: RunRecord, after: RunRecord) -> None:
        super().__init__("dry run")
        self.before = before
        self.after = after


class _DryRunStore:
    """A store whose write transactions always roll back (the one method a change uses)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextmanager
    def transaction(self, run_id: str) -> Iterator[RunTx | None]:
        with self._store.transaction(run_id) as tx:
            if tx is not None:
                load_in(tx)  # both records carry their state read inside the transaction
            before = None if tx is None else dataclasses.replace(tx.run)
            yield tx
            if tx is not None and before is not None:
                raise _RolledBack(before, tx.run)


@dataclass(frozen=True)
class OverrideWithdrawal:
    """Withdraw override ``n`` from ``from_step`` (``None``: the earliest guaranteed step)."""

    n: int
    from_step: int | None = None


Change = OverrideChange | OverrideWithdrawal | AmendmentChange | RewindChange
"""The operator changes of a live run (a dry run takes any of them)."""


def _transaction_of(change: Change) -> Callable[[Store, str], object]:
    """The transaction that makes ``change`` (its store and run id still to give)."""
    if isinstance(change, OverrideChange):
        return lambda store, run_id: add_override(store, run_id, change)
    if isinstance(change, OverrideWithdrawal):
        return lambda store, run_id: remove_override(store, run_id, change.n, change.from_step)
    if isinstance(change, AmendmentChange):
        return lambda store, run_id: add_amendment(store, run_id, change)
    return lambda store, run_id: rewind(store, run_id, change)


def dry_run(
    store: Store, run_id: str, change: Callable[[Store, str], object]
) -> tuple[RunRecord, RunRecord]:
    """``(before, after)``: the run as stored and as ``change`` (one of the transactions
    above, its other arguments bound) would leave it. The change runs exactly as it would,
    checks and refusals included, in a transaction that is then rolled back: nothing it wrote
    is kept."""
    try:
        change(cast(Store, _DryRunStore(store)), run_id)
    except _RolledBack as done:
        return done.before, done.after
    raise AssertionError("a change writes in exactly one transaction")


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


async def _evaluate(work: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inline when ``work`` is small (the hot path), else in :func:`heavy`."""
    if work <= INLINE_WORK:
        return fn(*args)
    return await heavy(fn, *args)


def check_span(start: int, stop: int, max_span: int) -> None:
    if stop <= start:
        raise InvalidArgument(("stop",), f"stop ({stop}) must be greater than start ({start})")
    if stop - start > max_span:
        raise InvalidArgument(
            ("stop",), f"a curve spans at most {max_span} steps (asked {stop - start})"
        )


# -- the application service -------------------------------------------------------------

SAFETY_POLL_SECONDS = 0.25
"""How often a waiting report on SQLite reads the database (see ``Runs._wait_for_step``)."""

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
        max_work: int = WORK_BUDGET,
        idle_after: float = 300.0,
    ) -> None:
        self.store = store
        self.cache = cache if cache is not None else ValuesCache()
        self.max_wait_seconds = max_wait_seconds
        self.wait_poll_seconds = wait_poll_seconds
        self.max_curve_span = max_curve_span
        self.max_work = max_work
        self.idle_after = idle_after
        """Seconds without a report or heartbeat after which a run is ``idle``."""
        self._derived = False
        self._deriving = anyio.Lock()
        # Reports arriving together share one SQLite transaction (service/runs/groupcommit.py).
        self._group = GroupWriter(store)
        self._listens: bool | None = None
        self._completions: dict[str, tuple[anyio.Event, ReportResult | None]] = {}
        """Per run with waiting reports: the event its next completion in this process sets,
        and the latest such completion (what woken waiters answer with, unread)."""

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
        record, created = await self._write(create_run, self.store, run_id, spec, self.max_work)
        return self._of(record), created

    async def get(self, run_id: str) -> Run:
        record = await self._read(read_run, self.store, run_id)
        if record is None:
            raise RunNotFound(run_id)
        return self._of(record)

    def active_since(self) -> str:
        """Activity at or after this time (stored format) makes a run ``running`` now."""
        return active_since(datetime.now(timezone.utc), self.idle_after)

    def _of(self, record: RunRecord) -> Run:
        return Run.of(record, active_since=self.active_since())

    def status(self, run: Run | RunSummary | RunPulse, since: str | None = None) -> Status:
        """The run's status now (``since``: :meth:`active_since`, when already taken)."""
        return run_status(
            finished=run.finished,
            horizon=run.horizon,
            completed_step=run.completed_step,
            last_report_at=run.last_report_at,
            heartbeat_at=run.heartbeat_at,
            active_since=self.active_since() if since is None else since,
        )

    async def list_runs(self, query: RunQuery) -> tuple[list[RunSummary], bool]:
        """Up to ``query.limit`` runs matching it (filters, order and status in SQL, with
        ``query.active_since`` the status threshold), and whether more follow."""
        await self._derive_old_runs()
        wider = dataclasses.replace(query, limit=query.limit + 1)
        # Up to 1000 rows with a LIKE scan: a worker thread, whatever the store.
        rows = await to_thread.run_sync(self.store.list_runs, wider)
        return rows[: query.limit], len(rows) > query.limit

    async def _derive_old_runs(self) -> None:
        """Fill the run list's columns of runs created before schema v3 (once per process)."""
        if self._derived:
            return
        async with self._deriving:
            while not self._derived:
                batch = await to_thread.run_sync(self.store.underived, 500)
                for run_id, spec_text, amendments in batch:
                    derived = derive(run_id, spec_text, amendments)
                    await to_thread.run_sync(self.store.set_derived, run_id, amendments, derived)
                self._derived = len(batch) < 500

    async def heartbeat(self, run_id: str, rank: int, step: int | None, finished: bool) -> Run:
        """Record that a trainer is alive (and, with ``finished``, done); the run's
        ``version`` does not change (trainers' cached windows stay valid)."""
        record = await self._write(_heartbeat, self.store, run_id, rank, step, finished)
        return self._of(record)

    async def pulse(self, run_id: str) -> RunPulse | None:
        """The cheap point read a live view polls (``None``: the run is gone)."""
        return await self._read(self.store.run_pulse, run_id)

    async def metric_names(self, run_id: str) -> list[str]:
        """Sorted names of every metric reported to the run."""
        # A run from before schema v3 reads them from its reports: off the loop.
        names = await to_thread.run_sync(self.store.metric_names, run_id)
        if names is None:
            raise RunNotFound(run_id)
        return names

    async def delete(self, run_id: str) -> None:
        await self._write(delete_run, self.store, run_id)
        # Its latest completion (a run record, its state) is no answer for anyone now.
        entry = self._completions.pop(run_id, None)
        if entry is not None:
            entry[0].set()  # waiters look again, and find the run gone

    async def add_override(self, run_id: str, change: OverrideChange) -> Run:
        return self._of(await self._write(add_override, self.store, run_id, change))

    async def withdraw_override(
        self, run_id: str, n: int, from_step: int | None
    ) -> tuple[Run, dict[str, Any]]:
        """Withdraw override ``n`` from ``from_step`` (default: the earliest guaranteed step)."""
        record, override = await self._write(remove_override, self.store, run_id, n, from_step)
        return self._of(record), override

    async def amend(self, run_id: str, change: AmendmentChange) -> tuple[Run, bool]:
        """Amend the schedule from a step on; ``(run, created)`` (idempotent)."""
        # Compiling the amendment (and, with base "current", evaluating the step before it)
        # may take milliseconds: always in a worker thread.
        record, created = await to_thread.run_sync(add_amendment, self.store, run_id, change)
        return self._of(record), created

    async def rewind(self, run_id: str, change: RewindChange) -> tuple[Run, bool]:
        """Take the run back to a step; ``(run, rewound)`` (idempotent by key)."""
        # Replays every completed step kept: a worker thread, however long the run.
        record, rewound = await to_thread.run_sync(rewind, self.store, run_id, change)
        return self._of(record), rewound

    async def dry_run(
        self, run_id: str, change: Change, start: int, stop: int | None, points: int
    ) -> ChangePreview:
        """What ``change`` would make of the run, and the curve over ``[start, stop)`` before
        and after (``stop`` as :meth:`curve`'s). Nothing is stored; a change that would be
        refused is refused the same way (the very transaction runs, then rolls back)."""
        if stop is not None:
            check_span(start, stop, self.max_curve_span)
        transaction = _transaction_of(change)
        before, after = await to_thread.run_sync(dry_run, self.store, run_id, transaction)
        old, new = self._of(before), self._of(after)
        stop = max(1000, (old.step or 0) + 1) if stop is None else stop
        check_span(start, stop, self.max_curve_span)
        curves = []
        for run in (old, new):
            check_work(run.schedule, start, stop - start, self.max_work, "this dry run's curve")
            sampled = await heavy(sample, run.values, start, stop, points)
            assert sampled.steps is not None
            steps, groups = sampled.steps, sampled.groups
            curves.append(CurveValues(run.id, run.version, start, stop, steps, groups))
        return ChangePreview(old, new, curves[0], curves[1])

    async def lease(
        self, run_id: str, known: RunVersion, start: int, count: int
    ) -> tuple[RunVersion, int]:
        """Lease the values of ``[start, start + count)`` before they are handed to a trainer.

        Returns the run's version as of the lease (a change committed before it is in that
        version, and none after it can start before the window's end) and how many of the
        steps may be served: all of them, or, while the database cannot take a new lease
        (busy), those the lease already covers. Raises :class:`StoreBusy` when it covers none.
        """
        until = start + count
        if until <= known.leased_until:
            return known, count
        try:
            record = await self._write(
                extend_lease, self.store, run_id, until, count, self.max_work
            )
        except StoreBusy:
            if known.leased_until <= start:
                raise StoreBusy(
                    f"the database is busy: values from step {known.leased_until} on cannot be "
                    "leased to a trainer right now"
                ) from None
            return known, known.leased_until - start
        version = RunVersion(
            record.values_version, record.created_at, record.step, record.leased_until
        )
        return version, count

    # -- reports ----------------------------------------------------------------------------

    async def report(
        self,
        run_id: str,
        step: int,
        rank: int,
        values: Mapping[str, float | None],
        wait: float = 0.0,
        abandoned: Callable[[], Awaitable[bool]] | None = None,
    ) -> ReportOutcome:
        """Record a report; with ``wait`` (seconds), answer once the step is complete or the
        wait is over. The outcome carries every group's values at ``step + 1``.

        ``abandoned`` (asked before every poll of a wait) ends the wait early when it says
        True: the client went away, so nobody would read the answer.
        """
        args = (self.store, run_id, step, rank, values, self.max_work)
        # A waiting report subscribes before it writes: a completion that lands while its
        # write is on its way back (this process's, or another replica's NOTIFY) then wakes
        # it, instead of passing unseen and leaving it to the next poll.
        subscribed = self._subscribe(run_id) if wait > 0 else None
        if self._group.enabled:
            result = await self._group.write(report, *args)
        else:
            result = await self._write(report, *args)
        if result.completed_now and run_id in self._completions:
            # Wake the reports of this process waiting on the run (no polling needed).
            event, _ = self._completions.pop(run_id)
            self._completions[run_id] = (anyio.Event(), result)
            event.set()
        run, complete, ranks, decision = (
            result.run,
            result.complete,
            result.reported_ranks,
            result.decision,
        )
        if not complete and wait > 0:
            origin = (run.created_at, run.branch)
            status = await self._wait_for_step(
                run_id, step, min(wait, self.max_wait_seconds), abandoned, origin, subscribed
            )
            if status is not None:
                run, complete, ranks, decision = status
        if complete and decision is None:
            run, complete, ranks, decision = await self._read(step_status, self.store, run_id, step)
        # The state parsed by the report is the stored one unless a wait re-read the run; a
        # waiter woken by a completion here answers with that completion's (its values too).
        source = result
        woken = self._completions.get(run_id, (None, None))[1]
        if woken is not None and run is woken.run:
            source = woken
        state = source.state if run is source.run else None
        groups = source.next_groups if run is source.run else None
        if groups is None:
            groups = self._groups_at(run, state, step + 1)
            if run is source.run:
                source.next_groups = groups
        return ReportOutcome(
            run_id=run_id,
            step=step,
            rank=rank,
            complete=complete,
            reported_ranks=ranks,
            version=run.version,
            values_version=run.values_version,
            decision=decision if complete else None,
            groups=groups,
            duplicate=result.duplicate,
            completed_now=result.completed_now,
            stop=report_stop(run.spec, run.state if state is None else state, step),
        )

    def _groups_at(
        self, run: RunRecord, state: dict[str, Any] | None, step: int
    ) -> dict[str, dict[str, float]]:
        """Every group's values at ``step`` for ``run`` as stored (``state``: its state parsed,
        if at hand): a report's answer. Read from the block :meth:`values_at` caches (keyed by
        the values version, so valid for any state of that version), evaluating the block
        when it is missing and cheap enough for the loop: a trainer's next report, like its
        next GET, then finds its values there (one step alone costs about a whole block)."""
        key, index = block_of(run.id, run.created_at, run.values_version, step)
        values = self.cache.get(key)
        if values is None:
            first = key[3]
            schedule = compile_run(run.spec, run.amendments)
            parsed = full_state(run) if state is None else state
            overrides = _list(run.overrides)
            n = min(BLOCK, MAX_STEP - first)
            if index >= n or schedule.work(first, n) > min(INLINE_WORK, self.max_work):
                return at_step(evaluate(schedule, parsed, overrides, step, 1))
            values = evaluate(schedule, parsed, overrides, first, n)
            self.cache.put(key, values)
        return at_step(values, index)

    def _listening(self) -> bool:
        """Whether completions on other replicas wake this process's waits (PostgreSQL
        LISTEN/NOTIFY), subscribing on first use."""
        if self._listens is None:
            loop = asyncio.get_running_loop()

            def heard(run_id: str, step: int) -> None:
                loop.call_soon_threadsafe(self._heard, run_id, step)

            listen = getattr(self.store, "listen", None)
            self._listens = bool(listen(heard)) if listen is not None else False
        return self._listens

    def _heard(self, run_id: str, step: int) -> None:
        """A replica committed ``step`` of ``run_id``: its waiters here read it."""
        entry = self._completions.get(run_id)
        if entry is not None and not (entry[1] is not None and entry[1].step >= step):
            # No result at hand for the waiters: they read the step (once each).
            self._completions[run_id] = (anyio.Event(), None)
            entry[0].set()

    def _subscribe(self, run_id: str) -> anyio.Event:
        """The event the run's next completion heard by this process sets."""
        entry = self._completions.get(run_id)
        if entry is None:
            entry = self._completions[run_id] = (anyio.Event(), None)
        return entry[0]

    async def _wait_for_step(
        self,
        run_id: str,
        step: int,
        timeout: float,
        abandoned: Callable[[], Awaitable[bool]] | None = None,
        origin: tuple[str, int] | None = None,
        subscribed: anyio.Event | None = None,
    ) -> tuple[RunRecord, bool, int, dict[str, Any] | None] | None:
        """The step's status once it completes within ``timeout``, else ``None`` (also as soon
        as ``abandoned()`` says so: a wait nobody will read must not keep polling).

        A completion by a report of this process wakes every waiter at once, with the
        completing report's result (nothing is read). On PostgreSQL a completion on another
        replica wakes them too (LISTEN/NOTIFY; each then reads the step). Otherwise (several
        SQLite workers, a listener reconnecting) the database is polled, every
        ``SAFETY_POLL_SECONDS`` (``wait_poll_seconds`` on PostgreSQL without a listener);
        that is also how often ``abandoned`` is asked. ``origin``, the waiting report's run
        ``(created_at, branch)``: a completion of another incarnation of the run id, or of
        a branch a rewind has left, is not an answer. ``subscribed``: the event taken before
        the report was written (see :meth:`_subscribe`), waited on first."""

        def answer(done: ReportResult | None) -> bool:
            return (
                done is not None
                and done.step == step
                and (origin is None or (done.run.created_at, done.run.branch) == origin)
            )

        deadline = time.monotonic() + timeout
        poll = self.wait_poll_seconds
        if self.store.dialect == "sqlite" or self._listening():
            poll = max(poll, SAFETY_POLL_SECONDS)
        while time.monotonic() < deadline:
            entry = self._completions.get(run_id)
            if entry is None:
                entry = self._completions[run_id] = (anyio.Event(), None)
            done = entry[1]
            if done is not None and answer(done):
                # Completed by a report of this process (also while this report's write was
                # on its way back from a thread): its result is the answer.
                return done.run, True, done.reported_ranks, done.decision
            # A completion heard from another replica while this report was being written
            # has set the event taken before the write (and put a fresh one in its place).
            event, subscribed = subscribed or entry[0], None
            with anyio.move_on_after(min(poll, max(0.0, deadline - time.monotonic()))):
                await event.wait()
            if event.is_set():
                # The answer is at hand now: no asking whether the client is still there
                # (a thousand ranks woken at once each asked, in turn, on the one loop).
                latest = self._completions.get(run_id, (None, None))[1]
                if latest is not None and answer(latest):
                    return latest.run, True, latest.reported_ranks, latest.decision
            if abandoned is not None and await abandoned():
                return None
            if event.is_set():
                latest = self._completions.get(run_id, (None, None))[1]
                if latest is not None and latest.step < step:
                    continue  # an earlier step completed here: wait on
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
        key, index = block_of(run_id, known.created_at, known.version, step)
        values = self.cache.get(key)
        version = known.version
        if values is None:
            run = await self.get(run_id)
            first = key[3]
            n = min(BLOCK, MAX_STEP - first)
            work = run.schedule.work(first, n)
            if work > self.max_work:
                # The block would be over the budget: the one step, if it is within it.
                check_work(run.schedule, step, 1, self.max_work, "one step")
                one = await _evaluate(INLINE_WORK + 1, run.values, step, 1)
                return StepValues(run_id, step, run.values_version, at_step(one))
            check_work(run.schedule, first, n, self.max_work, "one step")
            values = await _evaluate(work, run.values, first, n)
            version = run.values_version
            key, index = block_of(run_id, run.created_at, version, step)
            self.cache.put(key, values)
        return StepValues(run_id, step, version, at_step(values, index))

    async def window(self, run_id: str, start: int, count: int, known: RunVersion) -> Window:
        """Every group's values for ``[start, start + count)`` (see :meth:`values_at`)."""
        key = (run_id, known.created_at, known.version, start, count)
        values = self.cache.get(key)
        version = known.version
        if values is None:
            run = await self.get(run_id)
            check_values(_series(run), count, "this window")
            work = check_work(run.schedule, start, count, self.max_work, "this window", window=True)
            values = await _evaluate(work, run.values, start, count)
            version = run.values_version
            self.cache.put((run_id, run.created_at, version, start, count), values)
        return Window(run_id, start, count, version, values)

    async def curve(self, run_id: str, start: int, stop: int | None, points: int) -> CurveValues:
        """Values over ``[start, stop)`` decimated to about ``points`` steps; ``stop``
        defaults to ``max(1000, step + 1)``."""
        run = await self.get(run_id)
        stop = max(1000, (run.step or 0) + 1) if stop is None else stop
        check_span(start, stop, self.max_curve_span)
        check_values(_series(run), min(stop - start, points), "this curve")
        try:
            check_work(run.schedule, start, stop - start, self.max_work, "this curve")
        except WorkLimitExceeded:
            # Too long to evaluate densely (a long run with many groups): sample the start of
            # each bucket instead, as much of it as the budget allows.
            per_bucket = _sampled_per_bucket(run.schedule, start, stop, points, self.max_work)
            if per_bucket is None:
                raise
            steps, groups = await heavy(
                decimate_sampled, run.values, start, stop, points, per_bucket
            )
            return CurveValues(run_id, run.version, start, stop, steps, groups)
        # Up to millions of steps of numpy work: off the event loop.
        sampled = await heavy(sample, run.values, start, stop, points)
        assert sampled.steps is not None
        return CurveValues(run_id, run.version, start, stop, sampled.steps, sampled.groups)

    # -- history ----------------------------------------------------------------------------

    async def metric_history(
        self, run_id: str, name: str, after_step: int = -1, steps: int | None = None
    ) -> MetricHistory:
        """Every report's value of ``name`` and the aggregate each completed step saw, for
        the first ``steps`` reported steps after ``after_step`` (``None``: all of them)."""
        return await self.metric_history_rendered(run_id, name, after_step, steps, _same)

    async def metric_history_rendered(
        self,
        run_id: str,
        name: str,
        after_step: int,
        steps: int | None,
        render: Callable[[MetricHistory], T],
    ) -> T:
        """``render(history)`` of :meth:`metric_history`, read and rendered in one of the
        :func:`heavy` threads. A page of 10^4 steps is tens of ms of Python (row tuples,
        points, the answer's JSON): done on the event loop it stalled every trainer's GET lr
        for as long; in a lower-priority thread with a 0.2 ms switch interval, the loop takes
        the GIL back within about a millisecond whenever it has a request."""
        return await heavy(_render_history, self, run_id, name, after_step, steps, render)

    def _metric_history(
        self, run_id: str, name: str, after_step: int = -1, steps: int | None = None
    ) -> MetricHistory:
        rows = self.store.history(run_id, after_step, MAX_STEP if steps is None else steps)
        if rows is None:
            raise RunNotFound(run_id)
        points = []
        for r in rows.reports:
            values = json.loads(r.values)
            if name in values:
                points.append(MetricPoint(r.step, r.rank, _number(values[name]), r.branch))
        abandoned = []
        for a in rows.abandoned:
            values = json.loads(a.values)
            if name in values:
                abandoned.append(
                    MetricPoint(a.step, a.rank, _number(values[name]), a.branch, a.abandoned_by)
                )
        aggregate = []
        for e in rows.completed:
            agg = json.loads(e.data).get("aggregate", {})
            if name in agg and e.step is not None and not e.abandoned_by:
                aggregate.append((e.step, _number(agg[name]), e.branch))
        more = None if rows.more_from is None else rows.more_from - 1
        return MetricHistory(run_id, name, points, aggregate, abandoned, more)

    async def events(self, run_id: str, after: int, limit: int) -> list[Event]:
        """The run's events with ``seq > after``, oldest first, at most ``limit``."""
        if await self._read(self.store.run_version, run_id) is None:
            raise RunNotFound(run_id)
        rows = await self._read(self.store.events, run_id, after, limit)
        return [
            Event(e.seq, e.type, e.step, e.at, json.loads(e.data), e.branch, e.abandoned_by)
            for e in rows
        ]

    # -- range test -------------------------------------------------------------------------

    async def range_test(self, run_id: str) -> RangeTestCurveValues:
        """The run's LR range-test curve, stop step and suggestions (``NotARangeTest`` for a run
        without an ``LRRangeTest`` node). Replays up to ``num_iter`` events: off the loop."""
        return await to_thread.run_sync(range_test_curve, self.store, run_id)


def _same(history: MetricHistory) -> MetricHistory:
    return history


def _render_history(
    runs: Runs,
    run_id: str,
    name: str,
    after_step: int,
    steps: int | None,
    render: Callable[[MetricHistory], T],
) -> T:
    with gc_paused():
        return render(runs._metric_history(run_id, name, after_step, steps))


def _sampled_per_bucket(
    schedule: Timeline, start: int, stop: int, points: int, budget: int
) -> int | None:
    """Steps per bucket a sampled curve can evaluate within ``budget`` (``None``: not even
    one, or a recursion, whose every window costs the scan up to it)."""
    if schedule.recursive:
        return None
    buckets = max(1, points // 2) + 1
    fixed = schedule.work(start, 0)
    per_step = schedule.work(start, 1) - fixed
    steps = (budget // buckets - fixed) // max(per_step, 1)
    if steps < 1:
        return None
    return int(min(steps, -(-(stop - start) // (buckets - 1))))


def _series(run: Run) -> int:
    return sum(len(fields) for fields in run.schedule.fields.values())


def block_of(
    run_id: str, created_at: str, values_version: int, step: int
) -> tuple[tuple[str, str, int, int], int]:
    """The values cache's key of the ``BLOCK``-step block holding ``step`` of a run's values
    version, and the step's index in it. GET lr and a report's answer share these blocks (a
    trainer's report then its GET cost one evaluation), so both build the key here: the
    values version and ``created_at`` in it keep a reduction or a re-created run id from
    reading another's block."""
    first = step - step % BLOCK
    return (run_id, created_at, values_version, first), step - first


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "BLOCK",
    "Change",
    "ChangePreview",
    "CurveValues",
    "Event",
    "MetricHistory",
    "MetricPoint",
    "OverrideWithdrawal",
    "ReportOutcome",
    "Run",
    "RunPulse",
    "RunQuery",
    "RunSummary",
    "RunVersion",
    "Runs",
    "Sampled",
    "StepValues",
    "Window",
    "add_amendment",
    "add_override",
    "create_run",
    "delete_run",
    "dry_run",
    "extend_lease",
    "preview",
    "remove_override",
    "report",
    "rewind",
    "step_status",
]
