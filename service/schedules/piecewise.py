"""One piecewise composite: child schedules back to back, each in its own time.

Used by torch's ``SequentialLR`` (``torch_compose``), ``optax.join_schedules`` and the optax
schedules optax itself builds with ``join_schedules`` (``sgdr_schedule``,
``warmup_cosine_decay_schedule``, ``warmup_exponential_decay_schedule``).

Segments: child ``k`` covers ``[starts[k], starts[k + 1])`` with ``starts = [0, *boundaries]``
(non-decreasing); the child active at ``t`` is ``bisect_right(boundaries, t)``, so a zero-length
segment is never active (torch's ``bisect_right`` and optax's chain of
``where(step < boundary, ...)`` agree on that). The child sees local time ``t - starts[k]``.

Values: ``segment_lr(k, local, state)``, by default the child's own ``lr(local)`` (optax: a
schedule is a pure function of its own count). ``SequentialLR`` overrides it with torch's
restart at a milestone.

Momentum, one rule for every piecewise schedule: a segment whose child cycles momentum gives
the child's momentum at its local steps; a segment whose child does not leaves momentum alone,
so it holds the value last written: the last value of the nearest earlier (non-empty) cycling
segment. Before any cycling segment has run, that is the *lead* value (``lead_momentum``):

- ``optax.join_schedules`` (and everything else here): the group's own momentum. optax children
  are pure functions of their count; nothing is written before a child runs.
- ``SequentialLR``: what torch's constructors left, the step-0 momentum of the *last*
  momentum-cycling child (torch builds every child before the sequence starts, and each
  cycling constructor writes its step-0 momentum).

A composite none of whose children cycles momentum leaves momentum alone (``None``).

SGDR-style restarts that are a closed form of the step (CosineAnnealingWarmRestarts, Keras's
CosineDecayRestarts, timm's cycles, transformers' hard restarts) stay closed forms: their
cycle index comes from each library's own float formula (logs included), and their number of
cycles is unbounded, so they are not lists of segments. ``optax.sgdr_schedule`` is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from .base import Curve, GroupBase, Matrix, ProgramState, ScanResume, Steps

Selector = slice | npt.NDArray[np.intp]


def runs(idx: npt.NDArray[np.intp]) -> list[tuple[int, Selector]]:
    """The positions of ``idx`` grouped by value: ``[(value, positions), ...]``.

    Sorted input (a window of consecutive steps, the usual case) gives contiguous slices, so a
    segment's steps are views rather than masked copies and the work is linear in the window,
    not segments times window.
    """
    n = len(idx)
    if n == 0:
        return []
    if n == 1 or (idx[0] == idx[-1] and not np.any(idx != idx[0])):
        return [(int(idx[0]), slice(0, n))]
    if np.all(idx[1:] >= idx[:-1]):
        cuts = (np.flatnonzero(idx[1:] != idx[:-1]) + 1).tolist()
        edges = [0, *cuts, n]
        return [(int(idx[a]), slice(a, b)) for a, b in pairwise(edges)]
    order = np.argsort(idx, kind="stable")
    ordered = idx[order]
    cuts = (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
    edges = [0, *cuts, n]
    return [(int(ordered[a]), order[a:b]) for a, b in pairwise(edges)]


def _cycles_momentum(curve: Curve) -> bool:
    if isinstance(curve, Piecewise):
        return any(curve.cycled)
    return curve.momentum(np.zeros(1), {}) is not None


class Piecewise(Curve):
    """Children back to back from ``[0, *boundaries]`` on, each in its own time (module doc)."""

    def __init__(
        self, base: GroupBase, children: Sequence[Curve], boundaries: Sequence[int]
    ) -> None:
        if len(boundaries) != len(children) - 1:  # pragma: no cover - checked by the specs
            raise ValueError("a piecewise schedule needs one boundary fewer than children")
        self.n_groups = base.n_groups
        self.kids: tuple[Curve, ...] = tuple(children)
        self.boundaries = np.asarray(boundaries, dtype=np.float64)
        self.starts = np.asarray([0, *boundaries], dtype=np.float64)
        self.lead_momentum = np.asarray(base.momentum, dtype=np.float64).reshape(-1, 1)
        """Momentum before any cycling segment has run (the group's own: see the module doc)."""
        # Structural facts, fixed at compile time (momentum never depends on the state).
        self.cycled: tuple[bool, ...] = tuple(_cycles_momentum(c) for c in self.kids)
        held: list[tuple[int, float] | None] = []
        source: tuple[int, float] | None = None
        for k in range(len(self.kids)):
            held.append(source)
            if k + 1 < len(self.kids) and self.cycled[k] and self.starts[k + 1] > self.starts[k]:
                source = (k, float(self.starts[k + 1] - 1 - self.starts[k]))
        self._held: tuple[tuple[int, float] | None, ...] = tuple(held)
        """Per segment: (the earlier cycling segment, its last local step) whose momentum a
        non-cycling segment holds, or ``None`` for the lead value."""

    def children(self) -> Sequence[Curve]:
        return self.kids

    def scanned(self, end: int, resume: ScanResume | None = None) -> tuple[int, int]:
        # Children run in their own time: a resumed window starts at step start - starts[k]
        # of child k (``end`` stays the bound: a child's local time is never later).
        steps = held = 0
        for start, child in zip(self.starts, self.kids, strict=True):
            local = None if resume is None else resume.at(resume.start - int(start))
            s, h = child.scanned(end, local)
            steps, held = steps + s, max(held, h)
        return steps, held

    def segments(self, t: Steps) -> tuple[npt.NDArray[np.intp], Steps]:
        """The active child per step and the step in that child's own time."""
        idx = np.searchsorted(self.boundaries, t, side="right")
        return idx, t - self.starts[idx]

    def segment_lr(self, k: int, local: Steps, state: ProgramState) -> Matrix:
        """Child ``k``'s values at its local steps (optax: the child's own ``lr``)."""
        return self.kids[k].lr(local, state)

    def lr(self, t: Steps, state: ProgramState) -> Matrix:
        t = np.asarray(t, dtype=np.float64)
        idx, local = self.segments(t)
        pieces = runs(idx)
        if len(pieces) == 1:
            # A window within one segment (the usual case): the segment's own array (8 MB
            # not copied at 256 groups x 4,096 steps), unless it is one a cache keeps
            # (read-only), which the caller must not get to write.
            values = self.segment_lr(pieces[0][0], local, state)
            if values.flags.writeable and values.dtype == np.float64:
                return values
            return np.array(values, dtype=np.float64)
        out = np.empty((self.n_groups, len(t)))
        for k, sel in pieces:
            out[:, sel] = self.segment_lr(k, local[sel], state)
        return out

    def lead(self, state: ProgramState) -> Matrix:
        """Momentum before any cycling segment has run, ``(G, 1)``."""
        return self.lead_momentum

    def momentum(self, t: Steps, state: ProgramState) -> Matrix | None:
        if not any(self.cycled):
            return None
        t = np.asarray(t, dtype=np.float64)
        idx, local = self.segments(t)
        out = np.empty((self.n_groups, len(t)))
        for k, sel in runs(idx):
            if self.cycled[k]:
                values = self.kids[k].momentum(local[sel], state)
            else:
                source = self._held[k]
                if source is None:
                    values = self.lead(state)
                else:
                    j, last = source
                    values = self.kids[j].momentum(np.asarray([last]), state)
            assert values is not None
            out[:, sel] = values
        return out


__all__ = ["Piecewise", "runs"]
