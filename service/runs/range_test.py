"""The range-test read: a run's LR range-test curve, its stop step and the suggestions.

A range test is a run whose schedule (or a group's) is an ``LRRangeTest`` node
(:mod:`service.schedules.range_test`). Its curve is rebuilt from what is stored, never kept
twice: the losses are the values the node saw, taken from the decisions stored with the
completed steps' ``report_completed`` events (the ranks' aggregate; entries the node ignored,
after the stop, are left out), the smoothed losses are the node's own smoothing replayed over
them (the same pure function the node applies report by report), the rates are the run's values
at those steps (overrides included: what the trainers trained with), and ``stopped_at`` is the
node's stored state. Events that a rewind set aside are skipped; a step completed again after a
rewind counts once, as it completed last.

``report_stop`` is what a report answer's ``stop`` says: the test diverged at or before the
reported step, or that step is its last. It is derived from the stored state, so a duplicate or
a waiting report answers it too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.runs.errors import RunError, RunNotFound
from service.runs.model import compile_run, compile_spec, evaluate
from service.runs.repository import Store
from service.schedules.range_test import (
    RangeTestCurve,
    range_test_nodes,
    should_stop,
    smooth_losses,
    suggestion_index,
)

RULES = ("steepest", "valley", "minimum")


class NotARangeTest(RunError):
    """The run has no ``LRRangeTest`` node (answered 409: it conflicts with the run's spec)."""


@dataclass(frozen=True)
class RangeTestCurveValues:
    """A range test's curve as stored, with the suggestions (see the module docstring)."""

    run_id: str
    version: int
    path: str
    """State key of the node (``schedule`` or ``group_schedules.<name>``)."""
    metric: str
    num_iter: int
    steps: list[int]
    lr: list[float]
    """The first range-test group's rate at each step (torch-lr-finder's ``history["lr"]``)."""
    groups: dict[str, list[float]]
    """Every group the node drives: its rate at each step."""
    loss: list[float]
    smoothed: list[float]
    stopped_at: int | None
    finished: bool
    """Diverged, or reached the last step: trainers were told to stop."""
    suggestions: dict[str, float | None]
    suggested_steps: dict[str, int | None]
    """The step each rule picked (``minimum``: the step of the smallest loss; its rate / 10)."""


def report_stop(spec_text: str, state: Mapping[str, Any] | str | None, step: int) -> bool:
    """The ``stop`` of a report answer at ``step``: ``False`` at once for a run without a range
    test (no state parsed on that path); else whether a range-test node is finished there."""
    nodes = range_test_nodes(compile_spec(spec_text).program.metric_nodes)
    if not nodes:
        return False
    parsed = json.loads(state) if isinstance(state, str) else (state or {})
    return should_stop(nodes, parsed, step)


def _node(spec_text: str, run_id: str) -> RangeTestCurve:
    nodes = range_test_nodes(compile_spec(spec_text).program.metric_nodes)
    if not nodes:
        raise NotARangeTest(
            f"run {run_id!r} is not a range test: its schedule has no LRRangeTest node; create "
            'one with {"schedule": {"type": "LRRangeTest", ...}} (see docs/range-test.md)'
        )
    # One node is the curve; a second one (another group's) is documented as not read here.
    return nodes[0]


def range_test_curve(store: Store, run_id: str) -> RangeTestCurveValues:
    """The curve of ``run_id``'s range test (blocking: call from a worker thread).

    Raises :class:`RunNotFound` or :class:`NotARangeTest`.
    """
    record = store.get_run(run_id)
    if record is None:
        raise RunNotFound(run_id)
    node = _node(record.spec, run_id)
    state = json.loads(record.state)
    node_state = state.get(node.path) or node.initial_state()
    completed = record.completed_step

    # The loss the node saw at each step, from the completed steps' stored decisions (a step
    # completed again after a rewind: the latest event; set-aside events are not the timeline).
    seen: dict[int, tuple[int, float]] = {}
    for event in store.events_of_type(run_id, "report_completed"):
        if event.abandoned_by or event.step is None:
            continue
        if completed is None or event.step > completed:
            continue
        decision = json.loads(event.data).get("decision") or {}
        for entry in decision.get("nodes", ()):
            if entry.get("path") == node.path and "ignored" not in entry:
                previous = seen.get(event.step)
                if previous is None or previous[0] < event.seq:
                    seen[event.step] = (event.seq, float(entry["value"]))
    steps = sorted(seen)
    loss = [seen[s][1] for s in steps]
    smoothed, _ = smooth_losses(loss, node.smooth_f, node.diverge_th)

    groups: dict[str, list[float]] = {name: [] for name in node.group_names}
    if steps:
        overrides = [] if record.overrides == "[]" else json.loads(record.overrides)
        schedule = compile_run(record.spec, record.amendments)
        values = evaluate(schedule, state, overrides, 0, steps[-1] + 1)
        for name in groups:
            series = values[name]["lr"]
            groups[name] = [float(series[s]) for s in steps]
    lr = groups[node.group_names[0]] if node.group_names else []

    index = suggestion_index(lr, smoothed, node.num_iter)
    suggested: dict[str, float | None] = {}
    suggested_steps: dict[str, int | None] = {}
    for rule in RULES:
        i = index[rule]
        suggested_steps[rule] = None if i is None else steps[i]
        suggested[rule] = None if i is None else (lr[i] / 10 if rule == "minimum" else lr[i])
    stopped_at = node_state.get("stopped_at")
    last = steps[-1] if steps else None
    return RangeTestCurveValues(
        run_id=run_id,
        version=record.version,
        path=node.path,
        metric=node.metric,
        num_iter=node.num_iter,
        steps=steps,
        lr=lr,
        groups=groups,
        loss=loss,
        smoothed=smoothed,
        stopped_at=stopped_at,
        finished=last is not None and node.finished(node_state, last),
        suggestions=suggested,
        suggested_steps=suggested_steps,
    )


__all__ = ["NotARangeTest", "RangeTestCurveValues", "range_test_curve", "report_stop"]
