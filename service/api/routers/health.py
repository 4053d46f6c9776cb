"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from anyio import to_thread
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response

from service.api import observability
from service.api.deps import holder
from service.api.problems import problem_response
from service.api.schemas import problems

router = APIRouter(tags=["operations"])

READY_TTL_S = 1.0
"""How long one readiness answer is reused: probes of every balancer and orchestrator poll
``/readyz`` every few seconds, and the check costs a database round trip (and, on SQLite, an
``access`` and a ``statvfs``)."""


@dataclass
class _Readiness:
    """The last readiness answer of one app, and a lock so that one check runs at a time."""

    at: float = float("-inf")
    status: int = 503
    body: dict[str, object] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


def _readiness(app: FastAPI) -> _Readiness:
    state: _Readiness | None = getattr(app.state, "readiness", None)
    if state is None:
        state = app.state.readiness = _Readiness()
    return state


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database answers and takes writes",
    response_model=None,
    responses={
        200: {
            "description": "ready",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "string", "const": "ready"},
                            "database": {"type": "string"},
                        },
                        "required": ["status", "database"],
                    }
                }
            },
        },
        **problems(503),
    },
)
async def readyz(request: Request) -> Response:
    """200 while the database answers and can be written (SQLite: the file and its directory
    are writable and the disk has room; PostgreSQL: a primary, not read-only); 503 with the
    reason otherwise. One answer serves every probe for :data:`READY_TTL_S`."""
    state = _readiness(request.app)
    if time.monotonic() - state.at >= READY_TTL_S:
        async with state.lock:
            if time.monotonic() - state.at >= READY_TTL_S:  # not refreshed while we waited
                state.status, state.body = await _check(request)
                state.at = time.monotonic()
    if state.status == 200:
        return JSONResponse(state.body)
    return problem_response(
        503,
        "not-ready",
        "Not ready",
        str(state.body["detail"]),
        headers={"Retry-After": str(state.body["retry_after"])},
    )


async def _check(request: Request) -> tuple[int, dict[str, object]]:
    h = holder(request)
    try:
        dialect = await to_thread.run_sync(h.check_ready)
    except Exception as exc:
        # The store's errors carry an operator's sentence (what is wrong, what to do); any
        # other exception is named only.
        detail = str(exc) if _is_store_error(exc) else type(exc).__name__
        retry_after = getattr(exc, "retry_after", 1)
        return 503, {"detail": f"the database is not ready: {detail}", "retry_after": retry_after}
    return 200, {"status": "ready", "database": dialect}


def _is_store_error(exc: Exception) -> bool:
    # (routers do not import the repository: recognise its errors by their module)
    return type(exc).__module__ == "service.runs.repository"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics() -> Response:
    return Response(observability.metrics_text(), media_type=observability.METRICS_CONTENT_TYPE)
