"""Metric-driven schedules: reduce the learning rate when a metric stops improving.

Four node types, each with its own library's argument names and decision procedure:

- ``ReduceLROnPlateau``: torch's (modes min/max, threshold modes rel/abs, patience,
  cooldown, per-group ``min_lr``, ``eps``), plus ``metric``: the name it watches.
- ``timm.PlateauLRScheduler``: timm's wrapper of torch's (``decay_rate``, ``patience_t``,
  ``cooldown_t``, scalar ``lr_min``, ``mode`` defaulting to ``max``) with its linear warmup
  (``warmup_t``, ``warmup_lr_init``); reports are ignored while ``t + 1 <= warmup_t``.
- ``keras.ReduceLROnPlateau``: Keras 3's callback (``monitor``, ``min_delta`` absolute, reduce
  when ``wait >= patience``, cooldown decremented *before* the check so only ``cooldown - 1``
  evaluations are ignored, reduce only if the old lr exceeds ``float32(min_lr)``).
- ``optax.contrib.reduce_on_plateau``: optax's (``rtol`` and ``atol`` combined, reduce when
  ``plateau_count == patience``, ``accumulation_size`` reports averaged per decision, a global
  ``scale`` floored at ``min_scale``), plus ``metric``.

Every node compiles to a :class:`~service.schedules.base.MetricCurve`. Its state (a JSON
dict the service stores) holds ``best`` (``null`` until the first improving value),
``num_bad_epochs`` (Keras's ``wait``, optax's ``plateau_count``), ``cooldown_counter``,
``last_epoch`` (evaluations seen) and ``reductions``: ``[{"step": s + 1, "factor": [per-group
ratio new/old], "lr": [per-group value from that step]}]``. The node's value is a per-group
multiplier ``m(t)``, the product of the ratios applied up to step ``t``; ``observe`` is a pure
transition ``(state, metric) -> (new state, decision)`` and a reduction decided by a report
at step ``s`` applies from ``s + 1``.

Compositions (torch refuses ReduceLROnPlateau in both):

- standalone or a SequentialLR child: ``lr(t) = base * m(t)``; the reduction's "old" value is
  the node's own value at ``s + 1`` (exactly torch's lr, kept in ``reductions[].lr``). In a
  SequentialLR the node sees only reports for steps inside its segment.
- ChainedScheduler child: the node acts as if torch's ``ReduceLROnPlateau.step()`` ran at its
  place in the chain: ``chain_map`` is ``A = ratio`` at the step a reduction applies (1
  elsewhere), ``B = 0``, and "old" is the chain's value at ``s + 1`` just before the node,
  which the chain provides through :attr:`MetricCurve.input_lr`.

Non-finite metric values (NaN, +-inf) count as a non-improving evaluation. torch does that for
NaN; for +-inf we deviate (torch would take ``-inf`` as the new best in min mode and then never
see an improvement again) so that ``best`` always stays finite and JSON-serialisable.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from .base import (
    MAX_STEP,
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    MetricCurve,
    NonNegInt,
    NonNegReal,
    PosInt,
    ProgramState,
    Real,
    ScheduleNode,
    Steps,
    non_empty_per_group,
)

MetricName = Annotated[str, Field(min_length=1, max_length=200)]
Factor = Annotated[float, Field(strict=True, ge=0, lt=1)]
Vector = npt.NDArray[np.float64]
Table = tuple[npt.NDArray[np.int64], Matrix, Matrix, Matrix]

_TABLES_PER_CURVE = 2
"""Reduction tables a curve keeps (see :class:`_Tables`): a request evaluates one state a few
times (the old value of a reduction, the answer, a chain's passes)."""
_TABLE_MAX_BYTES = 4 * 1024 * 1024
"""A table whose arrays and parsed list (which the entry keeps alive) would hold more than
this is rebuilt rather than kept: entries live in every compiled program that has a plateau."""


def _step_of(reduction: dict[str, Any]) -> int:
    return int(reduction["step"])


class _Tables:
    """A curve's parsed reduction tables by the identity of the ``reductions`` list.

    A pure recomputation cache: an entry keeps a reference to its list (so its id cannot be
    reused by another list while the entry exists) and its length (a list is only ever
    appended to, and an append is a miss). Thread-safe under one lock; arrays read-only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lru: OrderedDict[int, tuple[list[Any], int, Table]] = OrderedDict()

    def get(self, reductions: list[Any]) -> Table | None:
        with self._lock:
            entry = self._lru.get(id(reductions))
            if entry is None or entry[0] is not reductions or entry[1] != len(reductions):
                return None
            self._lru.move_to_end(id(reductions))
            return entry[2]

    def put(self, reductions: list[Any], table: Table) -> None:
        # The list's dicts, lists and floats: about 400 bytes per reduction + 64 per value.
        held = sum(a.nbytes for a in table) + len(reductions) * (400 + 64 * table[1].shape[0])
        if held > _TABLE_MAX_BYTES:
            return
        for array in table:
            array.setflags(write=False)
        with self._lock:
            self._lru[id(reductions)] = (reductions, len(reductions), table)
            self._lru.move_to_end(id(reductions))
            while len(self._lru) > _TABLES_PER_CURVE:
                self._lru.popitem(last=False)


class PlateauCurve(MetricCurve, Chainable):
    """What every plateau variant shares: the reduction table, evaluation and composition.

    Subclasses implement :meth:`_transition`, which updates the counters in place and, when
    the library's procedure says so, calls :meth:`_reduce` with its rule for the new values.
    """

    type_name: ClassVar[str] = "ReduceLROnPlateau"

    def __init__(self, ctx: CompileContext, metric: str) -> None:
        self.n_groups = ctx.n_groups
        self.path = ctx.path
        self.metric = metric
        self.active_from = ctx.active_from
        self.active_until = ctx.active_until
        self.step_offset = ctx.step_offset
        self.base: Vector = np.asarray(ctx.base.lr, dtype=np.float64).copy()
        self.input_lr = None
        self._tables = _Tables()

    # -- state --------------------------------------------------------------------------

    def initial_state(self) -> dict[str, Any]:
        return {
            "best": None,
            "num_bad_epochs": 0,
            "cooldown_counter": 0,
            "last_epoch": 0,
            "reductions": [],
        }

    def _node_state(self, state: ProgramState) -> dict[str, Any]:
        node = state.get(self.path)
        return node if node is not None else self.initial_state()

    def _start_value(self) -> Vector:
        """The value the node multiplies before any reduction (its own base)."""
        return self.base

    def _table(self, node: dict[str, Any]) -> Table:
        """``(steps (R,), factors (G, R), cumulative m (G, R+1), absolute lr (G, R+1))``,
        read-only, memoised per ``reductions`` list (building it costs O(R x G))."""
        reductions = node.get("reductions", [])
        if not isinstance(reductions, list):
            return self._build_table(list(reductions))
        table = self._tables.get(reductions)
        if table is None:
            table = self._build_table(reductions)
            self._tables.put(reductions, table)
        return table

    def _build_table(self, reductions: list[Any]) -> Table:
        steps = np.array([int(r["step"]) for r in reductions], dtype=np.int64)
        g = self.n_groups
        if reductions:
            factors = np.array([r["factor"] for r in reductions], dtype=np.float64).T
            values = np.array([r["lr"] for r in reductions], dtype=np.float64).T
        else:
            factors = np.empty((g, 0))
            values = np.empty((g, 0))
        cumulative = np.concatenate([np.ones((g, 1)), np.multiply.accumulate(factors, axis=1)], 1)
        absolute = np.concatenate([self._start_value().reshape(-1, 1), values], axis=1)
        return steps, factors, cumulative, absolute

    def _global(self, t: Steps) -> npt.NDArray[np.int64]:
        return np.asarray(t, dtype=np.float64).astype(np.int64) + self.step_offset

    # -- values ---------------------------------------------------------------------------

    def multiplier(self, t: Steps, state: ProgramState) -> Matrix:
        """``m(t)``: the product of the reduction ratios applied up to local step ``t``."""
        steps, _, cumulative, _ = self._table(self._node_state(state))
        idx = np.searchsorted(steps, self._global(t), side="right")
        return cumulative[:, idx]

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        node = self._node_state(state)
        if self.input_lr is not None:
            # In a chain the recorded absolute values belong to the chain, not to this node.
            steps, _, cumulative, _ = self._table(node)
            idx = np.searchsorted(steps, self._global(t), side="right")
            return self._start_value().reshape(-1, 1) * cumulative[:, idx]
        return self._absolute(node.get("reductions", []), self._global(t))

    def _absolute(self, reductions: Any, g: npt.NDArray[np.int64]) -> Matrix:
        """The node's own lr at global steps ``g``: the recorded value of the last reduction
        applied by then (the start value before any). Reads only the reductions inside the
        window's span (two bisections), so its cost does not grow with their number."""
        start = self._start_value()
        if not len(reductions) or not len(g):
            return np.repeat(start.reshape(-1, 1), len(g), axis=1)
        lo = bisect.bisect_right(reductions, int(g.min()), key=_step_of)
        hi = bisect.bisect_right(reductions, int(g.max()), key=_step_of)
        # Columns lo..hi of the whole table's absolute values (column k: after k reductions).
        columns = [start if k == 0 else reductions[k - 1]["lr"] for k in range(lo, hi + 1)]
        absolute = np.array(columns, dtype=np.float64).reshape(hi - lo + 1, -1).T
        steps = np.array([_step_of(r) for r in reductions[lo:hi]], dtype=np.int64)
        idx = np.searchsorted(steps, g, side="right")
        return np.ascontiguousarray(absolute[:, idx])

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        reductions = self._node_state(state).get("reductions", [])
        g = self._global(t)
        a = np.ones((self.n_groups, len(g)))
        lo = hi = 0
        if len(reductions) and len(g):
            # Only the reductions applied inside the window's span matter here.
            lo = bisect.bisect_left(reductions, int(g.min()), key=_step_of)
            hi = bisect.bisect_right(reductions, int(g.max()), key=_step_of)
        if hi > lo:
            window = reductions[lo:hi]
            steps = np.array([_step_of(r) for r in window], dtype=np.int64)
            factors = np.array([r["factor"] for r in window], dtype=np.float64).T
            pos = np.searchsorted(steps, g, side="left")
            hit = pos < len(steps)
            hit[hit] = steps[pos[hit]] == g[hit]
            a[:, hit] = factors[:, pos[hit]]
        return a, np.zeros_like(a)

    def mult_horizon(self) -> int:
        return MAX_STEP

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return self.multiplier(t, state)

    # -- transitions -----------------------------------------------------------------------

    def _old(self, node: dict[str, Any], step: int, program_state: ProgramState) -> Vector:
        """The value a reduction decided at ``step`` starts from (the lr at ``step + 1``)."""
        local = np.array([float(step + 1 - self.step_offset)])
        if self.input_lr is not None:
            return np.asarray(self.input_lr(local, program_state), dtype=np.float64)[:, 0]
        return self.lr(local, {self.path: node})[:, 0]

    def _reduce(
        self,
        node: dict[str, Any],
        step: int,
        program_state: ProgramState,
        rule: Any,
    ) -> dict[str, Any]:
        """Apply ``rule(old) -> (new, applied)`` and record the reduction if anything changed."""
        old = self._old(node, step, program_state)
        new, applied = rule(old)
        new = np.asarray(new, dtype=np.float64)
        applied = np.asarray(applied, dtype=bool) & np.isfinite(old) & np.isfinite(new)
        with np.errstate(all="ignore"):
            ratio = np.where(applied & (old != 0), new / np.where(old != 0, old, 1.0), 1.0)
        value = np.where(applied, new, old)
        changed = bool(np.any(applied & (ratio != 1.0)))
        if changed:
            _record(node, {"step": step + 1, "factor": ratio.tolist(), "lr": value.tolist()})
        return {"reduced": changed, "factor": ratio.tolist(), "lr": value.tolist()}

    def _transition(
        self, node: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> dict[str, Any]:
        raise NotImplementedError

    def observe(
        self, node_state: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # Transitions only rebind top-level scalars and append to "reductions", so a shallow
        # copy with a fresh reductions list keeps the caller's state untouched; a deepcopy
        # cost more than the whole rest of a report.
        # Reductions are appended to a new list (see _record), never to the caller's, so the
        # caller's list is not copied on a report that does not reduce (O(reductions)).
        node = dict(node_state) if node_state else self.initial_state()
        outcome = self._transition(node, float(value), int(step), program_state)
        decision: dict[str, Any] = {
            "reduced": bool(outcome.get("reduced", False)),
            "triggered": bool(outcome.get("triggered", False)),
            "applies_from": int(step) + 1,
            "best": node.get("best"),
            "num_bad_epochs": node.get("num_bad_epochs"),
            "cooldown_counter": node.get("cooldown_counter"),
        }
        if decision["reduced"]:
            decision["factor"] = outcome["factor"]
            decision["lr"] = outcome["lr"]
        if "ignored" in outcome:
            decision["ignored"] = outcome["ignored"]
        return node, decision


def _record(node: dict[str, Any], reduction: dict[str, Any]) -> None:
    """Append a reduction to a new list: the old one may be the caller's (or a memo's key)."""
    node["reductions"] = [*node.get("reductions", ()), reduction]


def _torch_is_better(
    value: float, best: float | None, mode: str, threshold_mode: str, threshold: float
) -> bool:
    """torch's ``_is_better`` (``best`` ``None`` = torch's ``mode_worse``, +-inf)."""
    if not math.isfinite(value):
        return False
    if mode == "min":
        b = math.inf if best is None else best
        if threshold_mode == "rel":
            return value < b * (1.0 - threshold)
        return value < b - threshold
    b = -math.inf if best is None else best
    if threshold_mode == "rel":
        return value > b * (threshold + 1.0)
    return value > b + threshold


class TorchPlateauCurve(PlateauCurve):
    """torch's ``ReduceLROnPlateau.step`` as a pure transition."""

    def __init__(
        self,
        ctx: CompileContext,
        metric: str,
        *,
        mode: str,
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        cooldown: int,
        min_lr: Vector,
        eps: float,
    ) -> None:
        super().__init__(ctx, metric)
        self.mode = mode
        self.factor_ = factor
        self.patience = patience
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_lr = np.asarray(min_lr, dtype=np.float64).reshape(-1)
        self.eps = eps

    def _rule(self, old: Vector) -> tuple[Vector, npt.NDArray[np.bool_]]:
        # torch: new = max(old * factor, min_lr); applied only if old - new > eps
        new = np.maximum(old * self.factor_, self.min_lr)
        return new, (old - new) > self.eps

    def _transition(
        self, node: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> dict[str, Any]:
        node["last_epoch"] += 1
        if _torch_is_better(value, node["best"], self.mode, self.threshold_mode, self.threshold):
            node["best"] = value
            node["num_bad_epochs"] = 0
        else:
            node["num_bad_epochs"] += 1
        if node["cooldown_counter"] > 0:
            node["cooldown_counter"] -= 1
            node["num_bad_epochs"] = 0
        if node["num_bad_epochs"] > self.patience:
            outcome = self._reduce(node, step, program_state, self._rule)
            node["cooldown_counter"] = self.cooldown
            node["num_bad_epochs"] = 0
            return {**outcome, "triggered": True}
        return {"reduced": False}


class TimmPlateauCurve(TorchPlateauCurve):
    """timm's ``PlateauLRScheduler``: warmup for ``t <= warmup_t``, then torch's plateau."""

    def __init__(
        self, ctx: CompileContext, metric: str, *, warmup_t: int, warmup_lr_init: float, **kw: Any
    ) -> None:
        super().__init__(ctx, metric, **kw)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            # timm: warmup_steps = (v - warmup_lr_init) / warmup_t; lr = init + t * step
            self.warmup_steps = (self.base - warmup_lr_init) / warmup_t
            self.plateau_start = warmup_lr_init + warmup_t * self.warmup_steps
        else:
            self.warmup_steps = np.ones_like(self.base)
            self.plateau_start = self.base

    def _start_value(self) -> Vector:
        return np.asarray(self.plateau_start, dtype=np.float64)

    def _warmup(self, t: Steps) -> tuple[npt.NDArray[np.bool_], Matrix]:
        t = np.asarray(t, dtype=np.float64)
        in_warmup = (t <= self.warmup_t) if self.warmup_t else np.zeros(len(t), dtype=bool)
        values = self.warmup_lr_init + t[None, :] * self.warmup_steps.reshape(-1, 1)
        return in_warmup, values

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        out = super().lr(t, state)
        in_warmup, values = self._warmup(t)
        out[:, in_warmup] = values[:, in_warmup]
        return out

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        a, b = super().chain_map(t, state)
        in_warmup, values = self._warmup(t)
        a[:, in_warmup] = 0.0
        b[:, in_warmup] = values[:, in_warmup]
        return a, b

    def mult_horizon(self) -> int:
        return 0 if self.warmup_t else MAX_STEP

    def _transition(
        self, node: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> dict[str, Any]:
        # timm's train loop calls step(epoch + 1, metric); the metric is ignored while
        # epoch + 1 <= warmup_t (the inner torch scheduler is not stepped at all).
        if self.warmup_t and (step - self.step_offset) + 1 <= self.warmup_t:
            return {"reduced": False, "ignored": "warmup"}
        return super()._transition(node, value, step, program_state)


class KerasPlateauCurve(PlateauCurve):
    """Keras 3's ``ReduceLROnPlateau.on_epoch_end`` as a pure transition."""

    type_name: ClassVar[str] = "keras.ReduceLROnPlateau"

    def __init__(
        self,
        ctx: CompileContext,
        metric: str,
        *,
        mode: str,
        factor: float,
        patience: int,
        min_delta: float,
        cooldown: int,
        min_lr: float,
    ) -> None:
        super().__init__(ctx, metric)
        self.mode = mode
        self.factor_ = factor
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.cooldown = cooldown
        self.min_lr = min_lr
        # Keras compares the old lr with np.float32(min_lr) (promoted exactly to float64).
        self.min_lr_f32 = float(np.float32(min_lr))

    def _improved(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return value - (-self.min_delta) < best
        return value - self.min_delta > best

    def _transition(
        self, node: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> dict[str, Any]:
        node["last_epoch"] += 1
        if node["cooldown_counter"] > 0:
            node["cooldown_counter"] -= 1
            node["num_bad_epochs"] = 0
        if self._improved(value, node["best"]):
            node["best"] = value
            node["num_bad_epochs"] = 0
        elif node["cooldown_counter"] == 0:
            node["num_bad_epochs"] += 1
            if node["num_bad_epochs"] >= self.patience:

                def rule(old: Vector) -> tuple[Vector, npt.NDArray[np.bool_]]:
                    # Keras keeps one lr in a float32 variable; compare it as Keras reads it.
                    old32 = old.astype(np.float32).astype(np.float64)
                    applied = old32 > self.min_lr_f32
                    return np.maximum(old * self.factor_, self.min_lr), applied

                old = self._old(node, step, program_state)
                if bool(np.any(rule(old)[1] & np.isfinite(old))):
                    outcome = self._reduce(node, step, program_state, rule)
                    node["cooldown_counter"] = self.cooldown
                    node["num_bad_epochs"] = 0
                    return {**outcome, "triggered": True}
        return {"reduced": False}


class OptaxPlateauCurve(PlateauCurve):
    """optax's ``contrib.reduce_on_plateau`` update as a pure transition (float64)."""

    type_name: ClassVar[str] = "optax.contrib.reduce_on_plateau"

    def __init__(
        self,
        ctx: CompileContext,
        metric: str,
        *,
        factor: float,
        patience: int,
        rtol: float,
        atol: float,
        cooldown: int,
        accumulation_size: int,
        min_scale: float,
    ) -> None:
        super().__init__(ctx, metric)
        self.factor_ = factor
        self.patience = patience
        self.rtol = rtol
        self.atol = atol
        self.cooldown = cooldown
        self.accumulation_size = accumulation_size
        self.min_scale = min_scale

    def initial_state(self) -> dict[str, Any]:
        return {
            **super().initial_state(),
            "scale": 1.0,
            "count": 0,
            "avg_value": 0.0,
            "window_finite": True,
        }

    def _transition(
        self, node: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> dict[str, Any]:
        node["last_epoch"] += 1
        count = int(node.get("count", 0))
        new_count = count + 1
        if math.isfinite(value) and node.get("window_finite", True):
            node["avg_value"] = (count * float(node.get("avg_value", 0.0)) + value) / new_count
        else:
            # A non-finite value poisons optax's running mean; keep the state finite and
            # count the whole window as non-improving instead.
            node["window_finite"] = False
        node["count"] = new_count
        if new_count != self.accumulation_size:
            return {"reduced": False}
        avg = float(node["avg_value"])
        best = math.inf if node["best"] is None else float(node["best"])
        improved = (
            bool(node.get("window_finite", True))
            and math.isfinite(avg)
            and avg < (1 - self.rtol) * best - self.atol
        )
        if improved:
            node["best"] = avg
        curr = 0 if improved else int(node["num_bad_epochs"]) + 1
        outcome: dict[str, Any] = {"reduced": False}
        if node["cooldown_counter"] > 0:
            node["num_bad_epochs"] = 0
            node["cooldown_counter"] -= 1
        elif curr == self.patience:
            old_scale = float(node.get("scale", 1.0))
            new_scale = max(old_scale * self.factor_, self.min_scale)
            node["num_bad_epochs"] = 0
            node["cooldown_counter"] = self.cooldown
            if new_scale != old_scale and old_scale != 0:
                ratio = new_scale / old_scale
                outcome = self._reduce_scale(node, step, program_state, ratio, new_scale)
            node["scale"] = new_scale
            outcome["triggered"] = True
        else:
            node["num_bad_epochs"] = curr
        node["count"] = 0
        node["avg_value"] = 0.0
        node["window_finite"] = True
        return outcome

    def _reduce_scale(
        self,
        node: dict[str, Any],
        step: int,
        program_state: ProgramState,
        ratio: float,
        new_scale: float,
    ) -> dict[str, Any]:
        # optax multiplies the updates by `scale`: the lr it amounts to is base * scale,
        # whatever the lr was, so the ratio does not depend on the old value.
        factors = [ratio] * self.n_groups
        values = (self.base * new_scale).tolist()
        _record(node, {"step": step + 1, "factor": factors, "lr": values, "scale": new_scale})
        return {"reduced": True, "factor": factors, "lr": values}


# ---------------------------------------------------------------------------------------
# Spec models


class ReduceLROnPlateau(ScheduleNode):
    """torch.optim.lr_scheduler.ReduceLROnPlateau, plus ``metric``: the report name it watches."""

    type: Literal["ReduceLROnPlateau"]
    metric: MetricName
    mode: Literal["min", "max"] = "min"
    factor: Factor = 0.1
    patience: NonNegInt = 10
    threshold: Real = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: NonNegInt = 0
    min_lr: NonNegReal | list[NonNegReal] = 0.0
    eps: NonNegReal = 1e-8

    library: ClassVar[str] = "torch"

    @field_validator("min_lr")
    @classmethod
    def _non_empty(cls, value: float | list[float]) -> float | list[float]:
        return non_empty_per_group(value)

    def compile(self, ctx: CompileContext) -> Curve:
        return TorchPlateauCurve(
            ctx,
            self.metric,
            mode=self.mode,
            factor=float(self.factor),
            patience=self.patience,
            threshold=float(self.threshold),
            threshold_mode=self.threshold_mode,
            cooldown=self.cooldown,
            min_lr=ctx.per_group(self.min_lr, "min_lr").reshape(-1),
            eps=float(self.eps),
        )


class TimmPlateauLRScheduler(ScheduleNode):
    """timm.scheduler.PlateauLRScheduler (torch's plateau with timm's names and warmup).

    ``metric`` (required) names the report it watches. timm's noise arguments are not
    supported. Time is the step index: the value at ``t`` is what timm sets with
    ``step(t)``; a report at step ``s`` is timm's ``step(s + 1, metric)``.
    """

    type: Literal["timm.PlateauLRScheduler"]
    metric: MetricName
    decay_rate: Factor = 0.1
    patience_t: NonNegInt = 10
    threshold: Real = 1e-4
    cooldown_t: NonNegInt = 0
    warmup_t: NonNegInt = 0
    warmup_lr_init: NonNegReal = 0.0
    lr_min: NonNegReal = 0.0
    mode: Literal["min", "max"] = "max"

    library: ClassVar[str] = "timm"

    def compile(self, ctx: CompileContext) -> Curve:
        return TimmPlateauCurve(
            ctx,
            self.metric,
            warmup_t=self.warmup_t,
            warmup_lr_init=float(self.warmup_lr_init),
            mode=self.mode,
            factor=float(self.decay_rate),
            patience=self.patience_t,
            threshold=float(self.threshold),
            threshold_mode="rel",
            cooldown=self.cooldown_t,
            min_lr=np.full(ctx.n_groups, float(self.lr_min)),
            eps=1e-8,
        )


_KERAS_UP = ("acc", "auc", "precision", "recall", "f1", "fbeta", "iou", "r2")
_KERAS_DOWN = ("loss", "error", "mse", "mae", "mape", "msle", "crossentropy", "hinge")


def keras_direction(monitor: str) -> Literal["min", "max"] | None:
    """Keras's ``mode="auto"``: ``min`` for ``loss``; otherwise the built-in metric's direction.

    Keras reads ``_direction`` from the compiled model's metric objects; the service has no
    model, so it goes by the metric's name (Keras 2's rule for accuracy-like names). ``None``
    means undecidable (Keras raises then too).
    """
    name = monitor.removeprefix("val_").lower()
    if name == "loss" or any(k in name for k in _KERAS_DOWN):
        return "min"
    if any(k in name for k in _KERAS_UP):
        return "max"
    return None


class KerasReduceLROnPlateau(ScheduleNode):
    """keras.callbacks.ReduceLROnPlateau (``monitor`` is the report name it watches)."""

    type: Literal["keras.ReduceLROnPlateau"]
    monitor: MetricName = "val_loss"
    factor: Factor = 0.1
    patience: NonNegInt = 10
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: Real = 1e-4
    cooldown: NonNegInt = 0
    min_lr: NonNegReal = 0.0

    library: ClassVar[str] = "keras"

    @model_validator(mode="after")
    def _check_mode(self) -> KerasReduceLROnPlateau:
        if self.mode == "auto" and keras_direction(self.monitor) is None:
            raise ValueError(
                f"mode 'auto' cannot tell whether {self.monitor!r} should be minimised or "
                "maximised (Keras raises here too); give mode 'min' or 'max'"
            )
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        mode = self.mode if self.mode != "auto" else keras_direction(self.monitor)
        assert mode is not None  # checked by the model validator
        return KerasPlateauCurve(
            ctx,
            self.monitor,
            mode=mode,
            factor=float(self.factor),
            patience=self.patience,
            min_delta=float(self.min_delta),
            cooldown=self.cooldown,
            min_lr=float(self.min_lr),
        )


class OptaxReduceOnPlateau(ScheduleNode):
    """optax.contrib.reduce_on_plateau, plus ``metric``: the report name it watches.

    optax scales the updates; here the group's lr is ``base * scale``. ``min_scale`` must be
    in ``[0, 1]`` (above 1 optax would raise the lr at the first decision).
    """

    type: Literal["optax.contrib.reduce_on_plateau"]
    metric: MetricName
    factor: Annotated[float, Field(strict=True, gt=0, lt=1)] = 0.1
    patience: NonNegInt = 10
    rtol: Annotated[float, Field(strict=True, ge=0, le=1)] = 1e-4
    atol: NonNegReal = 0.0
    cooldown: NonNegInt = 0
    accumulation_size: PosInt = 1
    min_scale: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.0

    library: ClassVar[str] = "optax"

    @model_validator(mode="after")
    def _check_tolerances(self) -> OptaxReduceOnPlateau:
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("at least one of rtol or atol must be positive (optax raises too)")
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        return OptaxPlateauCurve(
            ctx,
            self.metric,
            factor=float(self.factor),
            patience=self.patience,
            rtol=float(self.rtol),
            atol=float(self.atol),
            cooldown=self.cooldown,
            accumulation_size=self.accumulation_size,
            min_scale=float(self.min_scale),
        )


NODES: tuple[type[ScheduleNode], ...] = (
    ReduceLROnPlateau,
    TimmPlateauLRScheduler,
    KerasReduceLROnPlateau,
    OptaxReduceOnPlateau,
)

__all__ = [
    "NODES",
    "KerasPlateauCurve",
    "KerasReduceLROnPlateau",
    "OptaxPlateauCurve",
    "OptaxReduceOnPlateau",
    "PlateauCurve",
    "ReduceLROnPlateau",
    "TimmPlateauCurve",
    "TimmPlateauLRScheduler",
    "TorchPlateauCurve",
    "keras_direction",
]
