"""The application service: :class:`Runs`, every use case as the HTTP layer calls it.

One ``async`` method per use case, reads included (a window of values, a curve, metric
history, events, waiting for a step), over the blocking transactions of
:mod:`service.runs.transactions`. ``Runs`` decides where each call runs: on the event loop
when the store says the call never waits (a SQLite WAL read; a SQLite write that fails fast
when the lock is taken, retried briefly), in a worker thread otherwise, and an expensive
evaluation in the heavy-work pool (:mod:`service.runs.evaluation`). It owns the values cache
(the one-step blocks GET lr and a report's answer share) and wakes the reports waiting for a
step. Results are the domain values of :mod:`service.runs.views`, never HTTP bodies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar, cast

import anyio
from anyio import to_thread

from service.runs.checkpoints import StoredScans
from service.runs.curve import decimate_sampled
from service.runs.errors import RunNotFound
from service.runs.evaluation import heavy, preview, sample
from service.runs.gcpause import gc_paused
from service.runs.groupcommit import GroupWriter
from service.runs.limits import check_span, check_values
from service.runs.listing import Status, active_since, derive, run_status
from service.runs.model import (
    AmendmentChange,
    OverrideChange,
    RewindChange,
    RunSpec,
    at_step,
    compile_run,
    evaluate,
)
from service.runs.range_test import RangeTestCurveValues, range_test_curve, report_stop
from service.runs.repository import (
    RunPulse,
    RunQuery,
    RunRecord,
    RunSummary,
    Store,
    StoreBusy,
    WouldBlock,
)
from service.runs.states import INLINE_ROWS, TooManyRows, full_state
from service.runs.timeline import Timeline
from service.runs.transactions import (
    Change,
    OverrideWithdrawal,
    ReportResult,
    add_amendment,
    add_override,
    create_run,
    delete_run,
    dry_run,
    extend_lease,
    heartbeat,
    read_run,
    remove_override,
    report,
    rewind,
    step_status,
)
from service.runs.values import ValuesCache
from service.runs.views import (
    ChangePreview,
    CurveValues,
    Event,
    MetricHistory,
    MetricPoint,
    ReportOutcome,
    Run,
    RunVersion,
    Sampled,
    StepValues,
    Window,
    _list,  # Run.of's parse of a stored JSON list, shared with _groups_at
)
from service.schedules import set_scan_backing
from service.schedules.base import MAX_STEP
from service.schedules.cost import (
    INLINE_WORK,
    MAX_HELD_BYTES,
    WORK_BUDGET,
    WorkLimitExceeded,
    check_work,
)

T = TypeVar("T")

BLOCK = 1024
"""Steps per cached block for one-step reads: a block costs about what one step costs, and a
trainer asks for step after step while every rank asks for the same one."""

log = logging.getLogger("lrserve.runs")


@dataclasses.dataclass(eq=False)
class _Delivery:
    """A waiting report whose answer its step's completion delivers (``Runs.report``)."""

    step: int
    rank: int
    origin: tuple[str, int]
    """The run's ``(created_at, branch)`` the report was written to."""
    duplicate: bool
    deliver: Callable[[ReportOutcome], bool]
    delivered: ReportOutcome | None = None


Abandoned = Callable[[], bool] | Callable[[], Awaitable[bool]]
"""Whether a waiting report's client went away (a flag, or a coroutine that finds out)."""


async def _asked(abandoned: Abandoned) -> bool:
    answer = abandoned()
    return await answer if inspect.isawaitable(answer) else bool(answer)


@dataclasses.dataclass(eq=False)
class _Waiter:
    """A report waiting for its step (``Runs._wait_for_step``), as its run's ticker sees it."""

    step: int
    gone: Callable[[], bool] | None
    """Whether its client went away, cheap enough to ask every tick (``None``: not asked)."""
    ask: bool
    """Its ``abandoned`` check is a coroutine: woken every tick to await it."""
    tick: anyio.CancelScope | None = None
    """What the ticker cancels to wake it (``None`` while it is not waiting)."""


SAFETY_POLL_SECONDS = 0.25
"""How often the waiting reports of a run on SQLite read the database (see
``Runs._wait_for_step``)."""

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
        self.inline_rows = INLINE_ROWS
        """Most reduction rows a read on the event loop parses (more: a worker thread)."""
        self._written: set[str] = set()
        """Runs this process has written to (see :meth:`_read_before_first_write`)."""
        """Seconds without a report or heartbeat after which a run is ``idle``."""
        self._derived = False
        self._deriving = anyio.Lock()
        # Reports arriving together share one SQLite transaction (service/runs/groupcommit.py).
        self._group = GroupWriter(store)
        # Scan checkpoints outlive the process in the store (service/runs/checkpoints.py).
        self.scans = StoredScans(store)
        set_scan_backing(self.scans)
        self._listens: bool | None = None
        self._completions: dict[str, tuple[anyio.Event, ReportResult | None]] = {}
        """Per run with waiting reports: the event its next completion in this process sets,
        and the latest such completion (what woken waiters answer with, unread)."""
        self._polls: dict[str, tuple[float, asyncio.Future[tuple[bool, int | None]]]] = {}
        """Per run: when its waits' latest shared poll started, and that read."""
        self._statuses: dict[tuple[str, int], asyncio.Future[Any]] = {}
        """Per (run, step): the step's status being read for its waits."""
        self._deliveries: dict[str, dict[_Delivery, None]] = {}
        """Per run: the waiting reports whose answers are delivered by the completion itself
        (``deliver`` of :meth:`report`)."""
        self._waits: dict[str, dict[_Waiter, None]] = {}
        """Per run, the reports of this process waiting on it (see :meth:`_tick`)."""
        self._tickers: dict[str, asyncio.Task[None]] = {}
        """Per run with waits, its ticker task (:meth:`_tick`)."""

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

    def close(self) -> None:
        """Write the scan checkpoints still pending and stop using the store for them."""
        self.scans.close()
        set_scan_backing(None, only_if=self.scans)

    # -- runs -----------------------------------------------------------------------------

    async def create(self, run_id: str, spec: RunSpec) -> tuple[Run, bool]:
        """Create a run idempotently; ``(run, created)``."""
        record, created = await self._write(create_run, self.store, run_id, spec, self.max_work)
        return self._of(record), created

    async def _read_before_first_write(self, run_id: str) -> None:
        """Read the run once before this process's first report to it, its reduction rows
        parsed in a worker thread when there are many: a SQLite write runs on the event loop
        inside the write lock, where parsing 10^5 rows stalled every request for seconds.
        The write then finds them parsed (and reads only rows appended since)."""
        if len(self._written) >= 65536:
            self._written.clear()
        self._written.add(run_id)
        try:
            await self._read(read_run, self.store, run_id, self.inline_rows)
        except TooManyRows:
            await to_thread.run_sync(read_run, self.store, run_id)

    async def get(self, run_id: str) -> Run:
        try:
            record = await self._read(read_run, self.store, run_id, self.inline_rows)
        except TooManyRows:
            # The first read of a run with many reductions in this process (a SQLite read
            # runs on the event loop: every row parsed there would stall every request).
            record = await to_thread.run_sync(read_run, self.store, run_id)
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
        record = await self._write(heartbeat, self.store, run_id, rank, step, finished)
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
        scans = (await self.get(run_id)).schedule.base.scan_name
        await self._write(delete_run, self.store, run_id)
        if scans is not None:
            # The run's scan checkpoints (those of its spec; an amendment's stay, named by
            # their own programs, until a run with the same spec is deleted).
            await to_thread.run_sync(self.store.delete_scan_checkpoints, [scans])
        # Its latest completion (a run record, its state) is no answer for anyone now.
        self._polls.pop(run_id, None)
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
        abandoned: Abandoned | None = None,
        deliver: Callable[[ReportOutcome], bool] | None = None,
    ) -> ReportOutcome:
        """Record a report; with ``wait`` (seconds), answer once the step is complete or the
        wait is over. The outcome carries every group's values at ``step + 1``.

        ``abandoned`` ends the wait early when it says True: the client went away, so nobody
        would read the answer. Plain (cheap: a flag), it is asked by the run's ticker every
        poll interval without waking the wait; a coroutine function wakes the wait to be
        awaited.

        ``deliver`` (with ``wait``): called with this report's outcome by the report of this
        process that completes the step, right after that report's own answer is sent, for
        every waiting report of the step in one pass; it returns whether it delivered the
        answer (the caller then sends nothing more). A thousand waiting ranks are answered
        in one loop instead of a thousand tasks each resuming through the HTTP stack (which
        took longer than the answers' writes). Undelivered (``False``, an exception, a
        completion heard from another replica, a timeout), the wait ends as without it.
        """
        args = (self.store, run_id, step, rank, values, self.max_work)
        # A waiting report subscribes before it writes: a completion that lands while its
        # write is on its way back (this process's, or another replica's NOTIFY) then wakes
        # it, instead of passing unseen and leaving it to the next poll.
        subscribed = self._subscribe(run_id) if wait > 0 else None
        if self.store.inline_writes and run_id not in self._written:
            await self._read_before_first_write(run_id)
        if self._group.enabled:
            result = await self._group.write(report, *args)
        else:
            result = await self._write(report, *args)
        if result.completed_now and run_id in self._completions:
            # Wake the reports of this process waiting on the run (no polling needed).
            event, _ = self._completions.pop(run_id)
            self._completions[run_id] = (anyio.Event(), result)
            if self._deliveries.get(run_id):
                # Queued before the waiters' wake-ups: they find their answers delivered.
                asyncio.get_running_loop().call_soon(self._deliver, run_id, result)
            event.set()
        run, complete, ranks, decision = (
            result.run,
            result.complete,
            result.reported_ranks,
            result.decision,
        )
        if not complete and wait > 0:
            origin = (run.created_at, run.branch)
            delivery = None
            if deliver is not None:
                delivery = _Delivery(step, rank, origin, result.duplicate, deliver)
                self._deliveries.setdefault(run_id, {})[delivery] = None
            try:
                status = await self._wait_for_step(
                    run_id, step, min(wait, self.max_wait_seconds), abandoned, origin, subscribed
                )
            finally:
                if delivery is not None:
                    self._forget_delivery(run_id, delivery)
            if delivery is not None and delivery.delivered is not None:
                return delivery.delivered
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
        duplicate, completed_now = result.duplicate, result.completed_now
        return self._outcome(
            run_id, step, rank, run, complete, ranks, decision, source, duplicate, completed_now
        )

    def _outcome(
        self,
        run_id: str,
        step: int,
        rank: int,
        run: RunRecord,
        complete: bool,
        ranks: int,
        decision: dict[str, Any] | None,
        source: ReportResult,
        duplicate: bool,
        completed_now: bool,
    ) -> ReportOutcome:
        """A report's answer for ``run`` as read or as ``source`` (a report's result, whose
        parsed state and values at ``step + 1`` it uses, computing them once, when ``run`` is
        its record)."""
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
            duplicate=duplicate,
            completed_now=completed_now,
            stop=report_stop(run.spec, run.state if state is None else state, step),
        )

    def _deliver(self, run_id: str, result: ReportResult) -> None:
        """Deliver the answers of the waiting reports of ``run_id`` that ``result`` (a
        completion by a report of this process) completes: each the outcome the report would
        have built once woken (see :meth:`report`)."""
        run, step, decision = result.run, result.step, result.decision
        if decision is None:
            return  # (a woken waiter would read the step's decision: it does)
        origin = (run.created_at, run.branch)
        waiting = [
            d
            for d in self._deliveries.get(run_id, ())
            if d.step == step and d.origin == origin and d.delivered is None
        ]
        if not waiting:
            return
        first = waiting[0]
        # Every waiter's answer is the first one's but for its rank (and duplicate flag).
        answer = self._outcome(
            run_id, step, first.rank, run, True, result.reported_ranks, decision, result,
            first.duplicate, False,
        )  # fmt: skip
        # No full collection between two answers: with a thousand connections open one takes
        # 40-100 ms on a 2-core machine, which every rank answered after it would wait.
        with gc_paused():
            for d in waiting:
                outcome = answer._replace(rank=d.rank, duplicate=d.duplicate)
                try:
                    if d.deliver(outcome):
                        d.delivered = outcome
                except Exception:
                    # Its wait ends the ordinary way: answered as it resumes.
                    log.exception("delivering a waiting report's answer failed")

    def _forget_delivery(self, run_id: str, delivery: _Delivery) -> None:
        deliveries = self._deliveries.get(run_id)
        if deliveries is not None:
            deliveries.pop(delivery, None)
            if not deliveries:
                del self._deliveries[run_id]

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
            # No result at hand for the waiters: they read the step, sharing a read that
            # starts now (a poll read before the completion is no answer).
            self._polls.pop(run_id, None)
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
        abandoned: Abandoned | None = None,
        origin: tuple[str, int] | None = None,
        subscribed: anyio.Event | None = None,
    ) -> tuple[RunRecord, bool, int, dict[str, Any] | None] | None:
        """The step's status once it completes within ``timeout``, else ``None`` (also as soon
        as ``abandoned()`` says so: a wait nobody will read must not keep polling).

        A completion by a report of this process wakes every waiter at once, with the
        completing report's result (nothing is read). On PostgreSQL a completion on another
        replica wakes them too (LISTEN/NOTIFY; each then reads the step). Otherwise (several
        SQLite workers, a listener reconnecting) the database is polled, every
        ``SAFETY_POLL_SECONDS`` (``wait_poll_seconds`` on PostgreSQL without a listener), once
        per run by its ticker (:meth:`_tick`), which also asks ``abandoned`` that often and
        wakes only the waits concerned. ``origin``, the waiting report's run
        ``(created_at, branch)``: a completion of another incarnation of the run id, or of
        a branch a rewind has left, is not an answer. ``subscribed``: the event taken before
        the report was written (see :meth:`_subscribe`), waited on first."""

        def answer(done: ReportResult | None) -> bool:
            return (
                done is not None
                and done.step == step
                and (origin is None or (done.run.created_at, done.run.branch) == origin)
            )

        poll = self.wait_poll_seconds
        if self.store.dialect == "sqlite" or self._listening():
            poll = max(poll, SAFETY_POLL_SECONDS)
        ask = abandoned is not None and inspect.iscoroutinefunction(abandoned)
        gone = None if abandoned is None or ask else cast(Callable[[], bool], abandoned)
        waiter = _Waiter(step, gone, ask)
        self._waits.setdefault(run_id, {})[waiter] = None
        if run_id not in self._tickers:
            self._tickers[run_id] = asyncio.ensure_future(self._tick(run_id, poll))
        try:
            with anyio.move_on_after(timeout):
                while True:
                    entry = self._completions.get(run_id)
                    if entry is None:
                        entry = self._completions[run_id] = (anyio.Event(), None)
                    done = entry[1]
                    if done is not None and answer(done):
                        # Completed by a report of this process (also while this report's
                        # write was on its way back from a thread): its result is the answer.
                        return done.run, True, done.reported_ranks, done.decision
                    # A completion heard from another replica while this report was being
                    # written has set the event taken before the write (and put a fresh one
                    # in its place).
                    event, subscribed = subscribed or entry[0], None
                    # Until the step completes here, or the ticker wakes it.
                    with anyio.CancelScope() as waiter.tick:
                        await event.wait()
                    waiter.tick = None
                    if event.is_set():
                        # The answer is at hand now: no asking whether the client is still
                        # there (a thousand ranks woken at once each asked, in turn).
                        latest = self._completions.get(run_id, (None, None))[1]
                        if latest is not None and answer(latest):
                            return latest.run, True, latest.reported_ranks, latest.decision
                    if abandoned is not None and await _asked(abandoned):
                        return None
                    if event.is_set():
                        latest = self._completions.get(run_id, (None, None))[1]
                        if latest is not None and latest.step < step:
                            continue  # an earlier step completed here: wait on
                    # Woken by the ticker: its read of the step is shared (fresh for poll / 2).
                    exists, completed = await self._polled_completion(run_id, poll / 2)
                    if not exists:
                        raise RunNotFound(run_id)
                    if completed is not None and completed >= step:
                        return await self._shared_step_status(run_id, step)
            return None
        finally:
            waits = self._waits.get(run_id)
            if waits is not None:
                waits.pop(waiter, None)
                if not waits:
                    del self._waits[run_id]
                    ticker = self._tickers.pop(run_id, None)
                    if ticker is not None:
                        ticker.cancel()

    async def _tick(self, run_id: str, poll: float) -> None:
        """The one timer of a run's waiting reports: every ``poll`` seconds, read whether the
        step completed elsewhere (another worker or replica: a completion in this process wakes
        them itself) and ask each whether its client is still there, waking only those with
        something to act on. A thousand waiting ranks cost one read and a thousand flag checks
        a tick, not a thousand timers and wake-ups (a fifth of a core, idle). The run's last
        wait to end cancels it."""
        try:
            while self._waits.get(run_id):
                await anyio.sleep(poll)
                waits = self._waits.get(run_id)
                if not waits:
                    break
                wake = [w for w in waits if w.ask or (w.gone is not None and w.gone())]
                try:
                    exists, completed = await self._polled_completion(run_id, poll / 2)
                except Exception:
                    exists, completed = False, None  # each wait's own read meets the failure
                waits = self._waits.get(run_id, {})
                if not exists:
                    wake = list(waits)
                elif completed is not None:
                    wake += [w for w in waits if w.step <= completed]
                for w in wake:
                    if w.tick is not None:
                        w.tick.cancel()
        except Exception:  # pragma: no cover - a bug here must not leave waits asleep
            log.exception("the wait ticker of run %s failed", run_id)
            for w in self._waits.get(run_id, {}):
                if w.tick is not None:
                    w.tick.cancel()
        finally:
            if self._tickers.get(run_id) is asyncio.current_task():
                del self._tickers[run_id]

    async def _polled_completion(self, run_id: str, fresh_for: float) -> tuple[bool, int | None]:
        """``store.completed_step(run_id)`` as the waits of a run poll it: one read shared by
        every wait that asks within ``fresh_for`` seconds of its start (in flight or done).

        A thousand ranks waiting on a step each poll, and read apart, the reads were thousands
        a second (on PostgreSQL each one a worker thread and a round trip), which slowed the
        step's answers when it completed; shared, a run costs a read or two per poll interval
        whatever its ranks. A completion may be seen up to ``fresh_for`` later than by a read
        of its own, which is why this serves the polls only (a completion in this process or
        heard from another wakes the waits at once)."""
        now = time.monotonic()
        entry = self._polls.get(run_id)
        if entry is None or now - entry[0] >= fresh_for:
            task = asyncio.ensure_future(self._read(self.store.completed_step, run_id))
            entry = self._polls[run_id] = (now, task)
        # (shielded: a wait cancelled meanwhile leaves the read to the others)
        return await asyncio.shield(entry[1])

    async def _shared_step_status(
        self, run_id: str, step: int
    ) -> tuple[RunRecord, bool, int, dict[str, Any] | None]:
        """``step_status`` for a wait that learnt of its step's completion from a poll or
        another replica's NOTIFY: one read for every wait of the step asking while it is in
        flight (woken together, a thousand waits would each read the run and the event)."""
        key = (run_id, step)
        task = self._statuses.get(key)
        if task is None:
            task = asyncio.ensure_future(self._read(step_status, self.store, run_id, step))
            self._statuses[key] = task
            task.add_done_callback(lambda _: self._statuses.pop(key, None))
        return await asyncio.shield(task)

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
            if work > self.max_work and run.schedule.recursive:
                work = await self._resumed_work(run, first, n)
            if work > self.max_work or run.schedule.held_bytes(first, n) > MAX_HELD_BYTES:
                # The block would be over the budget: the one step, if it is within it.
                await self._check_work(run, step, 1, "one step")
                one = await _evaluate(INLINE_WORK + 1, run.values, step, 1)
                return StepValues(run_id, step, run.values_version, at_step(one))
            values = await _evaluate(work, run.values, first, n)
            version = run.values_version
            key, index = block_of(run_id, run.created_at, version, step)
            self.cache.put(key, values)
        return StepValues(run_id, step, version, at_step(values, index))

    async def _check_work(
        self, run: Run, start: int, count: int, what: str, *, window: bool = False
    ) -> int:
        """:func:`check_work` for a request of ``run``: priced cold (arithmetic, inline);
        when that is over the budget, from the scan checkpoints it would resume from."""
        schedule = run.schedule
        if not schedule.recursive or schedule.work(start, count) <= self.max_work:
            return check_work(schedule, start, count, self.max_work, what, window=window)
        # (Not the cold refusal first: its largest-count search would be thrown away.)
        priced = partial(
            check_work,
            run.schedule,
            start,
            count,
            self.max_work,
            what,
            window=window,
            resume=True,
            state=run.state,
        )
        return await to_thread.run_sync(priced)

    async def _resumed_work(self, run: Run, start: int, count: int) -> int:
        """``run``'s work for that window with its scans resumed from their checkpoints: in
        a thread (it may read the database and fingerprint a large plateau state; it is
        asked only when the cold price is over the budget)."""
        return await to_thread.run_sync(run.schedule.resumed_work, start, count, run.state)

    async def window(self, run_id: str, start: int, count: int, known: RunVersion) -> Window:
        """Every group's values for ``[start, start + count)`` (see :meth:`values_at`)."""
        key = (run_id, known.created_at, known.version, start, count)
        values = self.cache.get(key)
        version = known.version
        if values is None:
            run = await self.get(run_id)
            check_values(_series(run), count, "this window")
            work = await self._check_work(run, start, count, "this window", window=True)
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
            await self._check_work(run, start, stop - start, "this curve")
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


def _transaction_of(change: Change) -> Callable[[Store, str], object]:
    """The transaction that makes ``change`` (its store and run id still to give)."""
    if isinstance(change, OverrideChange):
        return lambda store, run_id: add_override(store, run_id, change)
    if isinstance(change, OverrideWithdrawal):
        return lambda store, run_id: remove_override(store, run_id, change.n, change.from_step)
    if isinstance(change, AmendmentChange):
        return lambda store, run_id: add_amendment(store, run_id, change)
    return lambda store, run_id: rewind(store, run_id, change)


async def _evaluate(work: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inline when ``work`` is small (the hot path), else in :func:`heavy`."""
    if work <= INLINE_WORK:
        return fn(*args)
    return await heavy(fn, *args)


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


# Re-exported: what callers imported from here before the run layer was split into modules
# (the domain values of views.py, the transactions, the preview), so bench/ and older code
# keep working; new code imports each from the module that defines it. RunPulse, RunQuery and
# RunSummary are the repository's: the routers, which may not import it, take them from here.
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
