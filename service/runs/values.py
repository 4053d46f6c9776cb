"""The process's recomputation caches: bounded LRUs sized in bytes, safe from any thread.

:class:`BytesLRU` is the mechanism; :class:`ValuesCache` holds evaluated values (blocks for
one-step reads and windows), and ``service.runs.model`` keeps its compiled schedules in one.

A pure recomputation cache, never a source of truth: an entry is keyed by what makes its
values valid, ``(run id, created_at, version, ...)`` (every change to a run bumps its
version, and a re-created id has a new ``created_at``), so an entry can be stale only by
being unreachable. Cached arrays are made read-only: a caller that wrote into one would
otherwise change what the next request is answered.

Eviction is least recently used by bytes, one entry at a time: with more runs active than
the budget holds, the runs read most recently stay (an entry count bound, or emptying the
whole cache when full, made every run miss once a few hundred were active).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from service.runs.model import Values

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""The values cache's budget unless ``LRSERVE_CACHE_BYTES`` says otherwise."""
ENTRY_FRACTION = 2
"""An entry may take up to ``1 / ENTRY_FRACTION`` of the budget: a 1,024-group block (16 MiB
with momentum) stays cached under the default budget instead of being rebuilt every time."""
ENTRY_OVERHEAD = 256
"""Bytes counted per entry on top of its estimate (key, dictionary slot, tuple)."""

V = TypeVar("V")


def nbytes(values: Values) -> int:
    """The arrays' bytes of evaluated values."""
    return sum(a.nbytes for fields in values.values() for a in fields.values())


class BytesLRU(Generic[V]):
    """Least-recently-used entries within ``max_bytes``, each ``put`` with its size.

    An entry larger than ``max_entry_bytes`` (default: half the budget) is not kept: it would
    evict everything else. ``get`` and ``put`` hold one lock for a dictionary operation only;
    the computation that fills a miss runs outside it, so two threads may compute the same
    entry (both exact). ``hits``, ``misses`` and ``evictions`` count since construction.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int | None = None) -> None:
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._fixed_entry = max_entry_bytes
        self.max_bytes = max_bytes
        self.max_entry_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.resize(max_bytes)

    def resize(self, max_bytes: int) -> None:
        """Change the budget (evicting the least recently used entries down to it)."""
        if max_bytes < 0:
            raise ValueError(f"a cache budget must be >= 0 bytes, got {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            fixed = self._fixed_entry
            self.max_entry_bytes = max_bytes // ENTRY_FRACTION if fixed is None else fixed
            self._evict()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep ``value`` under ``key``, counted as ``size`` bytes (plus the entry overhead)."""
        size += ENTRY_OVERHEAD
        if size > self.max_entry_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self.evictions += 1

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class ValuesCache(BytesLRU["Values"]):
    """Evaluated values by key, sized by their arrays' ``nbytes`` (made read-only when kept)."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry_bytes: int | None = None
    ) -> None:
        super().__init__(max_bytes, max_entry_bytes)

    def put(self, key: Hashable, values: Values, size: int | None = None) -> None:
        size = nbytes(values) if size is None else size
        if size + ENTRY_OVERHEAD > self.max_entry_bytes:
            return
        for fields in values.values():
            for array in fields.values():
                array.flags.writeable = False
        super().put(key, values, size)
