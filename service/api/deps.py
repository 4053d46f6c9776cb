"""Request-scoped access to the app's settings and its :class:`~service.runs.service.Runs`."""

from __future__ import annotations

import logging
import threading

from anyio import to_thread
from fastapi import Request

from service.config import Settings
from service.runs.repository import Store, StoreBusy
from service.runs.service import Runs

log = logging.getLogger("lrserve.store")


class StoreHolder:
    """Opens the store and migrates it, retrying lazily while the database is down; holds
    the :class:`Runs` service over it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self.runs: Runs | None = None
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
                self.runs = Runs(
                    candidate,
                    max_wait_seconds=self.settings.max_wait_seconds,
                    wait_poll_seconds=self.settings.wait_poll_seconds,
                    max_curve_span=self.settings.max_curve_span,
                )
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
                self.runs = None
                self._store.close()
                self._store = None


def holder(request: Request) -> StoreHolder:
    h: StoreHolder = request.app.state.store_holder
    return h


def settings_of(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


async def get_runs(request: Request) -> Runs:
    """The run service over the migrated store, or 503 while the database cannot be reached."""
    h: StoreHolder = request.app.state.store_holder
    runs = h.runs
    if runs is not None:
        return runs
    try:
        await to_thread.run_sync(h.open)
    except StoreBusy:
        raise
    except Exception as exc:  # the database is down or refuses us: not the client's fault
        raise StoreBusy(f"the database is not ready: {type(exc).__name__}") from exc
    assert h.runs is not None
    return h.runs
