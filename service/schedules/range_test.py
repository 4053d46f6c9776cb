"""The learning-rate range test (Leslie Smith): a rising rate, a smoothed loss, a divergence stop.

``LRRangeTest`` raises every group's rate from ``start_lr`` to ``end_lr`` over ``num_iter``
steps while the trainer reports its loss every step, exactly as torch-lr-finder's
``LRFinder.range_test`` does (``torch_lr_finder/lr_finder.py``, version 0.2.2):

- values: its ``ExponentialLR`` / ``LinearLR`` with ``r = t / (num_iter - 1)``:
  ``start * (end / start) ** r`` and ``start + r * (end - start)`` (the same sub-expressions in
  the same order, so the rates are bit-identical); ``t`` is clamped to ``num_iter - 1`` (after
  the last step the value holds). The rate recorded for iteration ``i`` in torch-lr-finder's
  ``history["lr"]`` is the rate that iteration trained with, i.e. the value at step ``i`` here.
- smoothing (on the previous *smoothed* value, torch-lr-finder's rule): ``s_0 = loss_0``,
  ``s_t = smooth_f * loss_t + (1 - smooth_f) * s_{t-1}``; ``smooth_f == 0`` disables smoothing
  (``s_t = loss_t``), as torch-lr-finder's ``if smooth_f > 0`` does.
- best and stop: ``best_0 = s_0``, ``best_t = min(best_{t-1}, s_t)``; the test stops at the first
  step with ``s_t > diverge_th * best_t``, that step *recorded* (torch-lr-finder appends the loss
  before it checks). We also stop at a non-finite loss, where torch-lr-finder would go on with a
  NaN history (``NaN > x`` is false) and never stop: the state stays finite.

The node is a :class:`~service.schedules.base.MetricCurve`: its rates do not depend on the
reports, but its state does (``smoothed``, ``best``, ``count``, ``last_step``, ``stopped_at``),
which is what tells every rank of a data-parallel job to stop at the same step: the service
feeds the node the ranks' aggregate. Reports after the stop step, or beyond the last step, are
ignored (state unchanged).

The suggestion rules (pure functions over the recorded arrays) are those libraries' own:

- :func:`steepest`: torch-lr-finder's ``LRFinder.plot(skip_start=10, skip_end=5)``: trim, then
  the lr at ``numpy.gradient(losses).argmin()``; ``None`` below ``10 + 5 + 2`` points (where
  torch-lr-finder raises).
- :func:`valley` and :func:`minimum`: fastai's (``fastai/callback/schedule.py``) as its
  ``Learner.lr_find`` applies them: trim to ``[num_iter // 10 : -5]``, cut at the first NaN,
  then the longest decreasing subsequence's index about 2/3 along it (valley), or the lr at the
  smallest loss divided by 10 (minimum); ``None`` for an empty span.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from .base import (
    CompileContext,
    Curve,
    Matrix,
    MetricCurve,
    ProgramState,
    ScheduleNode,
    SpecError,
    Steps,
    non_empty_per_group,
)

MAX_ITER = 10_000
"""Most steps a range test may have: the read use case replays and fastai's valley rule is
quadratic in the number of points (range tests are typically 100 to 1000 steps)."""

SKIP_START = 10
SKIP_END = 5
"""torch-lr-finder's ``plot`` defaults (and fastai's ``-5``)."""

PosReal = Annotated[float, Field(strict=True, gt=0)]
MetricName = Annotated[str, Field(min_length=1, max_length=200)]
Vector = npt.NDArray[np.float64]


# -- pure smoothing ------------------------------------------------------------------------


def smooth_step(
    smoothed: float | None, best: float | None, loss: float, smooth_f: float, diverge_th: float
) -> tuple[float, float, bool]:
    """One iteration of torch-lr-finder's loop: ``(smoothed, best, stop)`` after ``loss``.

    ``smoothed``/``best`` are ``None`` before the first point (torch-lr-finder's
    ``iteration == 0``: the raw loss is both). ``stop`` is torch-lr-finder's divergence test,
    plus a non-finite smoothed loss (there it would never stop).
    """
    if smoothed is None or best is None:
        s = loss
        b = loss
    else:
        s = smooth_f * loss + (1 - smooth_f) * smoothed if smooth_f > 0 else loss
        b = s if s < best else best
    stop = (not math.isfinite(s)) or s > diverge_th * b
    return s, b, stop


def smooth_losses(
    losses: Sequence[float], smooth_f: float, diverge_th: float
) -> tuple[list[float], int | None]:
    """The smoothed series of ``losses`` and the index the test stops at (``None``: never).

    The series ends at the stop index (included), as torch-lr-finder's history does.
    """
    out: list[float] = []
    s: float | None = None
    b: float | None = None
    for i, loss in enumerate(losses):
        s, b, stop = smooth_step(s, b, float(loss), smooth_f, diverge_th)
        out.append(s)
        if stop:
            return out, i
    return out, None


# -- pure suggestions ----------------------------------------------------------------------


Points = Sequence[float] | Vector


def _arrays(lrs: Points, losses: Points) -> tuple[Vector, Vector]:
    lr = np.asarray(lrs, dtype=np.float64).reshape(-1)
    loss = np.asarray(losses, dtype=np.float64).reshape(-1)
    if lr.shape != loss.shape:
        raise ValueError(f"lrs ({lr.size}) and losses ({loss.size}) differ in length")
    return lr, loss


def steepest(
    lrs: Sequence[float] | Vector,
    losses: Sequence[float] | Vector,
    skip_start: int = SKIP_START,
    skip_end: int = SKIP_END,
) -> float | None:
    """torch-lr-finder's suggestion: the lr of the steepest descent of the smoothed loss.

    ``LRFinder.plot``: trim ``skip_start`` and ``skip_end`` points, then
    ``lrs[numpy.gradient(losses).argmin()]`` (the gradient over the point index, not the lr).
    ``None`` for fewer than ``skip_start + skip_end + 2`` points, where torch-lr-finder raises.
    """
    lr, loss = _arrays(lrs, losses)
    if lr.size < skip_start + skip_end + 2:
        return None
    stop = lr.size - skip_end
    lr, loss = lr[skip_start:stop], loss[skip_start:stop]
    return float(lr[int(np.gradient(loss).argmin())])


def fastai_span(
    lrs: Sequence[float] | Vector, losses: Sequence[float] | Vector, num_iter: int
) -> tuple[Vector, Vector]:
    """The points fastai's ``Learner.lr_find`` hands its suggestion functions.

    ``recorder.lrs[num_it//10:-5]`` (``num_it``: the test's configured length, not the number of
    points recorded), cut at the first NaN loss.
    """
    lr, loss = _arrays(lrs, losses)
    lr, loss = lr[num_iter // 10 : -5], loss[num_iter // 10 : -5]
    nan = np.flatnonzero(np.isnan(loss))
    if nan.size:
        lr, loss = lr[: nan[0]], loss[: nan[0]]
    return lr, loss


def _valley_index(losses: Vector) -> int:
    """fastai's ``valley`` index: its O(n^2) longest-decreasing-subsequence programme,
    vectorised over ``j`` with the same outcome (see the note in the body)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        # fastai: lds[i] = 1 + max(lds[j] for j < i if losses[i] < losses[j]) (strict, so NaN
        # never counts), updated j by j. Its max_end/max_start check runs inside the j loop, but
        # lds[max_end] is the largest lds before i, so lds[i] can exceed it only by reaching
        # lds[max_end] + 1, its final value: checking once after the loop is the same.
        higher = losses[:i] > losses[i]
        if higher.any():
            lds[i] = int(lds[:i][higher].max()) + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - int(lds[max_end])
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def valley(
    lrs: Sequence[float] | Vector, losses: Sequence[float] | Vector, num_iter: int
) -> float | None:
    """fastai's ``valley`` suggestion on fastai's span (see :func:`fastai_span`); ``None`` if
    the span is empty. Like fastai, the index may be ``-1`` for a span of two points (its
    ``max_start`` is one before the valley), which Python reads as the last point."""
    lr, loss = fastai_span(lrs, losses, num_iter)
    if lr.size == 0:
        return None
    return float(lr[_valley_index(loss)])


def minimum(
    lrs: Sequence[float] | Vector, losses: Sequence[float] | Vector, num_iter: int
) -> float | None:
    """fastai's ``minimum`` suggestion: the lr at the smallest loss of fastai's span, / 10."""
    lr, loss = fastai_span(lrs, losses, num_iter)
    if lr.size == 0:
        return None
    return float(lr[int(loss.argmin())]) / 10


def suggestion_index(
    lrs: Sequence[float] | Vector, losses: Sequence[float] | Vector, num_iter: int
) -> dict[str, int | None]:
    """The point index (into the full arrays) each rule picks, ``None`` where it gives none.

    ``minimum`` names the point of the smallest loss (its rate is that lr / 10). Used to read
    every group's rate at the suggested point (per-group range tests) and to mark plots.
    """
    lr, loss = _arrays(lrs, losses)
    out: dict[str, int | None] = {"steepest": None, "valley": None, "minimum": None}
    if lr.size >= SKIP_START + SKIP_END + 2:
        span = loss[SKIP_START : lr.size - SKIP_END]
        out["steepest"] = SKIP_START + int(np.gradient(span).argmin())
    _, fl = fastai_span(lr, loss, num_iter)
    if fl.size:
        first = len(lr[: num_iter // 10])
        v = _valley_index(fl)
        out["valley"] = first + (v if v >= 0 else fl.size + v)
        out["minimum"] = first + int(fl.argmin())
    return out


def suggestions(
    lrs: Sequence[float] | Vector, losses: Sequence[float] | Vector, num_iter: int
) -> dict[str, float | None]:
    """``{"steepest", "valley", "minimum"}`` for a recorded curve (smoothed losses)."""
    return {
        "steepest": steepest(lrs, losses),
        "valley": valley(lrs, losses, num_iter),
        "minimum": minimum(lrs, losses, num_iter),
    }


# -- the compiled node ---------------------------------------------------------------------


class RangeTestCurve(MetricCurve):
    """``LRRangeTest`` compiled: the ramp (state-independent) and the smoothing transition."""

    type_name: ClassVar[str] = "LRRangeTest"

    def __init__(
        self,
        ctx: CompileContext,
        *,
        metric: str,
        start_lr: Vector,
        end_lr: Vector,
        num_iter: int,
        step_mode: str,
        smooth_f: float,
        diverge_th: float,
    ) -> None:
        self.n_groups = ctx.n_groups
        self.path = ctx.path
        self.metric = metric
        self.active_from = ctx.active_from
        self.active_until = ctx.active_until
        self.group_names = ctx.base.names
        self.start_lr = start_lr.reshape(-1, 1)
        self.end_lr = end_lr.reshape(-1, 1)
        self.num_iter = num_iter
        self.step_mode = step_mode
        self.smooth_f = smooth_f
        self.diverge_th = diverge_th
        self.input_lr = None

        # The whole ramp, once, with Python floats: torch-lr-finder's expressions operand for
        # operand, and Python's ``**`` (C ``pow``), which numpy's vectorised power does not
        # match to the last bit. At most MAX_ITER values per distinct (start, end) pair: groups
        # sharing one share the row (so 1024 groups cost what their distinct ramps cost).
        last = num_iter - 1
        ramps: dict[tuple[float, float], list[float]] = {}
        rows = []
        for b, e in zip(start_lr.tolist(), end_lr.tolist(), strict=True):
            row = ramps.get((b, e))
            if row is None:
                if step_mode == "exp":
                    row = [b * (e / b) ** (i / last) for i in range(num_iter)]
                else:
                    row = [b + (i / last) * (e - b) for i in range(num_iter)]
                ramps[(b, e)] = row
            rows.append(row)
        self.table = np.asarray(rows, dtype=np.float64).reshape(self.n_groups, num_iter)
        self.table.setflags(write=False)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        # Local steps are whole (the node is never composed); after the last step it holds.
        index = np.clip(np.asarray(t, dtype=np.float64), 0, self.num_iter - 1).astype(np.int64)
        return self.table[:, index]

    def initial_state(self) -> dict[str, Any]:
        return {"smoothed": None, "best": None, "count": 0, "last_step": None, "stopped_at": None}

    def finished(self, node_state: Mapping[str, Any], step: int) -> bool:
        """Whether a trainer at ``step`` should stop: the test diverged at or before ``step``,
        or ``step`` is its last step (``num_iter - 1``) or later."""
        stopped = node_state.get("stopped_at")
        return (stopped is not None and stopped <= step) or step >= self.num_iter - 1

    def observe(
        self, node_state: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        node = {**self.initial_state(), **(node_state or {})}
        ignored = None
        if node["stopped_at"] is not None:
            ignored = "stopped"
        elif step >= self.num_iter:
            ignored = "past the last step"
        elif node["last_step"] is not None and step <= node["last_step"]:
            ignored = "not after the last observed step"
        if ignored is not None:
            return node, {"reduced": False, "ignored": ignored, **_public(node)}
        s, b, stop = smooth_step(
            node["smoothed"], node["best"], float(value), self.smooth_f, self.diverge_th
        )
        node["count"] += 1
        node["last_step"] = int(step)
        if math.isfinite(s):
            # The state stays JSON-finite; a non-finite loss stops the test and is kept only in
            # the decision (the read replays the losses from the aggregates).
            node["smoothed"], node["best"] = s, b
        if stop:
            node["stopped_at"] = int(step)
        decision = {
            "reduced": False,
            "smoothed": s if math.isfinite(s) else None,
            "stop": bool(stop),
            **_public(node),
        }
        return node, decision


def _public(node: Mapping[str, Any]) -> dict[str, Any]:
    return {"best": node["best"], "stopped_at": node["stopped_at"], "count": node["count"]}


def range_test_nodes(metric_nodes: Sequence[MetricCurve]) -> list[RangeTestCurve]:
    """The range-test nodes among a program's metric-driven nodes, in tree order."""
    return [n for n in metric_nodes if isinstance(n, RangeTestCurve)]


def should_stop(metric_nodes: Sequence[MetricCurve], state: Mapping[str, Any], step: int) -> bool:
    """Whether a report answer at ``step`` says ``stop``: some range-test node is finished."""
    for node in metric_nodes:
        if isinstance(node, RangeTestCurve):
            node_state = state.get(node.path) or {}
            if node.finished(node_state, step):
                return True
    return False


# -- the spec model -------------------------------------------------------------------------


class LRRangeTest(ScheduleNode):
    """The LR range test (torch-lr-finder's ``range_test`` as a schedule).

    ``start_lr``: a number or one per group; omitted, each group's own ``lr`` (torch-lr-finder's
    ``start_lr=None`` uses the optimizer's). ``end_lr`` likewise a number or one per group.
    Must be the run's ``schedule`` or a ``group_schedules`` entry (not inside a composition).
    """

    type: Literal["LRRangeTest"]
    start_lr: PosReal | list[PosReal] | None = None
    end_lr: PosReal | list[PosReal] = 10.0
    num_iter: Annotated[int, Field(strict=True, ge=2, le=MAX_ITER)] = 100
    step_mode: Literal["exp", "linear"] = "exp"
    metric: MetricName = "loss"
    smooth_f: Annotated[float, Field(strict=True, ge=0, lt=1)] = 0.05
    diverge_th: Annotated[float, Field(strict=True, ge=1)] = 5.0

    library: ClassVar[str] = "torch-lr-finder"

    @field_validator("start_lr", "end_lr")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        return non_empty_per_group(value) if value is not None else value

    def compile(self, ctx: CompileContext) -> Curve:
        if ctx.depth != 0 or ctx.loc[0] == "param_schedules":
            raise SpecError(
                ctx.loc,
                "LRRangeTest must be the run's schedule or a group_schedules entry; it cannot "
                "be composed with other schedules or schedule other hyperparameters",
            )
        if self.start_lr is None:
            start = np.asarray(ctx.base.lr, dtype=np.float64).reshape(-1)
            if not np.all(start > 0):
                raise SpecError(
                    (*ctx.loc, "start_lr"),
                    "is omitted, so each group's lr is the start, and a range test needs a "
                    "start above 0; give start_lr or positive group lr values",
                )
        else:
            start = ctx.per_group(self.start_lr, "start_lr").reshape(-1)
        end = ctx.per_group(self.end_lr, "end_lr").reshape(-1)
        return RangeTestCurve(
            ctx,
            metric=self.metric,
            start_lr=start,
            end_lr=end,
            num_iter=self.num_iter,
            step_mode=self.step_mode,
            smooth_f=float(self.smooth_f),
            diverge_th=float(self.diverge_th),
        )


NODES: tuple[type[ScheduleNode], ...] = (LRRangeTest,)

__all__ = [
    "MAX_ITER",
    "NODES",
    "LRRangeTest",
    "RangeTestCurve",
    "fastai_span",
    "minimum",
    "range_test_nodes",
    "should_stop",
    "smooth_losses",
    "smooth_step",
    "steepest",
    "suggestion_index",
    "suggestions",
    "valley",
]
