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

import torch

__all__ = ["BoundWindow", "Window", "bind", "group_targets", "memory_key", "read_values"]

# {group name: {field name: [value per step]}}
Columns = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class Window:
    """Values for steps ``start .. start + count - 1`` of one run version."""

    start: int
    count: int
    version: int
    etag: str | None
    columns: Columns
    held: bool = False
    """True when the values were not served but held at the last known ones (offline)."""

    @property
    def end(self) -> int:
        """First step the window does not cover."""
        return self.start + self.count

    def covers(self, step: int) -> bool:
        """Whether ``step`` lies in the window."""
        return self.start <= step < self.start + self.count

    def values_at(self, step: int) -> dict[str, dict[str, float]]:
        """Every group's values at ``step`` (which must be covered)."""
        i = step - self.start
        return {g: {f: col[i] for f, col in fields.items()} for g, fields in self.columns.items()}

    def sliced(self, start: int, count: int) -> Window:
        """The part of this window from ``start`` on, at most ``count`` steps long."""
        i = start - self.start
        j = min(i + count, self.count)
        cols = {g: {f: col[i:j] for f, col in fs.items()} for g, fs in self.columns.items()}
        return Window(start, j - i, self.version, self.etag, cols, self.held)

    @staticmethod
    def held_at(
        step: int, count: int, version: int, values: Mapping[str, Mapping[str, float]]
    ) -> Window:
        """A window that repeats ``values`` (the last known ones) for ``count`` steps."""
        cols = {g: {f: [v] * count for f, v in fs.items()} for g, fs in values.items()}
        return Window(step, count, version, None, cols, held=True)


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
class BoundWindow:
    """A window laid out for one optimizer's param groups (see :func:`bind`)."""

    window: Window
    groups: list[dict[str, Any]]
    """The optimizer's ``param_groups`` list this was bound to (rebound if replaced).

    A copy of that list when two targets are one tensor (see :func:`bind`), so that the
    step path, which checks ``groups is optimizer.param_groups``, takes its slow path.
    """
    floats: list[tuple[dict[str, Any], str, Sequence[Any]]]
    """``(param_group, key, column)``: ``param_group[key] = column[i]``."""
    fills: list[tuple[torch.Tensor, list[float]]]
    """CPU tensors, written with ``fill_`` (cheapest for a handful of 0-d CPU tensors)."""
    buckets: list[tuple[list[torch.Tensor], torch.Tensor]]
    """Accelerator tensors of one device/dtype/shape: ``_foreach_copy_(targets, rows[i])``."""
    start: int = field(init=False)
    count: int = field(init=False)
    refill_at: int = field(init=False)
    """Index at which the refresher is woken to fetch the next window."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", self.window.start)
        object.__setattr__(self, "count", self.window.count)
        object.__setattr__(self, "refill_at", max(0, self.window.count // 2))

    def apply(self, i: int) -> None:
        """Write the values of index ``i`` (step ``start + i``) into the param groups."""
        for d, k, col in self.floats:
            d[k] = col[i]
        for t, c in self.fills:
            t.fill_(c[i])
        for targets, rows in self.buckets:
            torch._foreach_copy_(targets, rows[i].unbind(0))


def bind(
    window: Window,
    names: Sequence[str],
    groups: list[dict[str, Any]],
    *,
    fill_on_cpu: bool = True,
) -> BoundWindow:
    """Lay out ``window`` for the optimizer param groups ``groups`` named ``names``.

    Python-float hyperparameters are assigned; tensor ones (``lr``, ``betas[0]``, ...) are
    written in place on their own device and dtype, so the tensor objects never change
    and a compiled optimizer step sees the same tensors every time. CPU tensors are
    written with ``fill_`` (``fill_on_cpu=False`` uses the accelerator path instead).
    """
    floats: list[tuple[dict[str, Any], str, Sequence[Any]]] = []
    fills: list[tuple[torch.Tensor, list[float]]] = []
    pending: dict[tuple[Any, ...], list[tuple[torch.Tensor, list[float]]]] = {}
    for name, group in zip(names, groups, strict=True):
        for fname, col in window.columns.get(name, {}).items():
            key, index = _target_key(fname)
            current = group.get(key)
            if index is not None:
                if not isinstance(current, (tuple, list)) or len(current) <= index:
                    continue  # the optimizer has no such field (e.g. betas on SGD)
                element = current[index]
                if isinstance(element, torch.Tensor):
                    _add_tensor(element, col, fills, pending, fill_on_cpu)
                else:
                    # A float betas[0] lives in a tuple: prebuild the tuples once here
                    # so the step path is a plain assignment.
                    rest = tuple(current[index + 1 :])
                    head = tuple(current[:index])
                    floats.append((group, key, [(*head, v, *rest) for v in col]))
                continue
            if isinstance(current, torch.Tensor):
                _add_tensor(current, col, fills, pending, fill_on_cpu)
            else:
                floats.append((group, key, col))
    targets = [t for t, _ in fills] + [t for items in pending.values() for t, _ in items]
    aliased = len({memory_key(t) for t in targets}) < len(targets)
    buckets = []
    for (device, dtype, shape), items in pending.items():
        rows = torch.tensor([c for _, c in items], dtype=torch.float64).T.contiguous()
        rows = rows.to(device=device, dtype=dtype).reshape(len(rows), len(items), *shape)
        buckets.append(([t for t, _ in items], rows))
    return BoundWindow(window, list(groups) if aliased else groups, floats, fills, buckets)


def memory_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that are one tensor (or views starting at the same memory)."""
    try:
        ptr = t.data_ptr()
    except Exception:  # tensors without storage (fake, some subclasses)
        ptr = 0
    return (str(t.device), ptr) if ptr else ("id", id(t))


def _add_tensor(
    target: torch.Tensor,
    col: list[float],
    fills: list[tuple[torch.Tensor, list[float]]],
    pending: dict[tuple[Any, ...], list[tuple[torch.Tensor, list[float]]]],
    fill_on_cpu: bool,
) -> None:
    if fill_on_cpu and target.device.type == "cpu":
        fills.append((target, col))
    else:
        # On an accelerator one multi-tensor copy from a device-resident window replaces
        # a kernel launch per tensor, and nothing crosses to the host.
        pending.setdefault((target.device, target.dtype, tuple(target.shape)), []).append(
            (target, col)
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
