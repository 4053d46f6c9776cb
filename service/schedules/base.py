"""Building blocks shared by every schedule node.

A schedule *spec* is a tree of pydantic models (``ScheduleNode`` subclasses, one per
``"type"``). ``ScheduleNode.compile(ctx)`` turns a node into a ``Curve``: the same
schedule bound to a fixed list of parameter groups, evaluated vectorised over an array
of steps. Metric-driven nodes (plateau variants) keep their mutable part in a plain,
JSON-serialisable ``state`` dict that is passed in, never stored on the curve: the
service keeps that dict in its database and the transitions stay pure.

Shapes: ``t`` is a 1-D float64 array of steps (local to the node: a child of
SequentialLR sees its own time starting at 0); every per-group result is a
``(n_groups, len(t))`` float64 matrix.

Two protocols: ``Curve`` is the value protocol every compiled node implements (``lr``, an
optional ``momentum``, ``children``); ``Chainable`` adds torch's step-by-step ("chainable")
recursion, which only ChainedScheduler and SequentialLR consume and only the nodes that are
recursive in torch implement (``chainable(curve)`` gives any other curve the absolute default).

Immutability and threads: a compiled ``Curve`` (and the ``Program`` holding it) is immutable
after construction, except for caches behind a lock. A compiled program is shared (an
``lru_cache`` in the service) and evaluated concurrently on the event loop and in worker
threads, so evaluation must be thread-safe: a curve never writes an attribute while it is
evaluated, other than filling a cache, and every cache is a pure function of the spec,
bounded, and filled under one lock per cache (reads of an entry already there take no lock;
cached arrays are read-only). The Program's one-step memo is a ``functools.lru_cache``.
Compile-time wiring (ChainedScheduler setting ``MetricCurve.input_lr`` on its children while it
is itself constructed) happens before the root curve exists, so it is part of construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

Steps = npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]

# JSON-serialisable state of every metric-driven node of a program, keyed by node path.
ProgramState = dict[str, dict[str, Any]]

MAX_NESTING = 16
"""Deepest composition (SequentialLR inside ChainedScheduler inside ...) a spec may have."""

MAX_STEP = 2**53
"""Largest step a horizon or a query may name: beyond it float64 steps are no longer exact."""

MAX_SCAN = 1 << 26
"""Most steps a recursive evaluation (ChainedScheduler with non-multiplicative children) scans."""

# Argument types shared by the spec models. Strict: JSON numbers only (no "0.5" strings, no
# booleans, no 3.0 for an int); finiteness comes from ScheduleNode's allow_inf_nan=False.
Real = Annotated[float, Field(strict=True)]
NonNegReal = Annotated[float, Field(strict=True, ge=0)]
UnitReal = Annotated[float, Field(strict=True, ge=0, le=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0, le=MAX_STEP)]
PosInt = Annotated[int, Field(strict=True, ge=1, le=MAX_STEP)]


def non_empty_per_group(value: float | Sequence[float]) -> Any:
    """A field validator's check for "a number, or one number per parameter group": an empty
    list is refused (its length can only be checked against the groups at compile time)."""
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError("give a number or one number per parameter group")
    return value


class SpecError(ValueError):
    """A spec that parses but cannot be compiled for these groups.

    ``loc`` names the offending field as a path (``("schedule", "schedulers", 1, "max_lr")``)
    so the HTTP layer can report it the way pydantic reports field errors.
    """

    def __init__(self, loc: Sequence[str | int], msg: str) -> None:
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {msg}")
        self.loc = tuple(loc)
        self.msg = msg


@dataclass(frozen=True)
class GroupBase:
    """The starting hyperparameters of the parameter groups a curve is compiled for."""

    names: tuple[str, ...]
    lr: npt.NDArray[np.float64]
    """Initial (base) learning rate per group, shape ``(G,)``."""
    momentum: npt.NDArray[np.float64]
    """Initial momentum or ``betas[0]`` per group, ``nan`` where the group has neither."""

    @property
    def n_groups(self) -> int:
        return len(self.names)

    def subset(self, index: Sequence[int]) -> GroupBase:
        idx = list(index)
        return GroupBase(
            names=tuple(self.names[i] for i in idx), lr=self.lr[idx], momentum=self.momentum[idx]
        )

    def with_lr(self, lr: npt.NDArray[np.float64]) -> GroupBase:
        return replace(self, lr=np.asarray(lr, dtype=np.float64))


@dataclass(frozen=True)
class CompileContext:
    """Where in the tree a node is compiled, and for which groups."""

    base: GroupBase
    loc: tuple[str | int, ...] = ("schedule",)
    """Field path of the node in the request body (also its state key)."""
    step_offset: int = 0
    """Global step = local ``t`` + ``step_offset`` (SequentialLR shifts its children)."""
    active_from: int = 0
    active_until: int | None = None
    """Metric-driven nodes observe reports for global steps in ``[active_from, active_until)``."""
    in_epochs: bool = False
    """Inside an epoch wrapper: time is epochs, not steps (metric nodes are refused there)."""
    depth: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form flags for descendants. ``"fractional_epochs": True`` (set by a fractional
    ``Epochs`` wrapper): ``t`` is a fractional epoch driven like torch's ``step(epoch)``."""

    @property
    def n_groups(self) -> int:
        return self.base.n_groups

    @property
    def path(self) -> str:
        """State key of the node at this location: ``schedule.schedulers.1``."""
        return ".".join(str(p) for p in self.loc)

    def child(self, *loc: str | int, **changes: Any) -> CompileContext:
        if self.depth + 1 > MAX_NESTING:
            raise SpecError(self.loc, f"schedules nest deeper than {MAX_NESTING} levels")
        return replace(self, loc=(*self.loc, *loc), depth=self.depth + 1, **changes)

    def per_group(self, value: float | Sequence[float], name: str) -> npt.NDArray[np.float64]:
        """A scalar or per-group list argument as a ``(G, 1)`` column (torch's list rule)."""
        if isinstance(value, (list, tuple)):
            if len(value) != self.n_groups:
                raise SpecError(
                    (*self.loc, name),
                    f"has {len(value)} entries but the run has {self.n_groups} parameter "
                    f"group(s) {list(self.base.names)}; give one value per group or a single "
                    "number",
                )
            arr = np.asarray(value, dtype=np.float64)
        else:
            arr = np.full(self.n_groups, float(value), dtype=np.float64)  # type: ignore[arg-type]
        return arr.reshape(-1, 1)


@dataclass(frozen=True)
class ScanResume:
    """How to price a window whose scans resume from their checkpoints (:meth:`Curve.scanned`).

    ``start`` is the window's first step in the curve's own time. With ``state``, a scan
    counts from the latest checkpoint valid for that state that the process can find (its
    memo, then the scan backing: this may read the database); with ``state=None``, from one
    at most ``_LOAD_GAP + 1`` blocks back, as a trainer walking forward always finds."""

    start: int
    state: ProgramState | None = None

    def at(self, start: int) -> ScanResume:
        """The same pricing for a child whose window starts at ``start`` of its own time."""
        return ScanResume(max(start, 0), self.state)


class Curve(ABC):
    """A schedule node compiled for a fixed list of parameter groups: the value protocol.

    ``lr`` is all a node must give; ``momentum`` where it cycles momentum; ``children`` where
    it composes other curves (the tree ``metric_nodes`` walks). Nodes that torch computes
    recursively also implement :class:`Chainable`.
    """

    n_groups: int

    @abstractmethod
    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        """Learning rate per group at local steps ``t``: shape ``(G, len(t))``."""

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        """Momentum (or beta1) per group, or ``None`` where this node leaves momentum alone."""
        return None

    def children(self) -> Sequence[Curve]:
        return ()

    def metric_nodes(self) -> Iterator[MetricCurve]:
        """Every metric-driven node in this subtree, in tree order (the order they observe)."""
        for child in self.children():
            yield from child.metric_nodes()

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        """An upper bound of the work model (:mod:`.cost`) for a recursion no closed form
        replaces: ``(steps, held)``, how many steps evaluating any local steps below ``end``
        may go through one by one (ChainedScheduler's scan, MultiplicativeLR's running
        product), and how many of them are held in memory at once.

        Without ``resume``, caches are ignored, so the bound depends on the spec and ``end``
        only (a cold process scans from the start). With it, a scan is counted from the
        checkpoint it would resume from (see :class:`ScanResume`). Default: the children's,
        at the same ``end`` and ``resume`` (a child's local time is never later than its
        parent's; a curve whose children run in another time maps ``resume`` itself)."""
        steps = held = 0
        for child in self.children():
            s, h = child.scanned(end, resume)
            steps, held = steps + s, max(held, h)
        return steps, held


class Chainable(Curve):
    """torch's chainable recursion, for the nodes ChainedScheduler and SequentialLR compose.

    Every method has the default of an *absolute* scheduler (LambdaLR, CyclicLR, OneCycleLR,
    CosineAnnealingWarmRestarts, every other library's node): its value at ``t`` does not
    depend on the lr before. Such nodes do not implement this protocol at all; a consumer
    asks ``chainable(curve)``, which gives them these defaults.
    """

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        """torch's recursive ("chainable") step at integer steps ``t`` as an affine map.

        ``lr_t = A * lr_{t-1} + B`` with ``(A, B)`` returned as two ``(G, len(t))`` matrices;
        ``t = 0`` is the step torch's constructor performs (its ``lr_{-1}`` is the value the
        group had before). ChainedScheduler composes its children's maps and scans them, which
        reproduces torch exactly where the product of closed forms does not (CosineAnnealingLR
        with ``eta_min`` or past ``T_max``). The default is an absolute scheduler:
        ``A = 0``, ``B = lr(t)``.
        """
        values = self.lr(t, state)
        return np.zeros_like(values), values

    def mult_horizon(self) -> int:
        """Steps ``[0, H)`` over which this node's chain map is purely multiplicative (B = 0).

        Over that range ``factor`` gives the cumulative product of the chain map's ``A`` (torch's
        recursion from the group's base), which lets ChainedScheduler multiply closed forms
        instead of scanning. ``0`` (the default) means "never": absolute nodes, and nodes
        that add a constant (CosineAnnealingLR with ``eta_min``).
        """
        return 0

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        """``lr(t) / base`` for ``t < mult_horizon()``, shape ``(G, len(t))`` (see there)."""
        raise NotImplementedError(f"{type(self).__name__} is not multiplicative")

    def restart_lr(self, t: Steps, state: ProgramState) -> Matrix:
        """Values when SequentialLR (re)starts this node at a milestone, at local steps ``t``.

        torch restarts a child with ``_update_lr(0)`` (the closed form from the base) and then
        recurses. That equals ``lr`` except for a few corner cases a node overrides
        (ConstantLR with ``total_iters=0``).
        """
        return self.lr(t, state)

    def restart_map(self, state: ProgramState) -> tuple[Matrix, Matrix] | None:
        """The affine map torch applies at a SequentialLR milestone, as ``(G, 1)`` matrices.

        ``None`` (the default) means absolute: ``lr = restart_lr(0)``, independent of the lr
        before the milestone. A node whose restart keeps the previous lr (MultiplicativeLR:
        ``lr * lambda(0)``) returns its map; SequentialLR then scans that segment from the
        value the sequence had just before the milestone, using ``chain_map`` for later steps.
        """
        return None


class _Absolute(Chainable):
    """An absolute curve seen through the Chainable protocol (every default applies)."""

    def __init__(self, curve: Curve) -> None:
        self.n_groups = curve.n_groups
        self.curve = curve

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.curve.lr(t, state)

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        return self.curve.momentum(t, state)

    def children(self) -> Sequence[Curve]:
        return (self.curve,)


def chainable(curve: Curve) -> Chainable:
    """``curve`` as a :class:`Chainable`: itself if it implements the protocol, else a view
    with the absolute defaults (``A = 0, B = lr``; no multiplicative range; restart = ``lr``)."""
    return curve if isinstance(curve, Chainable) else _Absolute(curve)


class MetricCurve(Curve):
    """A metric-driven node (ReduceLROnPlateau and the other libraries' variants).

    Its value is a per-group multiplier that changes only through ``observe``; the
    reductions it has decided live in its state (``"reductions": [{"step", "factor"}]``)
    so that any window of steps can be evaluated without replaying reports.
    """

    path: str
    metric: str
    active_from: int
    active_until: int | None
    input_lr: Callable[[Steps, ProgramState], Matrix] | None = None
    """Hook for ChainedScheduler, set on the compiled child at compile time: the chain's lr at
    the node's local steps ``t`` *just before* this node's map for step ``t`` (torch's
    recursion with every step before ``t`` and the children before this one at ``t`` applied).
    A reduction decided by a report at ``s`` reduces that value at ``s + 1``. ``None``
    (standalone, SequentialLR child): the node multiplies its own base lr."""

    def metric_nodes(self) -> Iterator[MetricCurve]:
        yield self

    @abstractmethod
    def initial_state(self) -> dict[str, Any]:
        """The node's state before any report (JSON-serialisable)."""

    @abstractmethod
    def observe(
        self, node_state: dict[str, Any], value: float, step: int, program_state: ProgramState
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pure transition for one report of ``metric`` at global ``step``.

        Returns ``(new_node_state, decision)``; ``decision`` is JSON-serialisable and has at
        least ``"reduced": bool``. A reduction applies from ``step + 1``.
        """

    def observes(self, step: int) -> bool:
        return step >= self.active_from and (self.active_until is None or step < self.active_until)


class ScheduleNode(BaseModel):
    """Base of every spec model: strict, immutable, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    type: str
    library: ClassVar[str] = "torch"
    """Which library's semantics the node reproduces (for docs)."""

    def compile(self, ctx: CompileContext) -> Curve:
        raise NotImplementedError(f"{self.type} cannot be compiled yet")


def as_steps(values: Sequence[int] | npt.ArrayLike) -> Steps:
    return np.asarray(values, dtype=np.float64)


def compose_maps(
    first: tuple[Matrix, Matrix], then: tuple[Matrix, Matrix]
) -> tuple[Matrix, Matrix]:
    """The affine map ``x -> then(first(x))`` elementwise: ``(A2 A1, A2 B1 + B2)``."""
    a1, b1 = first
    a2, b2 = then
    return a2 * a1, a2 * b1 + b2


def scan_affine(a: Matrix, b: Matrix, x0: npt.NDArray[np.float64]) -> Matrix:
    """Every prefix of the recurrence ``x_t = a_t x_{t-1} + b_t`` from ``x_{-1} = x0``.

    ``a``, ``b``: ``(G, n)``; ``x0``: ``(G,)`` or ``(G, 1)``. Hillis-Steele inclusive scan of
    affine-map composition: ``ceil(log2 n)`` vectorised passes, no per-step Python loop.
    """
    a = np.array(a, dtype=np.float64, copy=True)
    b = np.array(b, dtype=np.float64, copy=True)
    n = a.shape[1]
    d = 1
    while d < n:
        # Compose each map with the one d steps earlier (read before write: RHS is evaluated
        # from the old arrays before assignment).
        a_prev = a[:, :-d].copy()
        b[:, d:] = a[:, d:] * b[:, :-d] + b[:, d:]
        a[:, d:] = a[:, d:] * a_prev
        d *= 2
    return a * np.asarray(x0, dtype=np.float64).reshape(-1, 1) + b
