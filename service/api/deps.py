"""Request-scoped access to the app's settings and its :class:`~service.runs.service.Runs`."""

from __future__ import annotations

import logging
import threading

from anyio import to_thread
from fastapi import Request

from service.api.observability import watch_cache, watch_scans
from service.config import Settings
from service.runs.repository import Store, StoreBusy, StoreFault
from service.runs.service import Runs
from service.runs.values import ValuesCache

log = logging.getLogger("lrserve.store")


class StoreHolder:
    """Opens the store and migrates it, retrying lazily while the database is down; holds
    the :class:`Runs` service over it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._candidate: Store | None = None
        """A store whose migration met a database that was down, kept: its pool goes on
        connecting and remembers that the database is down (so requests fail fast)."""
        self.runs: Runs | None = None
        self._lock = threading.Lock()

    def open(self) -> Store:
        store = self._store
        if store is not None:
            return store
        # A request arriving while another one connects gets its 503 at once instead of
        # queueing behind it (every attempt may wait for the database).
        if not self._lock.acquire(blocking=False):
            raise StoreBusy("the server is still connecting to the database")
        try:
            if self._store is None:
                from service.store import open_store

                candidate = self._candidate or open_store(
                    self.settings.database,
                    busy_timeout_ms=self.settings.busy_timeout_ms,
                    pool_min=self.settings.pool_min,
                    pool_max=self.settings.pool_max,
                    min_free_bytes=self.settings.min_free_bytes,
                )
                try:
                    candidate.migrate()
                except StoreBusy:
                    self._candidate = candidate
                    raise
                except BaseException:
                    self._candidate = None
                    candidate.close()
                    raise
                self._candidate = None
                cache = ValuesCache(self.settings.cache_bytes)
                watch_cache("values", cache)
                self.runs = Runs(
                    candidate,
                    cache=cache,
                    max_wait_seconds=self.settings.max_wait_seconds,
                    wait_poll_seconds=self.settings.wait_poll_seconds,
                    max_curve_span=self.settings.max_curve_span,
                    idle_after=self.settings.idle_after,
                    max_work=self.settings.max_request_work,
                )
                watch_scans(self.runs.scans)
                self._store = candidate
                log.info(
                    "store ready",
                    extra={"fields": {"event": "store_ready", "dialect": candidate.dialect}},
                )
            return self._store
        finally:
            self._lock.release()

    @property
    def ready(self) -> bool:
        return self._store is not None

    def check_ready(self) -> str:
        """The store's dialect when the database answers and takes writes; raises
        :class:`StoreBusy` (or :class:`StoreFault`) saying why not. Blocking: call it in a
        thread."""
        if self._store is None:
            from service.store import preflight

            # One direct connection with a short timeout first: opening a pool on a database
            # that is down waits the whole busy timeout, longer than a probe waits.
            preflight(self.settings.database, min(self.settings.busy_timeout_ms, 1000))
        store = self.open()
        store.ping()
        return store.dialect

    def close(self) -> None:
        with self._lock:
            if self._candidate is not None:
                self._candidate.close()
                self._candidate = None
            if self._store is not None:
                if self.runs is not None:
                    self.runs.close()
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
    except StoreFault as exc:  # logged in full; the client learns it is the server's fault
        log.error("store fault", extra={"fields": {"event": "store_fault", "error": str(exc)}})
        raise StoreBusy(
            "the database cannot be used as configured (the server's log says why); an "
            "operator must fix it",
            retry_after=30,
        ) from exc
    except Exception as exc:  # the database is down or refuses us: not the client's fault
        raise StoreBusy(f"the database is not ready: {type(exc).__name__}") from exc
    assert h.runs is not None
    return h.runs
