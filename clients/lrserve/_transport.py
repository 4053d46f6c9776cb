"""What the sync and async clients share: request descriptions, retries, error mapping.

Each endpoint is described once as a :class:`Call` (see ``_calls.py``); the two clients
only differ in how they send it and how they sleep between attempts.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from ._errors import APIError, LRServeError, TransportError, error_from_problem

__all__ = [
    "DEFAULT_TIMEOUT",
    "Call",
    "RetryPolicy",
    "error_from_response",
    "json_body",
    "make_timeout",
    "parse_retry_after",
]

T = TypeVar("T")

#: connect 5 s; read, write and pool 30 s.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

# The request never reached the server: safe to retry anything, even a non-idempotent POST.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Statuses that mean "try again": a gateway without a healthy upstream, or the server
# saying it is busy. 503 ``database-busy`` is answered before anything was written.
_RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries connection failures and 502/503/504 answers.

    The n-th retry (n = 0, 1, ...) waits a uniformly random time in
    ``[0, min(backoff_max, backoff_base * 2**n)]`` ("full jitter", so that many ranks
    knocked off by the same outage do not come back in lockstep). When the server sends
    ``Retry-After``, the wait is that many seconds (at most ``retry_after_max``) plus a
    jitter of up to ``backoff_base``. 4xx answers are never retried.
    """

    #: Retries after the first attempt; 0 disables retrying.
    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError("max_retries, backoff_base and backoff_max must be >= 0")
        if self.retry_after_max < 0:
            raise ValueError("retry_after_max must be >= 0")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max) + random.uniform(0, self.backoff_base)
        cap = min(self.backoff_max, self.backoff_base * (2.0 ** min(retry, 62)))
        return random.uniform(0, cap)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def make_timeout(base: httpx.Timeout, min_read: float | None) -> httpx.Timeout:
    """``base`` with its read timeout raised to at least ``min_read`` seconds."""
    if min_read is None or base.read is None or base.read >= min_read:
        return base
    return httpx.Timeout(connect=base.connect, read=min_read, write=base.write, pool=base.pool)


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def error_from_response(response: httpx.Response) -> APIError:
    """The :class:`APIError` subclass for an error response (problem+json or not)."""
    return error_from_problem(response.status_code, _decode(response), response.headers)


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body of a successful response."""
    try:
        return response.json()
    except ValueError:
        raise LRServeError(
            f"{response.request.method} {response.request.url.path}: the server answered "
            f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}"
        ) from None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One endpoint request, described independently of sync/async sending."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    #: The read timeout needed at least (long-polling ``?wait=``).
    min_read_timeout: float | None = None
    #: False for requests whose repetition would change the result (overrides): they are
    #: retried only when the request provably never reached the server.
    idempotent: bool = True
    #: Whether 502/503/504 answers are retried (a readiness probe wants the answer).
    retry_status: bool = True
    #: Non-2xx statuses handed to ``parse`` instead of raised (304, 404 for missing_ok).
    accept: frozenset[int] = field(default_factory=frozenset)

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client.request`` (minus timeout)."""
        kwargs: dict[str, Any] = {}
        if self.params:
            kwargs["params"] = {k: v for k, v in self.params.items() if v is not None}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.headers:
            kwargs["headers"] = dict(self.headers)
        return kwargs

    def should_retry_exception(self, exc: httpx.TransportError) -> bool:
        """Whether a transport failure may be retried for this call."""
        if isinstance(exc, httpx.UnsupportedProtocol):
            return False
        return self.idempotent or isinstance(exc, _UNSENT)

    def should_retry_status(self, status: int) -> bool:
        """Whether an HTTP status may be retried for this call."""
        if not self.retry_status or status not in _RETRY_STATUSES:
            return False
        # 502/504 from a gateway leave it open whether the server acted; 503 does not.
        return self.idempotent or status == 503

    def finish(self, response: httpx.Response) -> T:
        """Parse a final response, or raise the matching :class:`APIError`."""
        status = response.status_code
        if 200 <= status < 300 or status in self.accept:
            return self.parse(response)
        raise error_from_response(response)

    def transport_error(
        self, base_url: str, exc: httpx.TransportError, attempts: int
    ) -> TransportError:
        """The :class:`TransportError` to raise after giving up."""
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, _UNSENT):
            what = f"cannot connect to lrserve at {base_url}"
        elif isinstance(exc, httpx.TimeoutException):
            what = f"{self.method} {self.path} on {base_url} timed out"
        else:
            what = f"{self.method} {self.path} on {base_url} failed"
        return TransportError(f"{what}: {reason}{tries}", cause=exc, attempts=attempts)
