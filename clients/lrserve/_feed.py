"""A framework-neutral feed of one run's learning rates, for Keras and optax.

:class:`RateFeed` keeps a prefetched window of the run's values (``GET
/v1/runs/{id}/lr?start=&count=``) and answers ``lr(step)`` from it without a request; a
background thread brings the next window before the trainer runs out and revalidates the
current one with its ETag, so a decision or an operator override arrives by itself. While
the service is unreachable it keeps answering from what it has (the last known value past
the window's end), says so once, and catches up when the service is back, like
:class:`lrserve.torch.RemoteScheduler`. It needs neither torch nor any framework.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._client import Client
from ._errors import ConflictError, ServerError, TransportError, UsageError
from ._metrics import metric_values
from ._types import ReportResult

__all__ = ["RateFeed"]

log = logging.getLogger("lrserve.feed")

_UNAVAILABLE: tuple[type[BaseException], ...] = (TransportError, ServerError, httpx.HTTPError)


class LRServeOfflineWarning(UserWarning):
    """The service cannot be reached: training continues on the values already fetched."""


@dataclass(frozen=True)
class _Window:
    start: int
    version: int
    etag: str | None
    values: tuple[float, ...]  # one group's ``field`` per step

    @property
    def end(self) -> int:
        return self.start + len(self.values)


class RateFeed:
    """The values of one group of an lrserve run, by step, from prefetched windows.

    Args:
        run: the run id.
        url: the server; default ``$LRSERVE_URL``, else ``http://127.0.0.1:8000``.
        spec: the run body; given, the run is created idempotently. Without ``groups`` in
            it, one group ``{"name": "all", "lr": lr}`` is used (``lr`` is then required).
            Not given, the run must exist.
        lr: the base learning rate of the default group.
        group: the group whose values are served (name or index; default the first).
        field: the hyperparameter served (default ``"lr"``).
        token, client, window, poll_interval, strict, timeout: as for
            :class:`lrserve.torch.RemoteScheduler`.
    """

    def __init__(
        self,
        run: str,
        url: str | None = None,
        spec: Mapping[str, Any] | None = None,
        *,
        lr: float | None = None,
        group: str | int = 0,
        field: str = "lr",
        token: str | None = None,
        client: Client | None = None,
        window: int = 4096,
        poll_interval: float = 2.0,
        strict: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if window < 2 or window > 100_000:
            raise UsageError(f"window must be between 2 and 100000 steps, got {window}")
        self.run_id = run
        self.strict = strict
        self._field = field
        self._size = int(window)
        self._poll = float(poll_interval)
        self._owns_client = client is None
        self._client = client or Client(
            url,
            token=token,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            max_retries=1,
            backoff_base=0.1,
            backoff_max=0.5,
        )
        body: dict[str, Any] | None = None
        if spec is not None:
            body = dict(spec)
            if "groups" not in body:
                if lr is None:
                    raise UsageError("spec has no groups: pass lr= (the base learning rate)")
                body["groups"] = [{"name": "all", "lr": float(lr)}]
        self._body = body
        self._group_key = group
        self._group: str | None = None
        self._w: _Window | None = None
        self._last = float("nan") if lr is None else float(lr)
        self._cursor = 0  # the newest step asked for: where the refresher fetches from
        self._outbox: deque[tuple[int, dict[str, float | None]]] = deque()
        self._lock = threading.RLock()
        self._offline = False
        self._warned = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._closed = False
        try:
            self._attach()
            self._install(self._fetch(0))
        except _UNAVAILABLE as exc:
            if strict:
                self._close_client()
                raise
            self._went_offline(exc)
        except BaseException:
            self._close_client()
            raise
        self._thread = threading.Thread(target=self._loop, name=f"lrserve-feed-{run}", daemon=True)
        self._thread.start()

    # -- values ------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        """The value at ``step``: an index into the window in hand (no request) when it has it."""
        self._cursor = step
        w = self._w
        if w is not None:
            i = step - w.start
            if 0 <= i < len(w.values):
                if i >= len(w.values) // 2:
                    self._wake.set()  # the refresher brings the next window meanwhile
                v = w.values[i]
                self._last = v
                return v
        return self._slow(step)

    def _slow(self, step: int) -> float:
        if not self._offline and self._group is not None:
            try:
                self._install(self._fetch(step), force=True)
            except _UNAVAILABLE as exc:
                self._went_offline(exc)
            w = self._w
            if w is not None and w.start <= step < w.end:
                self._last = w.values[step - w.start]
                return self._last
        if self.strict:
            raise UsageError(f"lrserve run {self.run_id!r}: no value for step {step} (offline)")
        self._wake.set()
        return self._last

    @property
    def version(self) -> int | None:
        """The run version of the values in hand."""
        return None if self._w is None else self._w.version

    @property
    def offline(self) -> bool:
        """Whether the last attempt to reach the service failed."""
        return self._offline

    # -- reports -----------------------------------------------------------------------

    def report(self, metrics: Mapping[str, Any], step: int) -> ReportResult | None:
        """Report metrics for ``step``; a decision applies from ``step + 1``.

        Returns the server's answer, or ``None`` when the service is unreachable (the
        report is kept and sent when it is back; ``strict=True`` raises instead).
        """
        values = metric_values(metrics)
        with self._lock:
            self._flush()
            if self._outbox:
                self._outbox.append((int(step), values))
                return None
            try:
                res = self._client.report(self.run_id, int(step), values)
            except _UNAVAILABLE as exc:
                if self.strict:
                    raise
                self._outbox.append((int(step), values))
                self._went_offline(exc)
                return None
            except ConflictError as exc:
                if self.strict:
                    raise
                warnings.warn(f"lrserve: report ignored: {exc}", RuntimeWarning, stacklevel=2)
                return None
            self._back_online()
            if self._w is None or res.get("values_version", res.get("version")) != self._w.version:
                try:
                    self._install(self._fetch(int(step) + 1), force=True)
                except _UNAVAILABLE as exc:
                    self._went_offline(exc)
        return res

    def _flush(self) -> None:
        while self._outbox:
            s, values = self._outbox[0]
            try:
                self._client.report(self.run_id, s, values)
            except _UNAVAILABLE as exc:
                self._went_offline(exc)
                return
            except ConflictError as exc:
                log.warning("lrserve: dropping the kept report for step %d: %s", s, exc)
            self._outbox.popleft()

    # -- fetching ----------------------------------------------------------------------

    def _attach(self) -> None:
        if self._body is not None:
            self._client.create_run(self.run_id, self._body)
            groups = self._body["groups"]
        else:
            groups = self._client.get_run(self.run_id)["spec"]["groups"]
        names = [str(g["name"]) for g in groups]
        key = self._group_key
        if isinstance(key, int):
            if not 0 <= key < len(names):
                raise UsageError(f"run {self.run_id!r} has no group {key}")
            self._group = names[key]
        elif key in names:
            self._group = key
        else:
            raise UsageError(f"run {self.run_id!r} has no group {key!r} (it has {names})")

    def _fetch(self, start: int, etag: str | None = None) -> _Window | None:
        w = self._client.get_lr_window(self.run_id, max(start, 0), self._size, etag=etag)
        if w.not_modified or w.values is None:
            return None
        assert self._group is not None
        col = w.values[self._group][self._field]
        return _Window(w.start, w.version, w.etag, tuple(float(v) for v in col))

    def _install(self, w: _Window | None, force: bool = False) -> None:
        if w is None:
            return
        with self._lock:
            cur = self._w
            if force or cur is None or w.version > cur.version or w.end > cur.end:
                self._w = w  # one reference assignment: lr() sees the old or the new one

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll if not self._offline else min(self._poll, 0.2))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                with self._lock:
                    if self._group is None:
                        self._attach()
                    self._flush()
                cur, w = self._cursor, self._w
                low = w is None or cur < w.start or cur >= w.start + len(w.values) // 2
                self._install(self._fetch(cur, etag=None if low or w is None else w.etag))
                self._back_online()
            except _UNAVAILABLE as exc:
                self._went_offline(exc)
            except Exception:  # never let the thread die: the trainer would lose its values
                log.exception("lrserve: window refresh failed")

    def _went_offline(self, exc: BaseException) -> None:
        self._offline = True
        if not self._warned:
            self._warned = True
            msg = (
                f"lrserve service unreachable for run {self.run_id!r} ({exc}); training "
                "continues on the values already fetched and catches up when it is back"
            )
            log.warning(msg)
            warnings.warn(msg, LRServeOfflineWarning, stacklevel=3)

    def _back_online(self) -> None:
        self._offline = False
        self._warned = False

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the refresher, send kept reports if the service answers, close the client."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self._outbox:
            try:
                with self._lock:
                    self._flush()
            except Exception:  # closing must not raise into the training script
                log.warning("lrserve: kept reports not delivered at close", exc_info=True)
        self._close_client()

    def _close_client(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RateFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
