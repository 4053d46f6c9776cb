"""Composition: torch's SequentialLR and ChainedScheduler, and the ``Epochs`` wrapper.

- ``SequentialLR``: torch 2.13 semantics. The child active at a step is
  ``bisect_right(milestones, t)``; it sees local time ``t - milestone``; a child that starts at
  a milestone > 0 restarts from the group's base (torch's ``_update_lr(0)``, closed form).
- ``ChainedScheduler``: torch steps every child on the same lr, in list order, so the value is
  the recurrence ``lr_t = A_t lr_{t-1} + B_t`` of the children's composed ``chain_map``s,
  evaluated with a vectorised scan (closed-form product when every child is multiplicative)
  in 2,048-step blocks whose edges are checkpointed in a bounded memo (``_MEMO``), keyed by
  the compiled curve and the plateau reductions up to the edge.
- ``Epochs``: a schedule written in epochs, applied per step: ``epoch = step // steps_per_epoch``
  (Lightning ``interval="epoch"``) or ``step / steps_per_epoch`` (``fractional``: timm's
  ``step_update``, CosineAnnealingWarmRestarts' fractional epochs).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from .base import (
    MAX_SCAN,
    MAX_STEP,
    Chainable,
    CompileContext,
    Curve,
    Matrix,
    MetricCurve,
    NonNegInt,
    PosInt,
    ProgramState,
    ScanResume,
    ScheduleNode,
    SpecError,
    Steps,
    chainable,
    compose_maps,
)
from .piecewise import Piecewise, runs
from .plateau import PlateauCurve
from .torch_lambda import chunk_steps

if TYPE_CHECKING:
    from .spec import AnySchedule

MAX_CHILDREN = 1024
"""Most children a SequentialLR or ChainedScheduler may have."""

_CHUNK = 1 << 18
"""Steps per scan chunk: bounds the scan's memory whatever the horizon."""


# --------------------------------------------------------------------------------------------
# SequentialLR


class SequentialLR(ScheduleNode):
    """``torch.optim.lr_scheduler.SequentialLR``: ``schedulers[i]`` from ``milestones[i-1]``."""

    type: Literal["SequentialLR"]
    schedulers: list[AnySchedule] = Field(min_length=1, max_length=MAX_CHILDREN)
    milestones: list[NonNegInt] = Field(max_length=MAX_CHILDREN)

    @model_validator(mode="after")
    def _check_milestones(self) -> SequentialLR:
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(
                f"milestones must have exactly one entry fewer than schedulers: got "
                f"{len(self.schedulers)} scheduler(s) and {len(self.milestones)} milestone(s)"
            )
        if any(b < a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must be sorted ascending, got {self.milestones}")
        return self

    def compile(self, ctx: CompileContext) -> Curve:
        starts = [0, *self.milestones]
        children: list[Curve] = []
        for i, child in enumerate(self.schedulers):
            lo = ctx.step_offset + starts[i]
            hi = ctx.step_offset + self.milestones[i] if i < len(self.milestones) else None
            active_from = max(ctx.active_from, lo)
            if ctx.active_until is not None:
                hi = ctx.active_until if hi is None else min(hi, ctx.active_until)
            children.append(
                child.compile(
                    ctx.child(
                        "schedulers",
                        i,
                        step_offset=lo,
                        active_from=active_from,
                        active_until=hi,
                    )
                )
            )
        return _SequentialCurve(ctx, children, list(self.milestones))


class _SequentialCurve(Piecewise, Chainable):
    """SequentialLR: the piecewise composite with torch's restart at each milestone, its
    chain map (as a ChainedScheduler child), and torch's lead momentum (see piecewise)."""

    def __init__(self, ctx: CompileContext, children: list[Curve], milestones: list[int]) -> None:
        super().__init__(ctx.base, children, milestones)
        self.loc = ctx.loc
        self.base = ctx.base.lr.reshape(-1, 1)
        self.chain: tuple[Chainable, ...] = tuple(chainable(c) for c in self.kids)
        cycling = [i for i, c in enumerate(self.cycled) if c]
        self._lead_from = cycling[-1] if cycling else None
        # Scans of restarted segments (segment_lr) keep checkpoints in _MEMO, one token per
        # segment; blocks as in ChainedScheduler.
        self.step_offset = ctx.step_offset
        self._chunk = chunk_steps(self.n_groups, _CHUNK)
        self._block = min(_BLOCK, self._chunk)
        self._tokens = tuple(next(_TOKENS) for _ in self.kids)
        self._names: tuple[str | None, ...] = (None,) * len(self.kids)

    def name_scans(self, program: str) -> None:
        """Name this curve's scans for the checkpoint backing (see :class:`ScanBacking`):
        ``program`` identifies the compiled spec, the path and segment the scan in it."""
        path = ".".join(str(p) for p in self.loc)
        self._names = tuple(f"{program}/{path}#{k}" for k in range(len(self.kids)))

    def segment_lr(self, k: int, local: Steps, state: ProgramState) -> Matrix:
        child = self.chain[k]
        if self.starts[k] == 0:
            # Active at step 0: torch runs its initial step (SequentialLR reset the lr to the
            # base first), so it behaves exactly as a standalone scheduler.
            return child.lr(local, state)
        restart = child.restart_map(state)
        if restart is None:
            return child.restart_lr(local, state)
        # A restart that keeps the previous lr (MultiplicativeLR): scan the segment from the
        # value the sequence had just before the milestone, in blocks whose edges are kept in
        # the checkpoint memo (so neither the earlier segments nor the start of this one are
        # scanned again for a later window).
        last = int(local.max())
        if last >= MAX_SCAN:
            raise SpecError(
                (*self.loc, "schedulers", k),
                f"this child keeps the lr it finds at its milestone, so it is evaluated step by "
                f"step from there: at most {MAX_SCAN} steps after milestone "
                f"{int(self.starts[k])} (asked {last})",
            )
        start = int(self.starts[k])
        sig = _Signature(self, state)
        token, size = self._tokens[k], self._block
        name = self._names[k] if sig.lasting else None

        def signature(b: int) -> bytes:
            return sig.upto(start + b * size - 1)

        found = self._checkpoint(k, int(local.min()), sig)
        if found is None:
            block = 0
            x = self.lr(np.asarray([start - 1], dtype=np.float64), state)[:, 0]
            _keep(token, name, 0, signature(0), x)
        else:
            block, x = found
        order = np.argsort(local, kind="stable")
        steps_sorted = local[order]
        out = np.empty((self.n_groups, len(local)))
        pos = 0
        while pos < len(order):
            lo = block * size
            hi = min(lo + self._chunk, last + 1)
            a, b_ = child.chain_map(np.arange(lo, hi, dtype=np.float64), state)
            if lo == 0:
                a[:, :1], b_[:, :1] = restart
            values = _scan_blocks(a, b_, x, size)
            x = values[:, -1]
            for j in range((hi - lo) // size):
                edge = block + j + 1
                _keep(token, name, edge, signature(edge), values[:, (j + 1) * size - 1])
            block += (hi - lo) // size
            stop = pos + int(np.searchsorted(steps_sorted[pos:], hi, side="left"))
            if stop > pos:
                sel = order[pos:stop]
                out[:, sel] = values[:, local[sel].astype(np.int64) - lo]
                pos = stop
        return out

    def _checkpoint(self, k: int, first: int, sig: _Signature) -> tuple[int, Matrix] | None:
        """The latest checkpoint of segment ``k``'s scan at or before the block of its local
        step ``first``, valid under ``sig`` (see :func:`_resume`)."""
        start, size = int(self.starts[k]), self._block

        def signature(b: int) -> bytes:
            return sig.upto(start + b * size - 1)

        name = self._names[k] if sig.lasting else None
        return _resume(self._tokens[k], name, first // size, signature, self.n_groups)

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        steps = held = 0
        for k, child in enumerate(self.chain):
            start = int(self.starts[k])
            if start == 0 or child.restart_map({}) is None:
                # The child's own values (lr, restart_lr), in its own time.
                local = None if resume is None else resume.at(resume.start - start)
                s, h = self.kids[k].scanned(end, local)
                steps, held = steps + s, max(held, h)
            elif end > start:
                # segment_lr scans the segment from its milestone up to its last asked step
                # (from its checkpoint, when resumed), a chunk at a time, with the child's
                # maps only (never its own lr: its own recursion is not run).
                n = min(end - start, MAX_SCAN)
                if resume is not None:
                    first = max(resume.start - start, 0)
                    find = partial(self._checkpoint, k, first)
                    block = _resumed_block(self, resume, first // self._block, find)
                    n = max(n - block * self._block, 0)
                steps, held = steps + n, max(held, min(n, self._chunk))
        return steps, held

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        t = np.asarray(t, dtype=np.float64)
        idx, local = self.segments(t)
        a = np.empty((self.n_groups, len(t)))
        b = np.empty((self.n_groups, len(t)))
        positions = np.arange(len(t))
        for k, sel in runs(idx):
            child = self.chain[k]
            ak, bk = child.chain_map(local[sel], state)
            a[:, sel], b[:, sel] = ak, bk
            at0 = positions[sel][local[sel] == 0]
            if len(at0) == 0:
                continue
            if self.starts[k] == 0:
                # SequentialLR's constructor resets the lr to the base, then the child's
                # initial step runs: absolute.
                a0, b0 = child.chain_map(np.zeros(1), state)
                a[:, at0], b[:, at0] = 0.0, a0 * self.base + b0
            else:
                restart = child.restart_map(state)
                if restart is None:
                    a[:, at0] = 0.0
                    b[:, at0] = child.restart_lr(np.zeros(1), state)
                else:
                    a[:, at0], b[:, at0] = restart
        return a, b

    def lead(self, state: ProgramState) -> Matrix:
        """torch leaves momentum alone while a non-cycling child runs: before any cycling child
        has run, it is what the last momentum-cycling child's constructor wrote (its own step
        0), since torch constructs every child before the sequence starts."""
        assert self._lead_from is not None  # only asked when some child cycles momentum
        values = self.kids[self._lead_from].momentum(np.zeros(1), state)
        assert values is not None
        return values


# --------------------------------------------------------------------------------------------
# ChainedScheduler


class ChainedScheduler(ScheduleNode):
    """``torch.optim.lr_scheduler.ChainedScheduler``: every child steps on the same lr."""

    type: Literal["ChainedScheduler"]
    schedulers: list[AnySchedule] = Field(min_length=1, max_length=MAX_CHILDREN)

    def compile(self, ctx: CompileContext) -> Curve:
        children = [
            child.compile(ctx.child("schedulers", i)) for i, child in enumerate(self.schedulers)
        ]
        return _ChainedCurve(ctx, children)


class _ChainedCurve(Chainable):
    def __init__(self, ctx: CompileContext, children: list[Curve]) -> None:
        self.n_groups = ctx.n_groups
        self.loc = ctx.loc
        self.base = ctx.base.lr.reshape(-1, 1)
        self.kids: tuple[Curve, ...] = tuple(children)
        self.chain: tuple[Chainable, ...] = tuple(chainable(c) for c in children)
        # A metric-driven child decides on the chain's value just before it (torch's
        # ReduceLROnPlateau.step() run at that place in the chain): MetricCurve.input_lr.
        # Compile-time wiring, done before this curve (let alone the program) is shared.
        for k, kid in enumerate(children):
            if isinstance(kid, MetricCurve):
                kid.input_lr = partial(self._value_before, k)
        self.horizon = min(c.mult_horizon() for c in self.chain)
        self.step_offset = ctx.step_offset
        # Scan chunks hold at most 2M values (16 MB a matrix; the scan keeps about six): up to
        # 8 groups scan _CHUNK steps at a time, 1,024 groups 2,048. Blocks (the checkpoint
        # grid, see lr) divide chunks: both are powers of two.
        self._chunk = chunk_steps(self.n_groups, _CHUNK)
        self._block = min(_BLOCK, self._chunk)
        # Scan checkpoints live in the module's _MEMO under this curve's token (so identical
        # specs compiled twice in a process never share bits they did not compute), and under
        # its name in the backing, where every process with the same spec shares them: one
        # computed on another replica (another CPU's or numpy's cos) may differ from a local
        # scan in the last bits, within torch's own rounding.
        self._token = next(_TOKENS)
        self._name: str | None = None

    def name_scans(self, program: str) -> None:
        """Name this curve's scan for the checkpoint backing (see :class:`ScanBacking`)."""
        self._name = f"{program}/{'.'.join(str(p) for p in self.loc)}"

    def children(self) -> Sequence[Curve]:
        return self.kids

    def mult_horizon(self) -> int:
        return self.horizon

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        steps, held = super().scanned(end, resume)
        if end > self.horizon:
            n = min(end, self.horizon + MAX_SCAN) - self.horizon
            if resume is not None and resume.start > self.horizon:
                # The scan starts at the checkpoint of the window's first step (lr, _start).
                want = (resume.start - self.horizon) // self._block
                block = _resumed_block(self, resume, want, partial(self._checkpoint, want))
                n = max(n - block * self._block, 0)
            steps, held = steps + n, max(held, min(n, self._chunk))
        return steps, held

    def _value_before(self, k: int, t: Steps, state: ProgramState) -> Matrix:
        """The chain's lr at steps ``t`` after step ``t - 1`` and the maps of children
        ``0..k-1`` at ``t`` (the base before step 0): ``MetricCurve.input_lr`` of child k."""
        t = np.asarray(t, dtype=np.float64)
        prev = self.lr(np.maximum(t - 1, 0), state)
        x = np.where(t[None, :] > 0, prev, self.base)
        for kid in self.chain[:k]:
            a, b = kid.chain_map(t, state)
            x = a * x + b
        return x

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        out = np.ones((self.n_groups, len(t)))
        for child in self.chain:
            out = out * child.factor(t, state)
        return out

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        a, b = self.chain[0].chain_map(t, state)
        for child in self.chain[1:]:
            a, b = compose_maps((a, b), child.chain_map(t, state))
        return a, b

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        # Momentum cyclers (CyclicLR, OneCycleLR) write absolute values: the last one wins.
        for child in reversed(self.kids):
            values = child.momentum(t, state)
            if values is not None:
                return values
        return None

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        out = np.empty((self.n_groups, len(t)))
        if len(t) == 0:
            return out
        if np.any(np.floor(t) != t):
            raise SpecError(self.loc, "ChainedScheduler steps only at whole steps or epochs")
        fast = t < self.horizon
        if fast.any():
            out[:, fast] = self.base * self.factor(t[fast], state)
        if fast.all():
            return out
        slow = np.nonzero(~fast)[0]
        order = slow[np.argsort(t[slow], kind="stable")]
        end = int(t[order[-1]]) + 1
        if end - self.horizon > MAX_SCAN:
            raise SpecError(
                self.loc,
                f"this ChainedScheduler is recursive from step {self.horizon} (a child adds to "
                f"the lr) and can be evaluated only up to step {self.horizon + MAX_SCAN}",
            )
        sig = _Signature(self, state)
        k = self._block
        block, x = self._start(int(t[order[0]]), sig, state)
        pos = 0
        while pos < len(order):
            # A chunk is whole blocks from the block the next asked step needs; each block is
            # scanned on its own from the value carried out of the previous one, so the bits
            # of every value depend only on the block grid, never on where a request began.
            lo = self.horizon + block * k
            hi = min(lo + self._chunk, end)
            a, b = self.chain_map(np.arange(lo, hi, dtype=np.float64), state)
            values = _scan_blocks(a, b, x, k)
            x = values[:, -1]
            for j in range((hi - lo) // k):
                self._record(block + j + 1, values[:, (j + 1) * k - 1], sig)
            block += (hi - lo) // k
            stop = pos + int(np.searchsorted(t[order[pos:]], hi, side="left"))
            if stop > pos:
                sel = order[pos:stop]
                out[:, sel] = values[:, t[sel].astype(np.int64) - lo]
                pos = stop
        return out

    def _record(self, block: int, x: Matrix, sig: _Signature) -> None:
        """Keep the lr just before ``block`` (at step ``horizon + block * k - 1``) in the
        memo, under the state that decided it (see :class:`_Signature`)."""
        name = self._name if sig.lasting else None
        _keep(self._token, name, block, sig.upto(self.horizon + block * self._block - 1), x)

    def _checkpoint(self, want: int, sig: _Signature) -> tuple[int, Matrix] | None:
        """The latest checkpoint at or before block ``want`` valid under ``sig``."""

        def signature(block: int) -> bytes:
            return sig.upto(self.horizon + block * self._block - 1)

        name = self._name if sig.lasting else None
        return _resume(self._token, name, want, signature, self.n_groups)

    def _start(self, first: int, sig: _Signature, state: ProgramState) -> tuple[int, Matrix]:
        """The block the scan starts at and the lr just before it: the latest checkpoint at
        or before the block of step ``first`` that is valid for this state, else block 0 from
        the closed-form product at ``horizon - 1``."""
        found = self._checkpoint((first - self.horizon) // self._block, sig)
        if found is not None:
            return found
        if self.horizon == 0:
            return 0, self.base[:, 0].copy()
        x = self.base * self.factor(np.asarray([self.horizon - 1], dtype=np.float64), state)
        return 0, x[:, 0]


_BLOCK = 2048
"""Steps per scan block (the checkpoint interval): a window resumes at most this far back."""

_MEMO_BYTES = 64 << 20
"""Most bytes the scan checkpoints of every compiled chain may hold together."""

_TOKENS = itertools.count()

SCAN_FORMAT = 1
"""Version of the scan's arithmetic and block grid, part of every checkpoint's name: bump it
when either changes, so that checkpoints a backing kept from an older lrserve are not used."""

_LOAD_GAP = 2
"""A backing is asked for a checkpoint only when the memo's latest valid one (or the scan's
start) is more than this many blocks before the one a scan needs: a trainer walking forward
never asks it, nor does a window near the start (nor are the first blocks' edges stored)."""


class ScanBacking(Protocol):
    """Where scan checkpoints outlive the process (the service's database): a scan far into a
    run resumes from a stored checkpoint after a restart or on another replica.

    A checkpoint is a pure function of its name (the compiled spec and the scan in it, see
    :func:`name_scans`), block and signature (the metric-driven state it depends on), so
    storing, sharing or losing one never changes a value. Neither method may raise."""

    def load(self, curve: str, most: int, least: int) -> list[tuple[int, bytes, bytes]]:
        """Stored ``(block, signature, lr as float64 bytes)`` of ``curve`` with ``least <=
        block <= most``, latest block first (a few: the scan takes the first valid one)."""

    def save(self, curve: str, block: int, signature: bytes, lr: bytes) -> None:
        """Keep a new checkpoint (may be buffered, or dropped)."""


_BACKING: ScanBacking | None = None


def set_scan_backing(backing: ScanBacking | None, only_if: ScanBacking | None = None) -> None:
    """Use ``backing`` for the scan checkpoints of every program (``None``: memory only);
    with ``only_if``, only while that one is in use (a service closing unsets its own)."""
    global _BACKING
    if only_if is None or _BACKING is only_if:
        _BACKING = backing


def _resume(
    token: int,
    name: str | None,
    want: int,
    signature: Callable[[int], bytes],
    n_groups: int,
) -> tuple[int, Matrix] | None:
    """The latest checkpoint of scan ``token`` at or before block ``want`` valid for the
    request's state (``signature(block)``): from the memo, else from the backing when the
    memo has none within :data:`_LOAD_GAP` blocks; ``None`` if neither has one."""
    best: tuple[int, Matrix] | None = None
    for block in _MEMO.blocks(token, want):
        x = _MEMO.get((token, block, signature(block)))
        if x is not None:
            best = (block, x)
            break
    backing = _BACKING
    if backing is None or name is None or want - (best[0] if best else 0) <= _LOAD_GAP:
        return best  # (scanning those few blocks costs less than a read)
    for block, stored_signature, lr in backing.load(name, want, best[0] + 1 if best else 0):
        if stored_signature != signature(block) or len(lr) != 8 * n_groups:
            continue
        x = np.frombuffer(lr, dtype="<f8").astype(np.float64)
        _MEMO.put((token, block, stored_signature), x)
        return block, x
    return best


def _resumed_block(
    curve: _ChainedCurve | _SequentialCurve,
    resume: ScanResume,
    want: int,
    find: Callable[[_Signature], tuple[int, Matrix] | None],
) -> int:
    """The block a scan that needs block ``want`` is priced from (``scanned`` with
    ``resume``): the checkpoint ``find`` finds for the state, else block 0; without a state,
    where a trainer walking forward resumes: the memo keeps every block edge a scan passes,
    and a backing is read when the memo's latest is more than ``_LOAD_GAP`` blocks back, so
    the scan starts at most that far back."""
    if resume.state is None:
        return max(want - _LOAD_GAP, 0)
    found = find(_Signature(curve, resume.state))
    return 0 if found is None else found[0]


def _keep(token: int, name: str | None, block: int, signature: bytes, x: Matrix) -> None:
    """Checkpoint the lr just before ``block`` of scan ``token``: in the memo, and in the
    backing when it is new here and far enough from the scan's start to be ever read back."""
    if _MEMO.put((token, block, signature), x) and block > _LOAD_GAP:
        backing = _BACKING
        if backing is not None and name is not None:
            backing.save(name, block, signature, np.ascontiguousarray(x, dtype="<f8").tobytes())


def _scan_blocks(a: Matrix, b: Matrix, x0: Matrix, k: int) -> Matrix:
    """``scan_affine`` over consecutive blocks of ``k`` steps, each block from the last value
    of the one before (the first from ``x0``). The passes run on every block at once; only
    the carry is sequential. Bit for bit what ``scan_affine`` gives block by block."""
    g, n = a.shape
    m = -(-n // k)
    if m * k != n:
        # Pad the last block with identities: a scan's value at a position depends only on
        # the maps at and before it, so padding after changes nothing that is kept.
        pad = m * k - n
        a = np.concatenate([a, np.ones((g, pad))], axis=1)
        b = np.concatenate([b, np.zeros((g, pad))], axis=1)
    else:
        a = np.array(a, dtype=np.float64, copy=True)
        b = np.array(b, dtype=np.float64, copy=True)
    a3 = a.reshape(g, m, k)
    b3 = b.reshape(g, m, k)
    d = 1
    while d < k:
        a_prev = a3[:, :, :-d].copy()
        b3[:, :, d:] = a3[:, :, d:] * b3[:, :, :-d] + b3[:, :, d:]
        a3[:, :, d:] = a3[:, :, d:] * a_prev
        d *= 2
    out = np.empty((g, m, k))
    x = np.asarray(x0, dtype=np.float64).reshape(-1, 1)
    for j in range(m):
        out[:, j] = a3[:, j] * x + b3[:, j]
        x = out[:, j, -1:]
    return out.reshape(g, m * k)[:, :n]


class _Signature:
    """What of a request's metric-driven state a chain's scan depends on, up to a step.

    A checkpoint at local step ``e`` depends on the reductions that apply at global steps
    ``<= e + offset`` only, so checkpoints before the first reduction that differs stay valid
    as a plateau child's state grows. Plateau nodes are fingerprinted by their reduction
    steps and factors; any other metric node by its whole state (conservative)."""

    def __init__(self, curve: _ChainedCurve | _SequentialCurve, state: ProgramState) -> None:
        self.offset = curve.step_offset
        # Per plateau node: its reductions as rows (step, factor bits per group) in step order,
        # so the reductions up to a step are a prefix; the fingerprint of a prefix is the hash
        # of its bytes, extended incrementally as a scan moves forward (O(R x G) once per
        # request, not once per checkpoint).
        self.steps: list[npt.NDArray[np.int64]] = []
        self.rows: list[npt.NDArray[np.int64]] = []
        other: list[str] = []
        for node in curve.metric_nodes():
            if isinstance(node, PlateauCurve):
                steps, factors, _, _ = node._table(node._node_state(state))
                rows = np.empty((len(steps), 1 + factors.shape[0]), dtype=np.int64)
                rows[:, 0] = steps
                rows[:, 1:] = np.ascontiguousarray(factors.T).view(np.int64)
                if len(steps) > 1 and np.any(np.diff(steps) < 0):
                    order = np.argsort(steps, kind="stable")
                    steps, rows = steps[order], rows[order]
                self.steps.append(np.asarray(steps, dtype=np.int64))
                self.rows.append(rows)
            else:
                other.append(json.dumps(state.get(node.path), sort_keys=True, default=str))
        self.other = hashlib.blake2b("\n".join(other).encode(), digest_size=16).digest()
        self.stateless = not self.steps and not other
        self.lasting = not other
        """Whether checkpoints under this signature are worth a backing: not where a metric
        node other than a plateau is fingerprinted whole (its every report a new signature)."""
        self._running = [(0, hashlib.blake2b(digest_size=16)) for _ in self.steps]
        self._prefix: dict[tuple[int, int], bytes] = {}
        self._seen: dict[tuple[int, ...], bytes] = {}

    def _digest(self, i: int, count: int) -> bytes:
        """Hash of the first ``count`` rows of table ``i`` (the same bytes however reached)."""
        hit = self._prefix.get((i, count))
        if hit is not None:
            return hit
        pos, running = self._running[i]
        if count >= pos:
            running.update(self.rows[i][pos:count].tobytes())
            self._running[i] = (count, running)
            digest = running.copy().digest()
        else:
            digest = hashlib.blake2b(self.rows[i][:count].tobytes(), digest_size=16).digest()
        self._prefix[(i, count)] = digest
        return digest

    def upto(self, step: int) -> bytes:
        """Fingerprint of the state the scan up to local ``step`` (inclusive) depends on."""
        if self.stateless:
            return b""
        g = step + self.offset
        counts = tuple(int(np.searchsorted(steps, g, side="right")) for steps in self.steps)
        hit = self._seen.get(counts)
        if hit is not None:
            return hit
        h = hashlib.blake2b(self.other, digest_size=16)
        for i, count in enumerate(counts):
            h.update(count.to_bytes(8, "little"))
            h.update(self._digest(i, count))
        digest = h.digest()
        self._seen[counts] = digest
        return digest


class _Checkpoints:
    """The scan checkpoints of every compiled chain: an LRU bounded by bytes, keyed by
    ``(curve token, block, state fingerprint)``, with a per-curve sorted index of blocks.
    A pure cache (values are functions of the key); thread-safe under one lock; stored
    arrays are read-only copies."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._lru: OrderedDict[tuple[int, int, bytes], npt.NDArray[np.float64]] = OrderedDict()
        self._index: dict[int, list[int]] = {}
        self._count: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, bytes]) -> npt.NDArray[np.float64] | None:
        with self._lock:
            value = self._lru.get(key)
            if value is not None:
                self._lru.move_to_end(key)
            return value

    def put(self, key: tuple[int, int, bytes], x: Matrix) -> bool:
        """Keep ``x`` under ``key``; False when it was already kept."""
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return False
            value = np.array(x, dtype=np.float64)
            value.setflags(write=False)
            self._lru[key] = value
            self.bytes += value.nbytes + _ENTRY_OVERHEAD
            token, block, _ = key
            n = self._count.get((token, block), 0)
            if n == 0:
                bisect.insort(self._index.setdefault(token, []), block)
            self._count[(token, block)] = n + 1
            while self.bytes > self.limit and self._lru:
                old, dropped = self._lru.popitem(last=False)
                self.bytes -= dropped.nbytes + _ENTRY_OVERHEAD
                self._forget(old)
            return True

    def _forget(self, key: tuple[int, int, bytes]) -> None:
        token, block, _ = key
        n = self._count.pop((token, block)) - 1
        if n:
            self._count[(token, block)] = n
            return
        blocks = self._index[token]
        del blocks[bisect.bisect_left(blocks, block)]
        if not blocks:
            del self._index[token]

    def blocks(self, token: int, most: int) -> list[int]:
        """The blocks ``<= most`` with some checkpoint of curve ``token``, latest first."""
        with self._lock:
            blocks = self._index.get(token, [])
            return blocks[: bisect.bisect_right(blocks, most)][::-1]

    def __len__(self) -> int:
        return len(self._lru)


_ENTRY_OVERHEAD = 256
"""Bytes an entry costs besides its array (key, dict slot, array header), for the bound."""

_MEMO = _Checkpoints(_MEMO_BYTES)


# --------------------------------------------------------------------------------------------
# Epochs wrapper


class Epochs(ScheduleNode):
    """A schedule written in epochs, applied per step.

    ``fractional: false`` (default): the schedule advances once per ``steps_per_epoch`` steps
    (Lightning's ``interval="epoch"``). ``fractional: true``: it is evaluated at
    ``step / steps_per_epoch`` (timm's ``step_update``, CosineAnnealingWarmRestarts'
    ``step(epoch + i / iters)``). Metric-driven nodes are refused inside (they react to
    reports at steps, not epochs).
    """

    library = "lrserve"
    type: Literal["Epochs"]
    steps_per_epoch: PosInt
    fractional: bool = Field(default=False, strict=True)
    schedule: AnySchedule

    def compile(self, ctx: CompileContext) -> Curve:
        extra = {**ctx.extra, "fractional_epochs": self.fractional}
        child = self.schedule.compile(ctx.child("schedule", in_epochs=True, extra=extra))
        for node in child.metric_nodes():
            raise SpecError(
                (*ctx.loc, "schedule"),
                f"metric-driven schedule at {node.path} cannot be inside Epochs: it reacts to "
                "reports at steps; put the Epochs wrapper around its time-driven siblings "
                "instead",
            )
        if self.fractional and _contains_chained(child):
            raise SpecError(
                (*ctx.loc, "fractional"),
                "ChainedScheduler is recursive (one step at a time) and cannot take "
                "fractional epochs; use fractional: false",
            )
        return _EpochsCurve(ctx, child, self.steps_per_epoch, self.fractional)


def _contains_chained(curve: Curve) -> bool:
    return isinstance(curve, _ChainedCurve) or any(_contains_chained(c) for c in curve.children())


class _EpochsCurve(Chainable):
    def __init__(self, ctx: CompileContext, child: Curve, spe: int, fractional: bool) -> None:
        self.n_groups = ctx.n_groups
        self.child = child
        self.chain = chainable(child)
        self.spe = spe
        self.fractional = fractional

    def children(self) -> Sequence[Curve]:
        return (self.child,)

    def _epoch(self, t: Steps) -> Steps:
        t = np.asarray(t, dtype=np.float64)
        return t / self.spe if self.fractional else np.floor_divide(t, self.spe)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.child.lr(self._epoch(t), state)

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        return self.child.momentum(self._epoch(t), state)

    def restart_lr(self, t: Steps, state: ProgramState) -> Matrix:
        return self.chain.restart_lr(self._epoch(t), state)

    def restart_map(self, state: ProgramState) -> tuple[Matrix, Matrix] | None:
        return self.chain.restart_map(state)

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        epoch = None if resume is None else resume.at(resume.start // self.spe)
        return self.child.scanned(-(-end // self.spe) + 1, epoch)

    def mult_horizon(self) -> int:
        if self.fractional:
            return 0
        return min(self.chain.mult_horizon() * self.spe, MAX_STEP + 1)

    def factor(self, t: Steps, state: ProgramState) -> Matrix:
        return self.chain.factor(self._epoch(t), state)

    def chain_map(self, t: Steps, state: ProgramState) -> tuple[Matrix, Matrix]:
        if self.fractional:
            return super().chain_map(t, state)
        t = np.asarray(t, dtype=np.float64)
        a = np.ones((self.n_groups, len(t)))
        b = np.zeros((self.n_groups, len(t)))
        edge = np.mod(t, self.spe) == 0
        if edge.any():
            a[:, edge], b[:, edge] = self.chain.chain_map(t[edge] / self.spe, state)
        return a, b


NODES: tuple[type[ScheduleNode], ...] = (SequentialLR, ChainedScheduler, Epochs)

__all__ = ["NODES", "ChainedScheduler", "Epochs", "SequentialLR"]
