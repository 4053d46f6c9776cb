"""The exception hierarchy of the lrserve SDK.

Every exception the SDK raises on purpose derives from :class:`LRServeError`:

- :class:`UsageError` — the call cannot be made as asked (bad URL, bad run id); nothing
  was sent.
- :class:`TransportError` — the server could not be reached (or the connection broke)
  and retries did not help.
- :class:`APIError` — the server answered with an error status. Its ``status``,
  ``type``, ``title``, ``detail`` and ``errors`` are the server's problem+json fields;
  subclasses are chosen by problem slug first and status code second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "LRServeError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ReportConflictError",
    "RunConflictError",
    "RunNotFoundError",
    "ServerError",
    "ServiceUnavailableError",
    "StaleReportError",
    "TransportError",
    "UsageError",
    "ValidationError",
    "error_from_problem",
]


class LRServeError(Exception):
    """Base class of every error raised by the lrserve SDK."""


class UsageError(LRServeError, ValueError):
    """The call cannot be made as asked (bad URL, invalid run id, bad argument).

    Raised before anything is sent; also a :class:`ValueError`.
    """


class TransportError(LRServeError):
    """The server could not be reached, or the connection failed, after all retries.

    ``cause`` is the last underlying :mod:`httpx` exception and ``attempts`` the number
    of attempts made.
    """

    def __init__(self, message: str, *, cause: BaseException | None = None, attempts: int = 1):
        super().__init__(message)
        self.cause = cause
        self.attempts = attempts


class APIError(LRServeError):
    """The server answered with an error status (an RFC 9457 problem document).

    Attributes mirror the problem+json body: ``status`` (HTTP status), ``type`` (e.g.
    ``"/problems/run-not-found"``), ``title``, ``detail`` (the server's explanation),
    ``errors`` (field problems, each ``{"loc": [...], "msg": "..."}``), plus ``slug``
    (the last part of ``type``), ``headers`` and ``body`` (the whole parsed body).
    """

    def __init__(
        self,
        status: int,
        *,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        errors: list[dict[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors: list[dict[str, Any]] = list(errors or [])
        self.headers: dict[str, str] = dict(headers or {})
        self.body = body
        super().__init__(self._message())

    @property
    def slug(self) -> str:
        """The problem slug: ``"run-not-found"`` for type ``"/problems/run-not-found"``."""
        return self.type.rstrip("/").rsplit("/", 1)[-1] if self.type != "about:blank" else ""

    def _message(self) -> str:
        head = f"{self.status} {self.title}".strip()
        text = f"{head}: {self.detail}" if self.detail else head
        lines = []
        for err in self.errors:
            loc = ".".join(str(part) for part in err.get("loc", []) or [])
            msg = err.get("msg", "")
            lines.append(f"{loc}: {msg}" if loc else str(msg))
        # lrserve's detail is the first field error itself ("body.x: msg (and 2 more)"):
        # printing it again below the detail would say everything twice.
        if lines and self.detail.startswith(lines[0]):
            lines = lines[1:]
        for line in lines[:5]:
            text += f"\n  {line}"
        if len(lines) > 5:
            text += f"\n  ... and {len(lines) - 5} more"
        return text


class BadRequestError(APIError):
    """400, or another 4xx without a more specific class (405, 415, ...)."""


class ValidationError(APIError):
    """422 ``validation-error``: the body or a parameter is invalid; see ``errors``."""


class AuthenticationError(APIError):
    """401 ``unauthorized``: no token, or a wrong one."""


class PermissionDeniedError(APIError):
    """403 ``forbidden``: the token lacks the scope (e.g. a read-only token writing)."""


class NotFoundError(APIError):
    """404: the run (or the path) does not exist."""


class RunNotFoundError(NotFoundError):
    """404 ``run-not-found``."""


class ConflictError(APIError):
    """409: the request conflicts with what is stored."""


class RunConflictError(ConflictError):
    """409 ``run-conflict``: a run with this id exists with a different spec."""


class ReportConflictError(ConflictError):
    """409 ``report-conflict``: this (step, rank) was already reported with other values."""


class StaleReportError(ConflictError):
    """409 ``stale-report``: the step is older than the newest completed step."""


class TooLateError(ConflictError):
    """409 ``too-late``: trainers may already hold the values of that step.

    ``earliest_step`` is the first step the change can be guaranteed from: post it again
    with that ``from_step`` (or later).
    """

    @property
    def earliest_step(self) -> int | None:
        value = self.body.get("earliest_step") if isinstance(self.body, Mapping) else None
        return int(value) if isinstance(value, int) else None


class RewindConflictError(ConflictError):
    """409 ``rewind-conflict``: the rewind key was already used for another step."""


class PayloadTooLargeError(APIError):
    """413 ``payload-too-large``."""


class ServerError(APIError):
    """5xx: the server failed (after retries, for the retryable codes)."""


class ServiceUnavailableError(ServerError):
    """503 (e.g. ``database-busy``): still unavailable after all retries."""


_BY_SLUG: dict[str, type[APIError]] = {
    "validation-error": ValidationError,
    "run-not-found": RunNotFoundError,
    "not-found": NotFoundError,
    "run-conflict": RunConflictError,
    "report-conflict": ReportConflictError,
    "stale-report": StaleReportError,
    "too-late": TooLateError,
    "rewind-conflict": RewindConflictError,
    "payload-too-large": PayloadTooLargeError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "database-busy": ServiceUnavailableError,
}

_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    503: ServiceUnavailableError,
}


def _class_for(status: int, slug: str) -> type[APIError]:
    cls = _BY_SLUG.get(slug)
    # A slug only wins when it agrees with the status; a proxy's 503 page must not
    # become a validation error because of some unrelated body.
    if cls is not None and _BY_STATUS.get(status) in cls.__mro__:
        return cls
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    if status >= 400:
        return BadRequestError
    return APIError


def error_from_problem(
    status: int, body: Any, headers: Mapping[str, str] | None = None
) -> APIError:
    """Build the matching :class:`APIError` subclass from a status and a parsed body.

    ``body`` is the decoded problem+json document, or any other decoded value / text
    when the response was not a problem document (a proxy's HTML page, say).
    """
    problem: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    ptype = str(problem.get("type") or "about:blank")
    title = str(problem.get("title") or "")
    detail = problem.get("detail")
    if detail is None:
        # FastAPI's default error shape is {"detail": ...}; text bodies keep their gist.
        detail = body.strip()[:500] if isinstance(body, str) else ""
    elif not isinstance(detail, str):
        detail = str(detail)
    raw_errors = problem.get("errors")
    errors = [e for e in raw_errors if isinstance(e, dict)] if isinstance(raw_errors, list) else []
    slug = ptype.rstrip("/").rsplit("/", 1)[-1] if ptype != "about:blank" else ""
    if not title:
        title = _REASONS.get(status, "Error")
    cls = _class_for(status, slug)
    return cls(
        status, type=ptype, title=title, detail=detail, errors=errors, headers=headers, body=body
    )


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
