"""The use cases' transactions: blocking functions over a Store, callable from any thread.

A change to a run (``report``, ``add_override``, ``remove_override``, ``add_amendment``,
``rewind``, ``extend_lease``) runs inside ``store.transaction(run_id)``, the run row locked
until commit, so two reports for one run, on any process or replica, are applied one after
the other: it loads the locked run, asks :mod:`service.runs.model` (pure) what the change
does, and writes that in the same transaction. ``create_run``, ``heartbeat`` and
``delete_run`` are one store call each; ``read_run`` and ``step_status`` read the run as
stored now. Which thread each runs on is :class:`~service.runs.service.Runs`' choice.

Dry runs (:func:`dry_run`, at the end) make an operator change (a :data:`Change`) exactly as
it would be made, checks and refusals included, then roll its transaction back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from service.runs.errors import InvalidArgument, RewindConflict, RunConflict, RunNotFound
from service.runs.limits import check_spec_limits, check_values
from service.runs.listing import derive, run_horizon
from service.runs.model import (
    AmendmentChange,
    OverrideChange,
    ReportPlan,
    RewindChange,
    RunSpec,
    amendment_key,
    canonical_values,
    check_not_too_late,
    check_rank,
    compile_run,
    compile_spec,
    lease_end,
    make_amendment,
    make_override,
    plan_report,
    stored_amendment_key,
    withdraw_override,
)
from service.runs.repository import ReportRow, RunRecord, RunTx, Store, dumps, utcnow
from service.runs.states import load_in, read_state, save_in
from service.schedules.cost import WORK_BUDGET, WorkLimitExceeded, check_work


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
        state = load_in(tx)
        if schedule.recursive:
            check_work(schedule, step + 1, 1, max_work, "one step", resume=True, state=state)
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


def read_run(store: Store, run_id: str, max_rows: int | None = None) -> RunRecord | None:
    """The run as stored, its whole state read (``None`` when it does not exist); raises
    :class:`~service.runs.states.TooManyRows` rather than parse more than ``max_rows``
    reduction rows."""
    record = store.get_run(run_id)
    return None if record is None else read_state(store, record, max_rows)


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
            try:
                check_work(schedule, until - count, count, max_work, what, window=count > 1)
            except WorkLimitExceeded:
                if not schedule.recursive:
                    raise
                # Priced again from the checkpoints its scans resume from (the state read
                # only now: a lease within the cold price never reads it).
                check_work(
                    schedule,
                    until - count,
                    count,
                    max_work,
                    what,
                    window=count > 1,
                    resume=True,
                    state=load_in(tx),
                )
        if until > run.leased_until:
            run.leased_until = lease_end(until)
            tx.save_lease()
        return run


def heartbeat(store: Store, run_id: str, rank: int, step: int | None, finished: bool) -> RunRecord:
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
