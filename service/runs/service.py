"""Use cases: each loads a run from a :class:`Store`, applies a pure transition, writes it.

Every mutation runs inside ``store.transaction(run_id)`` (the run row locked until commit),
so two reports for one run, on any process or replica, are applied one after the other.
These functions block: the HTTP layer calls them in a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.runs.model import (
    Compiled,
    OverrideIn,
    ReportPlan,
    RunError,
    RunSpec,
    at_step,
    canonical_values,
    check_rank,
    compile_spec,
    evaluate,
    make_override,
    plan_report,
)
from service.store import RunRecord, Store
from service.store.base import ReportRow, dumps, utcnow


class RunNotFound(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


@dataclass
class ReportResult:
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

    Raises :class:`RunError` ``run-conflict`` for an existing id with another spec, and
    lets the engine's ``SpecError`` through for a spec that cannot be compiled.
    """
    text = spec.normalised()
    compiled = compile_spec(text)
    record = RunRecord(id=run_id, spec=text, state=dumps(compiled.program.initial_state()))
    stored, created = store.create_run(record, {"world_size": spec.world_size})
    if not created and stored.spec != text:
        raise RunError(
            "run-conflict",
            f"run {run_id!r} already exists with a different spec; delete it first or use "
            "another id",
        )
    return stored, created


def report(
    store: Store, run_id: str, step: int, rank: int, values: dict[str, float | None]
) -> ReportResult:
    """Record one rank's report; when it completes the step, observe and decide.

    One transaction with the run locked. The report row is inserted first (unless its key
    exists): for a run with one rank that answers "did this rank report this step?" without
    a read, and a refused report rolls the insert back with everything else.
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
                decision = _stored_decision(store, run_id, step)
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


def _stored_decision(store: Store, run_id: str, step: int) -> dict[str, Any] | None:
    event = store.event_at(run_id, "report_completed", step)
    if event is None:
        return None
    decision: dict[str, Any] | None = json.loads(event.data).get("decision")
    return decision


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


def add_override(store: Store, run_id: str, body: OverrideIn) -> RunRecord:
    with store.transaction(run_id) as tx:
        if tx is None:
            raise RunNotFound(run_id)
        run = tx.run
        compiled: Compiled = compile_spec(run.spec)
        override = make_override(compiled.program, body, utcnow())
        overrides = json.loads(run.overrides)
        overrides.append(override)
        run.overrides = dumps(overrides)
        run.version += 1
        tx.add_event("override", body.from_step, {**override, "version": run.version})
        tx.save()
        return run


def values_at(
    run: RunRecord, step: int, state: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Every group's values at ``step``; ``state`` is ``run.state`` already parsed, if at hand."""
    compiled = compile_spec(run.spec)
    if state is None:
        state = json.loads(run.state)
    overrides = [] if run.overrides == "[]" else json.loads(run.overrides)
    return at_step(evaluate(compiled.program, state, overrides, step, 1))
