"""Bearer-token auth: a read-write token and an optional read-only one.

Tokens are compared with :func:`hmac.compare_digest` (constant time) and never logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import ApiError

_bearer = HTTPBearer(auto_error=False, description="lrserve token (read-write or read-only)")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _matches(given: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected.encode())


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a valid token; 403 when a read-only token tries to write."""
    settings = request.app.state.settings
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "unauthorized",
            "Unauthorized",
            "this server needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="lrserve"'},
        )
    given = credentials.credentials.encode()
    # Compare against both tokens every time so timing does not tell which one matched.
    write_ok = _matches(given, settings.token)
    read_ok = _matches(given, settings.read_token)
    if write_ok:
        return
    if read_ok:
        if request.method in _READ_METHODS:
            return
        raise ApiError(
            403,
            "forbidden",
            "Forbidden",
            f"the read-only token cannot {request.method} {request.url.path}",
        )
    raise ApiError(
        401,
        "unauthorized",
        "Unauthorized",
        "the bearer token is not valid for this server",
        headers={"WWW-Authenticate": 'Bearer realm="lrserve", error="invalid_token"'},
    )
