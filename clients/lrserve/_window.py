"""Prefetched windows of schedule values and the code that writes them into param groups.

A :class:`Window` is what the server returned for ``GET /v1/runs/{id}/lr?start=&count=``:
the values of every group and field for ``count`` consecutive steps of one run version.
:func:`bind` turns a window into a :class:`BoundWindow`: the same values laid out for the
optimizer it will be written into, so that applying step ``i`` is a short loop over
preallocated lists and (for tensor hyperparameters) in-place tensor writes.

A bound window is immutable once built; the scheduler swaps a new one in with a single
reference assignment, so the training thread never sees a half-built window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["BoundWindow", "Window", "bind", "group_targets", "memory_key", "read_values"]

# {group name: {field name: [value per step]}}
Columns = dict[str, dict[str, list[float]]]
Series = tuple[tuple[str, str], ...]


class Window:
    """Values for steps ``start .. start + count - 1`` of one run version.

    Held as one ``count x len(series)`` float64 array (what the binary encoding decodes to):
    a step's values are one contiguous row, so binding a window converts nothing and
    applying a step converts only that row (``tolist``). Built from ``columns``
    (``{group: {field: [value per step]}}``) or from ``array`` and ``series``.
    """

    __slots__ = ("array", "count", "etag", "held", "series", "start", "version")

    def __init__(
        self,
        start: int,
        count: int,
        version: int,
        etag: str | None,
        columns: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        held: bool = False,
        *,
        array: npt.NDArray[np.float64] | None = None,
        series: Series | None = None,
    ) -> None:
        self.start = start
        self.count = count
        self.version = version
        self.etag = etag
        #: True when the values were not served but held at the last known ones (offline).
        self.held = held
        if array is None or series is None:
            if columns is None:
                raise TypeError("Window needs columns, or array and series")
            series = tuple((g, f) for g, fs in columns.items() for f in fs)
            array = np.empty((count, len(series)), dtype=np.float64)
            for j, (g, f) in enumerate(series):
                array[:, j] = np.asarray(columns[g][f], dtype=np.float64)[:count]
        #: ``array[i, j]``: series ``series[j]`` at step ``start + i``.
        self.array: npt.NDArray[np.float64] = array
        #: ``(group, field)`` per column of ``array``.
        self.series: Series = tuple(series)

    def __repr__(self) -> str:
        return (
            f"Window(start={self.start}, count={self.count}, version={self.version}, "
            f"series={len(self.series)}, held={self.held})"
        )

    @property
    def columns(self) -> Columns:
        """``{group: {field: [value per step]}}`` (built on each call: not for hot paths)."""
        out: Columns = {}
        by_series = self.array.T
        for j, (g, f) in enumerate(self.series):
            out.setdefault(g, {})[f] = by_series[j].tolist()
        return out

    def fields(self) -> dict[str, tuple[str, ...]]:
        """The field names of each group, in the window's order."""
        out: dict[str, list[str]] = {}
        for g, f in self.series:
            out.setdefault(g, []).append(f)
        return {g: tuple(fs) for g, fs in out.items()}

    @property
    def end(self) -> int:
        """First step the window does not cover."""
        return self.start + self.count

    def covers(self, step: int) -> bool:
        """Whether ``step`` lies in the window."""
        return self.start <= step < self.start + self.count

    def values_at(self, step: int) -> dict[str, dict[str, float]]:
        """Every group's values at ``step`` (which must be covered)."""
        row = self.array[step - self.start].tolist()
        out: dict[str, dict[str, float]] = {}
        for (g, f), v in zip(self.series, row, strict=True):
            out.setdefault(g, {})[f] = v
        return out

    def sliced(self, start: int, count: int) -> Window:
        """The part of this window from ``start`` on, at most ``count`` steps long."""
        i = start - self.start
        j = min(i + count, self.count)
        part = np.ascontiguousarray(self.array[i:j])
        return Window(
            start, j - i, self.version, self.etag, None, self.held, array=part, series=self.series
        )

    @staticmethod
    def held_at(
        step: int, count: int, version: int, values: Mapping[str, Mapping[str, float]]
    ) -> Window:
        """A window that repeats ``values`` (the last known ones) for ``count`` steps."""
        series = tuple((g, f) for g, fs in values.items() for f in fs)
        row = np.array([values[g][f] for g, f in series], dtype=np.float64)
        array = np.ascontiguousarray(np.broadcast_to(row, (count, len(series))))
        return Window(step, count, version, None, None, True, array=array, series=series)


PROBE_AT = 128
"""Index at which a bound window first wakes its scheduler (see ``BoundWindow.refill_at``),
which times the next ``PROBE_AT`` steps: a loop that would finish the window before a
fetch could bring the next one has it asked for then; any other loop is woken half way."""

# Where a field of the wire lives in a torch param group: (key, index in a tuple or None).
_FIELD_KEYS: dict[str, tuple[str, int | None]] = {
    "lr": ("lr", None),
    "momentum": ("momentum", None),
    "beta1": ("betas", 0),
}


def _target_key(field_name: str) -> tuple[str, int | None]:
    return _FIELD_KEYS.get(field_name, (field_name, None))


def group_targets(group: Mapping[str, Any], field_name: str) -> Any:
    """The current value of ``field_name`` in a torch param group (a float or a tensor)."""
    key, index = _target_key(field_name)
    value = group.get(key)
    if value is None:
        return None
    return value[index] if index is not None else value


@dataclass(frozen=True)
class Steady:
    """Targets of a window whose value is the same at every one of its steps; each ``j``
    indexes the window's own columns (``Window.array``)."""

    floats: list[tuple[dict[str, Any], str, int]]
    tuples: list[tuple[dict[str, Any], str, tuple[Any, ...], tuple[Any, ...], int]]
    fills: list[tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class BoundWindow:
    """A window laid out for one optimizer's param groups (see :func:`bind`).

    A value that stays the same over the whole window (AdamW's ``betas`` under a schedule
    that does not cycle momentum, a StepLR rate between its milestones) is written at the
    window's first step only: :attr:`floats`, :attr:`tuples` and :attr:`fills` hold what
    changes from step to step, :attr:`steady` what does not, and the step path calls
    :meth:`apply` (everything) while :attr:`steady_due` says the steady values are not yet
    in the param groups. torch's own schedulers never touch what they do not schedule, so
    writing a constant once per window is the same training, for half the per-step work on
    an AdamW with betas.
    """

    window: Window
    groups: list[dict[str, Any]]
    """The optimizer's ``param_groups`` list this was bound to (rebound if replaced).

    A copy of that list when two targets are one tensor (see :func:`bind`), so that the
    step path, which checks ``groups is optimizer.param_groups``, takes its slow path.
    """
    floats: list[tuple[dict[str, Any], str, int]]
    """``(param_group, key, j)``: ``param_group[key] = row[j]``."""
    tuples: list[tuple[dict[str, Any], str, tuple[Any, ...], tuple[Any, ...], int]]
    """``(param_group, key, head, rest, j)``: ``param_group[key] = (*head, row[j], *rest)``
    (a float ``betas[0]``)."""
    fills: list[tuple[torch.Tensor, int]]
    """CPU tensors, written with ``fill_(row[j])`` (cheapest for a handful of 0-d tensors)."""
    buckets: list[tuple[list[torch.Tensor], torch.Tensor]]
    """Accelerator tensors of one device/dtype/shape: ``_foreach_copy_(targets, rows[i])``."""
    refill: int | None = None
    """Index at which the scheduler is first woken (default: ``PROBE_AT``, or half way
    when that comes first); the scheduler may move it later (:meth:`move_refill`)."""
    steady: Steady | None = None
    """The targets whose value is the same at every step of the window (``None``: none)."""
    changing: list[int] | None = None
    """The window's columns that :attr:`rows` holds (``None``: all of them)."""
    rows: Any = field(init=False)
    """Step ``start + i``'s changing values: ``rows[i].tolist()``, in the order the ``j`` of
    :attr:`floats`, :attr:`tuples` and :attr:`fills` index. The window's array itself when
    nothing is steady, else a copy of its changing columns (column-major, as the decoder lays
    them out). Nothing is converted to Python floats at bind time: that would hold the GIL
    for milliseconds on a big window and cost more than the rows it saves, ~0.2 µs each."""
    python: bool = field(init=False)
    """Whether a step writes anything from the row as Python floats (floats/tuples/fills)."""
    start: int = field(init=False)
    count: int = field(init=False)
    refill_at: int = field(init=False)
    steady_due: bool = field(init=False)
    """Whether the steady values still have to be written (the step path then calls
    :meth:`apply`, which writes them and clears this)."""

    def __post_init__(self) -> None:
        array = self.window.array
        if self.changing is not None:
            array = _columns_of(array, self.changing)
        object.__setattr__(self, "rows", array)
        object.__setattr__(self, "python", bool(self.floats or self.tuples or self.fills))
        object.__setattr__(self, "start", self.window.start)
        object.__setattr__(self, "count", self.window.count)
        half = max(0, self.window.count // 2)
        at = min(PROBE_AT, half) if self.refill is None else self.refill
        object.__setattr__(self, "refill_at", at)
        object.__setattr__(self, "steady_due", self.steady is not None)

    @property
    def half(self) -> int:
        """The index half way through the window."""
        return max(0, self.count // 2)

    def move_refill(self, at: int) -> None:
        """Wake the scheduler at index ``at`` instead (the step thread's one mutation)."""
        object.__setattr__(self, "refill_at", at)

    def apply(self, i: int) -> None:
        """Write the values of index ``i`` (step ``start + i``) into the param groups,
        the steady ones included."""
        steady = self.steady
        if steady is not None:
            _write(self.window.array[i].tolist(), steady.floats, steady.tuples, steady.fills)
            object.__setattr__(self, "steady_due", False)
        if self.python:
            _write(self.rows[i].tolist(), self.floats, self.tuples, self.fills)
        for targets, rows in self.buckets:
            torch._foreach_copy_(targets, rows[i].unbind(0))


def _write(
    row: list[float],
    floats: list[tuple[dict[str, Any], str, int]],
    tuples: list[tuple[dict[str, Any], str, tuple[Any, ...], tuple[Any, ...], int]],
    fills: list[tuple[torch.Tensor, int]],
) -> None:
    """Write one row's values into Python-side targets (``RemoteScheduler.step`` inlines the
    same loops on its fast path, where a call per step would show)."""
    for d, k, j in floats:
        d[k] = row[j]
    for d, k, head, rest, j in tuples:
        d[k] = (*head, row[j], *rest)
    for t, j in fills:
        t.fill_(row[j])


def bind(
    window: Window,
    names: Sequence[str],
    groups: list[dict[str, Any]],
    *,
    fill_on_cpu: bool = True,
    refill: int | None = None,
) -> BoundWindow:
    """Lay out ``window`` for the optimizer param groups ``groups`` named ``names``.

    Python-float hyperparameters are assigned; tensor ones (``lr``, ``betas[0]``, ...) are
    written in place on their own device and dtype, so the tensor objects never change
    and a compiled optimizer step sees the same tensors every time. CPU tensors are
    written with ``fill_`` (``fill_on_cpu=False`` uses the accelerator path instead).
    Nothing is converted value by value here: a step converts its own row.
    """
    floats: list[tuple[dict[str, Any], str, int]] = []
    tuples: list[tuple[dict[str, Any], str, tuple[Any, ...], tuple[Any, ...], int]] = []
    fills: list[tuple[torch.Tensor, int]] = []
    pending: dict[tuple[Any, ...], list[tuple[torch.Tensor, int]]] = {}
    index = {gf: j for j, gf in enumerate(window.series)}
    fields_of = window.fields()
    for name, group in zip(names, groups, strict=True):
        for fname in fields_of.get(name, ()):
            j = index[(name, fname)]
            key, pos = _target_key(fname)
            current = group.get(key)
            if pos is not None:
                if not isinstance(current, (tuple, list)) or len(current) <= pos:
                    continue  # the optimizer has no such field (e.g. betas on SGD)
                element = current[pos]
                if isinstance(element, torch.Tensor):
                    _add_tensor(element, j, fills, pending, fill_on_cpu)
                else:
                    tuples.append((group, key, tuple(current[:pos]), tuple(current[pos + 1 :]), j))
                continue
            if isinstance(current, torch.Tensor):
                _add_tensor(current, j, fills, pending, fill_on_cpu)
            else:
                floats.append((group, key, j))
    targets = [t for t, _ in fills] + [t for items in pending.values() for t, _ in items]
    aliased = len({memory_key(t) for t in targets}) < len(targets)
    steady, changing = _split_steady(window, floats, tuples, fills)
    if changing is not None:
        position = {c: n for n, c in enumerate(changing)}
        floats = [(d, k, position[j]) for d, k, j in floats if j in position]
        tuples = [(d, k, h, r, position[j]) for d, k, h, r, j in tuples if j in position]
        fills = [(t, position[j]) for t, j in fills if j in position]
    buckets = []
    for (device, dtype, shape), items in pending.items():
        picked = np.ascontiguousarray(window.array[:, [j for _, j in items]])
        rows = torch.from_numpy(picked).to(device=device, dtype=dtype)
        rows = rows.reshape(len(rows), len(items), *shape)
        buckets.append(([t for t, _ in items], rows))
    return BoundWindow(
        window,
        list(groups) if aliased else groups,
        floats,
        tuples,
        fills,
        buckets,
        refill,
        steady,
        changing,
    )


def _split_steady(
    window: Window,
    floats: list[tuple[dict[str, Any], str, int]],
    tuples: list[tuple[dict[str, Any], str, tuple[Any, ...], tuple[Any, ...], int]],
    fills: list[tuple[torch.Tensor, int]],
) -> tuple[Steady | None, list[int] | None]:
    """The Python-side targets whose column is one value over the whole window, and the
    columns that change (``(None, None)`` when nothing is steady: a one-step window, or
    every column moves). NaN never counts as steady (its min and max are not equal)."""
    array = window.array
    if array.shape[0] < 2 or not (floats or tuples or fills):
        return None, None
    by_column = array.T  # the decoder's layout: each column contiguous
    constant = np.empty(by_column.shape[0], dtype=bool)
    for lo in range(0, by_column.shape[0], _CHUNK_COLUMNS):
        part = by_column[lo : lo + _CHUNK_COLUMNS]
        np.equal(part.min(axis=1), part.max(axis=1), out=constant[lo : lo + _CHUNK_COLUMNS])
    if not constant.any():
        return None, None
    steady = Steady(
        [f for f in floats if constant[f[2]]],
        [t for t in tuples if constant[t[4]]],
        [f for f in fills if constant[f[1]]],
    )
    if not (steady.floats or steady.tuples or steady.fills):
        return None, None
    used = {f[2] for f in floats} | {t[4] for t in tuples} | {f[1] for f in fills}
    return steady, [j for j in sorted(used) if not constant[j]]


_CHUNK_COLUMNS = 32
"""Columns per numpy call when binding: this runs on the refresher's thread while the loop
steps, and a call holds the GIL for its whole length (a 256-group window's columns in one
call would stop the loop for milliseconds; 32 of them take about 0.1 ms)."""


def _columns_of(array: npt.NDArray[np.float64], columns: list[int]) -> npt.NDArray[np.float64]:
    """``array[:, columns]`` in the decoder's column-major layout, copied a few columns at
    a time (see ``_CHUNK_COLUMNS``)."""
    by_column = array.T
    out = np.empty((len(columns), array.shape[0]), dtype=np.float64)
    index = np.asarray(columns, dtype=np.intp)
    for lo in range(0, len(columns), _CHUNK_COLUMNS):
        np.take(
            by_column, index[lo : lo + _CHUNK_COLUMNS], axis=0, out=out[lo : lo + _CHUNK_COLUMNS]
        )
    return out.T


def memory_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that are one tensor (or views starting at the same memory)."""
    try:
        ptr = t.data_ptr()
    except Exception:  # tensors without storage (fake, some subclasses)
        ptr = 0
    return (str(t.device), ptr) if ptr else ("id", id(t))


def _add_tensor(
    target: torch.Tensor,
    j: int,
    fills: list[tuple[torch.Tensor, int]],
    pending: dict[tuple[Any, ...], list[tuple[torch.Tensor, int]]],
    fill_on_cpu: bool,
) -> None:
    if fill_on_cpu and target.device.type == "cpu":
        fills.append((target, j))
    else:
        # On an accelerator one multi-tensor copy from a device-resident window replaces
        # a kernel launch per tensor, and nothing crosses to the host.
        pending.setdefault((target.device, target.dtype, tuple(target.shape)), []).append(
            (target, j)
        )


def read_values(
    names: Sequence[str], groups: Sequence[Mapping[str, Any]], fields: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """The values currently in the param groups, as ``{group: {field: float}}``."""
    out: dict[str, dict[str, float]] = {}
    for name, group in zip(names, groups, strict=False):
        values: dict[str, float] = {}
        for fname in fields.get(name, ()):
            v = group_targets(group, fname)
            if v is not None:
                values[fname] = float(v)
        out[name] = values
    return out
