"""Request-scoped access to the app's store, settings and compiled-program cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from anyio import to_thread
from fastapi import Request

from service.config import Settings
from service.store import Store, StoreBusy
from service.store.base import WouldBlock

log = logging.getLogger("lrserve.store")
T = TypeVar("T")


class StoreHolder:
    """Opens the store and migrates it, retrying lazily while the database is down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._lock = threading.Lock()

    def open(self) -> Store:
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is None:
                from service.store import open_store

                candidate = open_store(
                    self.settings.database,
                    busy_timeout_ms=self.settings.busy_timeout_ms,
                    pool_min=self.settings.pool_min,
                    pool_max=self.settings.pool_max,
                )
                try:
                    candidate.migrate()
                except BaseException:
                    candidate.close()
                    raise
                self._store = candidate
                log.info(
                    "store ready",
                    extra={"fields": {"event": "store_ready", "dialect": candidate.dialect}},
                )
            return self._store

    @property
    def ready(self) -> bool:
        return self._store is not None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def holder(request: Request) -> StoreHolder:
    h: StoreHolder = request.app.state.store_holder
    return h


def settings_of(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


async def get_store(request: Request) -> Store:
    """The migrated store, or 503 while the database cannot be reached."""
    h = holder(request)
    store = h._store
    if store is not None:
        return store
    try:
        return await to_thread.run_sync(h.open)
    except StoreBusy:
        raise
    except Exception as exc:  # the database is down or refuses us: not the client's fault
        raise StoreBusy(f"the database is not ready: {type(exc).__name__}") from exc


async def db_read(store: Store, fn: Callable[..., T], *args: Any) -> T:
    """Run a read on the event loop when the store says reads never block, else in a thread."""
    if store.inline_reads:
        return fn(*args)
    return await to_thread.run_sync(fn, *args)


# Pauses before retrying an inline write whose lock was taken (7.5 ms in all), then a thread.
_INLINE_RETRY_DELAYS = (0.0, 0.0005, 0.001, 0.002, 0.004)


async def db_write(store: Store, fn: Callable[..., T], *args: Any) -> T:
    """Run a write without ever waiting for a lock on the event loop.

    Where the store can fail fast (SQLite), the write is tried inline first; if the lock is
    taken it raised :class:`WouldBlock` before writing anything. The loop then sleeps a
    little and tries again (the lock is usually held for a short commit or checkpoint), and
    only then makes the same call in a worker thread, where waiting is harmless. Going to a
    thread at the first refusal cascaded: a thread's write holds the lock longer, so more
    inline writes were refused and the whole stream moved to threads (twice the CPU).
    """
    if store.inline_writes:
        for delay in _INLINE_RETRY_DELAYS:
            if delay:
                await anyio.sleep(delay)
            try:
                with store.nowait():
                    return fn(*args)
            except WouldBlock:
                pass
    return await to_thread.run_sync(fn, *args)
