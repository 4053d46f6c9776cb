"""Bearer-token auth: a read-write token and an optional read-only one.

Tokens are compared with :func:`hmac.compare_digest` (constant time) and never logged.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.api.problems import ApiError

_bearer = HTTPBearer(auto_error=False, description="lrserve token (read-write or read-only)")
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _matches(given: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected.encode())


def require_token(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The FastAPI dependency of every ``/v1`` route: :func:`authorize`. (The ``HTTPBearer``
    parameter only documents the scheme in OpenAPI; the check is ``authorize``'s alone.)"""
    authorize(request)


# The one route that also takes ``?token=``: the browser's EventSource cannot send headers.
# A token in a URL may be written to proxies' access logs (lrserve logs route templates
# only), so the web page uses it only there and docs recommend the read-only token for it.
_QUERY_TOKEN_PATH = re.compile(r"/v1/runs/[^/]+/stream")


def authorize(request: Request) -> None:
    """401 without a valid token; 403 when a read-only token tries to write.

    The one auth check, for the documented routes (through :func:`require_token`) and the
    hot routes alike. Parses ``Authorization`` as ``HTTPBearer(auto_error=False)`` does;
    without one, ``GET /v1/runs/{id}/stream`` may carry the token as ``?token=``.
    """
    authorization = request.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        query_token = None
        if request.method == "GET" and _QUERY_TOKEN_PATH.fullmatch(request.url.path):
            query_token = request.query_params.get("token") or None
        check_credentials(request, query_token)
    else:
        check_credentials(request, credentials)


def check_credentials(request: Request, token: str | None) -> None:
    """401 unless ``token`` (a bearer token, None when absent) is one of the server's; 403
    when the read-only token tries to write."""
    settings = request.app.state.settings
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            "Unauthorized",
            "this server needs 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="lrserve"'},
        )
    given = token.encode()
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
