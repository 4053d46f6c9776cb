"""The one cache of evaluated values: a bounded LRU sized in bytes, safe from any thread.

A pure recomputation cache, never a source of truth: an entry is keyed by what makes its
values valid, ``(run id, created_at, version, ...)`` (every change to a run bumps its
version, and a re-created id has a new ``created_at``), so an entry can be stale only by
being unreachable. Cached arrays are made read-only: a caller that wrote into one would
otherwise change what the next request is answered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from service.runs.model import Values

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def nbytes(values: Values) -> int:
    return sum(a.nbytes for fields in values.values() for a in fields.values())


class ValuesCache:
    """Least-recently-used entries of evaluated values within ``max_bytes``.

    An entry larger than ``max_entry_bytes`` is not kept (it would evict everything else).
    ``get`` and ``put`` hold one lock for a dictionary operation only; the evaluation that
    fills a miss runs outside it, so two threads may compute the same entry (both exact).
    """

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry_bytes: int | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // 4 if max_entry_bytes is None else max_entry_bytes
        self._entries: OrderedDict[Hashable, tuple[Values, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Values | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, values: Values) -> None:
        size = nbytes(values)
        if size > self.max_entry_bytes:
            return
        for fields in values.values():
            for array in fields.values():
                array.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (values, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
