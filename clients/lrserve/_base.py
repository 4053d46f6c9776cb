"""Configuration shared by :class:`~lrserve.Client` and :class:`~lrserve.AsyncClient`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._config import resolve_token, resolve_url
from ._errors import UsageError
from ._transport import DEFAULT_TIMEOUT, Call, RetryPolicy, make_timeout, parse_retry_after
from ._version import __version__

__all__ = ["ClientConfig"]

USER_AGENT = f"lrserve-python/{__version__}"


@dataclass(frozen=True)
class ClientConfig:
    """Resolved URL, headers, timeouts and retry policy of one client."""

    url: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    retry: RetryPolicy

    @classmethod
    def build(
        cls,
        url: str | None,
        *,
        token: str | None,
        timeout: float | httpx.Timeout | None,
        retry: RetryPolicy,
        headers: Mapping[str, str] | None,
    ) -> ClientConfig:
        """Resolve arguments and environment (``LRSERVE_URL``, ``LRSERVE_TOKEN``)."""
        if not isinstance(retry, RetryPolicy):
            raise UsageError("retry must be a RetryPolicy")
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        all_headers.update(headers or {})
        bearer = resolve_token(token)
        if bearer is not None:
            all_headers["Authorization"] = f"Bearer {bearer}"
        if timeout is None:
            resolved = DEFAULT_TIMEOUT
        elif isinstance(timeout, httpx.Timeout):
            resolved = timeout
        elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            # A bare number bounds every phase but connecting, which stays short so an
            # unreachable server is noticed quickly.
            resolved = httpx.Timeout(float(timeout), connect=min(5.0, float(timeout)))
        else:
            raise UsageError(f"timeout must be a positive number or httpx.Timeout, got {timeout!r}")
        return cls(url=resolve_url(url), headers=all_headers, timeout=resolved, retry=retry)

    def timeout_for(self, call: Call[Any]) -> httpx.Timeout:
        """The timeout of one request (long polls need a longer read timeout)."""
        return make_timeout(self.timeout, call.min_read_timeout)

    @staticmethod
    def retry_after(response: httpx.Response) -> float | None:
        """Seconds the server asked to wait, if it did."""
        return parse_retry_after(response.headers.get("Retry-After"))
