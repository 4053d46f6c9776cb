"""A pause of Python's cyclic garbage collector around bulk, short-lived allocations."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection while the block runs (in any thread; nested and concurrent
    blocks share one pause, the collector is enabled again when the last one ends).

    Why: a page of metric history builds ~10^5 container objects (rows, points, the answer's
    dicts) that live until the page is encoded. With the collector on, they survive young
    collections, are promoted, and trigger full collections of the whole heap (60-160 ms on
    a 2-core machine) that hold the GIL: every trainer's GET lr waited that long. The page's
    objects hold no cycles; freed by reference counting when the block ends, they never reach
    an older generation."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
