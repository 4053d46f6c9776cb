"""RFC 9457 problem+json errors and the handlers that make every failure one.

Slugs are part of the wire contract (docs/architecture.md); the SDK maps them to exceptions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.runs.errors import (
    InvalidArgument,
    ReportConflict,
    RewindConflict,
    RunConflict,
    RunError,
    RunNotFound,
    StaleReport,
    TooLate,
)
from service.runs.repository import StoreBusy, StoreError
from service.schedules import SpecError
from service.schedules.cost import WorkLimitExceeded
from service.schedules.hints import improve as improve_spec_errors

log = logging.getLogger("lrserve.errors")

PROBLEM_JSON = "application/problem+json"

_STATUS_SLUG = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    408: ("request-timeout", "Request timeout"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Validation error"),
    503: ("service-unavailable", "Service unavailable"),
}


class ApiError(Exception):
    """An error answered as problem+json with a stable ``type`` slug."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})


def validation_error(loc: Iterable[str | int], msg: str, detail: str | None = None) -> ApiError:
    loc = list(loc)
    return ApiError(
        422,
        "validation-error",
        "Validation error",
        detail or f"{'.'.join(str(p) for p in loc)}: {msg}",
        errors=[{"loc": loc, "msg": msg}],
    )


_RUN_ERRORS: dict[type[RunError], tuple[int, str, str]] = {
    RunNotFound: (404, "run-not-found", "Run not found"),
    RunConflict: (409, "run-conflict", "Run conflict"),
    ReportConflict: (409, "report-conflict", "Report conflict"),
    StaleReport: (409, "stale-report", "Stale report"),
    RewindConflict: (409, "rewind-conflict", "Rewind key conflict"),
    TooLate: (409, "too-late", "Too late for that step"),
}


def argument_location(request: Request, field: Iterable[str | int]) -> list[str | int]:
    """Where a use case's argument came from: a GET's from the query (path parameters are
    checked before any use case runs), anything else's from the body."""
    return ["query" if request.method == "GET" else "body", *field]


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts on the request's path.

    Each method is tried against the routes as the router would (FastAPI keeps included
    routers as lazy route groups, so their routes' ``methods`` are not listed at the top).
    """
    routes = request.app.router.routes
    return [
        method
        for method in _METHOD_ORDER
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"/problems/{slug}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = list(errors)
    if extra:
        body.update(extra)  # RFC 9457 extension members
    return Response(
        json.dumps(body, default=str).encode(),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def _json_safe_loc(loc: Iterable[Any]) -> list[str | int]:
    return [p if isinstance(p, (str, int)) else str(p) for p in loc]


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Spec errors get messages that name the fix (a mistyped type or argument, a bare node
    # sent as a run body); every other error keeps pydantic's message.
    errors = [
        {**err, "loc": _json_safe_loc(err.get("loc", ())), "msg": str(err.get("msg", "invalid"))}
        for err in exc.errors()
    ]
    return improve_spec_errors(errors)


def _invalid(request: Request, field: Iterable[Any], msg: str) -> Response:
    loc = argument_location(request, _json_safe_loc(field))
    return problem_response(
        422,
        "validation-error",
        "Validation error",
        f"{'.'.join(str(p) for p in loc)}: {msg}",
        [{"loc": loc, "msg": msg}],
    )


def install_handlers(app: FastAPI) -> None:
    """Every exception becomes problem+json; unknown ones a logged 500 (never on purpose)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return problem_response(
            exc.status, exc.slug, exc.title, exc.detail, exc.errors, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = _validation_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return problem_response(
            422,
            "validation-error",
            "Validation error",
            f"{where}: {first['msg']}{more}",
            errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug, title = _STATUS_SLUG.get(exc.status_code, ("http-error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.url.path}"
        headers = exc.headers
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
            # Starlette names the methods of the first route matching the path only; the
            # answer must name every method the path has (RFC 9110, 15.5.6).
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return problem_response(exc.status_code, slug, title, detail, None, headers)

    @app.exception_handler(SpecError)
    async def _spec(request: Request, exc: SpecError) -> Response:
        # A spec that parses but cannot be compiled for its groups, or a window the engine
        # refuses (past the largest exact step): the client's problem, located like
        # pydantic's own errors.
        return _invalid(request, exc.loc, exc.msg)

    @app.exception_handler(WorkLimitExceeded)
    async def _work(request: Request, exc: WorkLimitExceeded) -> Response:
        # Refused before any value is computed: the request would cost more than one request
        # may (docs/operations.md, "Request limits and the work budget"); nothing is changed.
        extra: dict[str, Any] = {
            "limit": exc.limit,
            "amount": exc.amount,
            "maximum": exc.maximum,
        }
        if exc.max_count is not None:
            extra["max_count"] = exc.max_count
        return problem_response(422, "work-limit", "Over the work limit", str(exc), extra=extra)

    @app.exception_handler(InvalidArgument)
    async def _argument(request: Request, exc: InvalidArgument) -> Response:
        return _invalid(request, exc.field, exc.msg)

    @app.exception_handler(RunError)
    async def _run_error(request: Request, exc: RunError) -> Response:
        status, slug, title = _RUN_ERRORS.get(type(exc), (409, "conflict", "Conflict"))
        extra = {"earliest_step": exc.earliest_step} if isinstance(exc, TooLate) else None
        return problem_response(status, slug, title, exc.message, extra=extra)

    @app.exception_handler(StoreBusy)
    async def _busy(request: Request, exc: StoreBusy) -> Response:
        return problem_response(
            503,
            "database-busy",
            "Database busy",
            f"{exc}; retry after {exc.retry_after} s",
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> Response:
        log.error("storage error on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            503,
            "database-busy",
            "Database unavailable",
            "the database failed to answer; retry later",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception) -> Response:
        # Reaching this is a bug: tests show no input does. Log it, never leak internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500, "internal-error", "Internal server error", "an unexpected error occurred"
        )
