"""Where the server is and how to authenticate: arguments first, then the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from ._errors import UsageError

__all__ = [
    "DEFAULT_URL",
    "ENV_TOKEN",
    "ENV_URL",
    "RUN_ID_PATTERN",
    "check_run_id",
    "resolve_token",
    "resolve_url",
]

#: Used when neither ``url=`` nor ``LRSERVE_URL`` is given; the server's default bind.
DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "LRSERVE_URL"
ENV_TOKEN = "LRSERVE_TOKEN"

#: The run id grammar of the wire contract.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def resolve_url(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Return the base URL to use: ``url``, else ``$LRSERVE_URL``, else :data:`DEFAULT_URL`.

    The result has no trailing slash. Raises :class:`UsageError` for anything that is
    not an absolute ``http(s)://host[:port][/prefix]`` URL, so a typo fails at
    construction instead of as a confusing connection error later.
    """
    environ = os.environ if env is None else env
    value = url if url else environ.get(ENV_URL) or DEFAULT_URL
    value = value.strip()
    source = "url" if url else (ENV_URL if environ.get(ENV_URL) else "default")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise UsageError(f"invalid server URL {value!r} (from {source}): {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"invalid server URL {value!r} (from {source}): "
            "expected http://host[:port] or https://host[:port]"
        )
    if parts.query or parts.fragment:
        raise UsageError(f"invalid server URL {value!r} (from {source}): no query or fragment")
    return value.rstrip("/")


def resolve_token(token: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """Return the bearer token: ``token``, else ``$LRSERVE_TOKEN``, else ``None``.

    An empty string counts as "not set", so ``LRSERVE_TOKEN=`` disables auth.
    """
    environ = os.environ if env is None else env
    value = token if token is not None else environ.get(ENV_TOKEN)
    value = value.strip() if value else None
    return value or None


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it matches the wire grammar, else raise :class:`UsageError`.

    Checked on the client because an id containing ``/`` or ``?`` would silently address
    a different URL instead of getting the server's validation error.
    """
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise UsageError(
            f"invalid run id {run_id!r}: expected 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return run_id
