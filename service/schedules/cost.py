"""The work model: what evaluating a window of a compiled schedule costs, before it is done.

Pure and cheap (integer arithmetic over a walk of the compiled tree), so the service can
refuse a request that would stop the server, or send a long one to a worker thread, before
any value is computed. The unit is one float64 element operation (about 1-3 ns of one core
with numpy); ``WORK_BUDGET`` of them is what one request may cost (about a second).

For one *part* of a program (a compiled tree and the groups it writes), evaluating ``count``
steps below ``end`` costs

    count * (groups * nodes * W_NODE + exprs)        the closed forms, element by element
    + nodes * W_CALL                                 numpy's fixed cost per call
    + scanned * (groups * (nodes * W_NODE + W_SCAN) + exprs)   recursions from step 0
    + (scanned // chunk) * nodes * W_CALL

where ``nodes`` counts the tree's nodes, ``exprs`` the operations of its distinct
expressions (an expression is evaluated once for every group that shares it), and
``scanned`` is what :meth:`Curve.scanned` bounds: the steps a recursion (ChainedScheduler's
scan past its closed-form range, MultiplicativeLR's running product, SequentialLR restarting
a MultiplicativeLR) goes through one by one to reach ``end``, caches ignored, so that the
same request costs the same on every replica, warm or cold. Answering costs ``W_VALUE``
per value (conversion and JSON).

That cold price is an upper bound. A window it puts over the budget is priced again from
the scan checkpoints it would resume from (:func:`check_work` with ``resume``): those the
process finds for the run's state (its memo, then the database's), or, for the promise an
accepted spec makes, those a trainer walking forward always leaves (a checkpoint every
2,048 steps). A chain with many groups that scans far into a long run is then served at the
cost of the window, as a trainer asks for it; a step far past every checkpoint is refused
with advice to ask for earlier steps first.

The constants were fitted on the kinds of schedule the issue that introduced this module
measured (a ChainedScheduler of 22,528 StepLR nodes, 1,024 groups, a 745-character
expression at step 67 million); see ``docs/operations.md``, "Request limits and the work
budget".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .base import MAX_STEP, Curve, ScanResume
from .expr import Expr
from .piecewise import Piecewise

W_NODE = 16
"""Element operations per node per value of a closed form (a handful of ufuncs)."""
W_CALL = 4096
"""Element-operation equivalent of one node's fixed cost per evaluation call (~5 µs)."""
W_SCAN = 64
"""Element operations per group per scanned step (the scan's passes and copies)."""
W_VALUE = 96
"""Element-operation equivalent of answering one value (tolist, JSON)."""
SCAN_CHUNK = 2048
"""Steps per scan chunk assumed for the per-call term (the smallest chunk a scan uses)."""

WORK_BUDGET = 1 << 29
"""Default work one request may cost (``LRSERVE_MAX_REQUEST_WORK``): about 1-3 s of a core."""
INLINE_WORK = 1 << 20
"""Work below which an evaluation runs on the event loop (about a millisecond)."""
MAX_HELD_BYTES = 128 * 1024 * 1024
"""Most memory a recursion may hold at once (every scan now runs a bounded chunk at a time,
so this binds only on very many groups); a request that would hold more is refused."""
HELD_BYTES_PER_VALUE = 64
"""Bytes the scan holds per (group, step): its matrices and their temporaries."""


class WorkLimitExceeded(ValueError):
    """A request whose work or size is over a limit; refused before anything is computed.

    ``limit`` names the limit (``"work"``, ``"values"``, ``"held memory"``); ``amount`` and
    ``maximum`` are its measure and bound; ``advice`` says what to ask for instead, and
    ``max_count`` (windows) is the largest ``count`` that fits, when one does.
    """

    def __init__(
        self,
        what: str,
        limit: str,
        amount: int,
        maximum: int,
        advice: str,
        max_count: int | None = None,
    ) -> None:
        self.what = what
        self.limit = limit
        self.amount = amount
        self.maximum = maximum
        self.advice = advice
        self.max_count = max_count
        super().__init__(
            f"{what} would cost {amount:,} {_UNITS[limit]}; the limit is {maximum:,}: {advice}"
        )


_UNITS = {
    "work": "units of work",
    "values": "values",
    "held memory": "bytes held at once",
    "spec nodes": "schedule nodes",
}


@dataclass(frozen=True)
class PartCost:
    """The static weights of one compiled part (see the module docstring)."""

    curve: Curve
    groups: int
    nodes: int
    """Nodes evaluated per step (a piecewise composite counts its heaviest child)."""
    exprs: int
    """Operations per step of the distinct expressions (each evaluated once for all groups)."""
    total_nodes: int
    """Every node of the tree (each may be called once per evaluation)."""
    recursive: bool = True
    """Whether any node scans (False: ``scanned`` is 0 at every step, no walk needed)."""

    def work(self, count: int, end: int, resume: ScanResume | None = None) -> int:
        scanned = self.curve.scanned(end, resume)[0] if self.recursive else 0
        per_value = self.nodes * W_NODE
        work = count * (self.groups * per_value + self.exprs) + self.total_nodes * W_CALL
        if scanned:
            work += scanned * (self.groups * (per_value + W_SCAN) + self.exprs)
            work += (scanned // SCAN_CHUNK + 1) * self.total_nodes * W_CALL
        return work

    def held_bytes(self, end: int) -> int:
        held = self.curve.scanned(end)[1] if self.recursive else 0
        return held * self.groups * HELD_BYTES_PER_VALUE


def part_cost(curve: Curve, groups: int) -> PartCost:
    """Walk ``curve``'s tree once: its nodes per step and its distinct expressions' size.

    A piecewise composite (SequentialLR, optax.join_schedules) evaluates one child per step,
    so its weight per step is its heaviest child's, not their sum; every node still counts
    once for the fixed cost per call."""
    sources: dict[str, int] = {}
    per_step, total = _weigh(curve, sources, 0)
    recursive = curve.scanned(MAX_STEP) != (0, 0)
    return PartCost(curve, groups, per_step, sum(sources.values()), total, recursive)


def _weigh(curve: Curve, sources: dict[str, int], depth: int) -> tuple[int, int]:
    for value in vars(curve).values():
        for expr in _exprs(value):
            sources[expr.source] = expr.size
    kids = [_weigh(child, sources, depth + 1) for child in curve.children()]
    total = 1 + sum(t for _, t in kids)
    if isinstance(curve, Piecewise):
        return 1 + max((w for w, _ in kids), default=0), total
    return 1 + sum(w for w, _ in kids), total


def _exprs(value: object) -> Iterable[Expr]:
    if isinstance(value, Expr):
        return (value,)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Expr):
        return value
    return ()


def window_work(
    parts: Sequence[PartCost],
    series: int,
    start: int,
    count: int,
    resume: ScanResume | None = None,
) -> int:
    """Work of evaluating and answering ``[start, start + count)`` of these parts (with
    ``resume``: scans counted from their checkpoints, see :class:`~.base.ScanResume`)."""
    end = start + count
    return sum(p.work(count, end, resume) for p in parts) + count * series * W_VALUE


def held_bytes(parts: Sequence[PartCost], start: int, count: int) -> int:
    """Most memory a recursion of these parts holds at once for that window."""
    return max((p.held_bytes(start + count) for p in parts), default=0)


class Costed(Protocol):
    """A compiled schedule the work model can price (a Program, a run's Timeline)."""

    @property
    def recursive(self) -> bool: ...

    def work(self, start: int, count: int) -> int: ...

    def resumed_work(self, start: int, count: int, state: Mapping[str, Any] | None) -> int: ...

    def held_bytes(self, start: int, count: int) -> int: ...


def check_work(
    schedule: Costed,
    start: int,
    count: int,
    budget: int,
    what: str,
    *,
    window: bool = False,
    resume: bool = False,
    state: Mapping[str, Any] | None = None,
) -> int:
    """The work of ``[start, start + count)``, or :class:`WorkLimitExceeded` when it is over
    ``budget`` or would hold more than ``MAX_HELD_BYTES``. ``window``: the request can ask for
    fewer steps (the refusal then names the largest ``count`` that fits).

    A window over the budget priced cold (every scan from its start, as a process that has
    computed nothing pays) is priced again with ``resume``: its scans from the checkpoints
    they would resume from, those found for ``state`` (this may read the scan backing, so
    not on an event loop whose store reads block), or with ``state=None`` those a trainer
    walking forward always leaves (what an accepted spec promises, see runs.limits)."""
    work = schedule.work(start, count)
    resumed = resume and schedule.recursive and work > budget
    if resumed:
        work = schedule.resumed_work(start, count, state)
    if work > budget:
        fits = _largest_count(schedule, start, count, budget, resumed, state) if window else 0
        if fits:
            advice = f"ask for count <= {fits} from step {start}"
        elif count > 1 and window:
            advice = (
                f"no window from step {start} fits: the schedule is evaluated step by step up "
                "to there from its last checkpoint; ask for an earlier step first (every "
                "answer keeps checkpoints that later steps resume from)"
            )
        else:
            advice = (
                "the schedule is evaluated step by step up to there from its last checkpoint "
                "(MultiplicativeLR, or a ChainedScheduler past its closed-form range): ask for "
                "an earlier step first (every answer keeps checkpoints that later steps resume "
                "from) or fewer steps, or use a closed-form schedule"
            )
        raise WorkLimitExceeded(what, "work", work, budget, advice, fits or None)
    held = schedule.held_bytes(start, count)
    if held > MAX_HELD_BYTES:
        raise WorkLimitExceeded(
            what,
            "held memory",
            held,
            MAX_HELD_BYTES,
            "this window is evaluated step by step and would hold too much at once: ask for "
            "an earlier step or fewer steps",
        )
    return work


def _largest_count(
    schedule: Costed,
    start: int,
    count: int,
    budget: int,
    resumed: bool,
    state: Mapping[str, Any] | None,
) -> int:
    def work(n: int) -> int:
        return schedule.resumed_work(start, n, state) if resumed else schedule.work(start, n)

    lo, hi = 0, count - 1  # the largest n in [0, count) with work(n) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if work(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = [
    "INLINE_WORK",
    "MAX_HELD_BYTES",
    "WORK_BUDGET",
    "Costed",
    "PartCost",
    "WorkLimitExceeded",
    "check_work",
    "held_bytes",
    "part_cost",
    "window_work",
]
