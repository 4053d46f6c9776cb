"""Scan checkpoints in the database: the service's ``service.schedules.ScanBacking``.

A recursive composition far into a run (a ChainedScheduler with an additive child, a
SequentialLR segment that keeps the lr it finds) is scanned from step 0 by the first request a
process gets for it, unless a checkpoint of the scan near the asked step is at hand: the
engine keeps them in memory, and :class:`StoredScans` keeps them in the store, so a restarted
process, or another replica, resumes from there (one indexed read) instead of scanning 10^6
steps again.

A checkpoint is a pure function of its key (see the engine's ``ScanBacking``), so storing one
twice, losing one, or a failure of the store changes no value: :meth:`StoredScans.load`
answers nothing when the store fails, and saves are written in batches by one background
thread (a scan to step 10^6 leaves about 500 of them; no evaluation waits on a write).
"""

from __future__ import annotations

import logging
import threading

from service.runs.repository import Store

log = logging.getLogger("lrserve.checkpoints")

MAX_PENDING = 65536
"""Most checkpoints waiting to be written (more are dropped: they are recomputed if needed)."""
_LOAD_LIMIT = 8
"""Stored checkpoints read per load (the latest blocks first; the first valid one is used)."""


class StoredScans:
    """Scan checkpoints read from and written to ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.loaded = 0
        """Reads that found stored checkpoints (``lrserve_scan_checkpoints_loaded_total``)."""
        self.saved = 0
        self.dropped = 0
        self._pending: list[tuple[str, int, bytes, bytes]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._writing = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def load(self, curve: str, most: int, least: int) -> list[tuple[int, bytes, bytes]]:
        try:
            rows = self.store.scan_checkpoints(curve, most, least, _LOAD_LIMIT)
        except Exception:  # never fails an evaluation (a closed or broken store included)
            log.warning("reading scan checkpoints failed; scanning instead", exc_info=True)
            return []
        if rows:
            self.loaded += 1
        return rows

    def save(self, curve: str, block: int, signature: bytes, lr: bytes) -> None:
        with self._lock:
            if self._closed or len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append((curve, block, signature, lr))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_batches, name="lrserve-checkpoints", daemon=True
                )
                self._thread.start()
            self._wake.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every checkpoint saved so far is written (or ``timeout``); True if so."""
        with self._lock:
            return self._wake.wait_for(lambda: not self._pending and not self._writing, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending (within ``timeout``), then stop the writer."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _write_batches(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._writing = True
            try:
                self.store.save_scan_checkpoints(batch)
                written = len(batch)
            except Exception:
                # Nothing depends on them: the scan is done again where one is missing.
                log.warning("writing %d scan checkpoints failed", len(batch), exc_info=True)
                written = 0
            with self._lock:
                self.saved += written
                self.dropped += len(batch) - written
                self._writing = False
                self._wake.notify_all()
