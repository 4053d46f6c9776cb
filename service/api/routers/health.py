"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers)."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from service.api import observability
from service.api.deps import holder
from service.api.problems import problem_response

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers", response_model=None)
async def readyz(request: Request) -> Response:
    h = holder(request)

    def check() -> str:
        store = h.open()
        store.ping()
        return store.dialect

    try:
        dialect = await to_thread.run_sync(check)
    except Exception as exc:
        return problem_response(
            503,
            "not-ready",
            "Not ready",
            f"the database does not answer: {type(exc).__name__}",
            headers={"Retry-After": "1"},
        )
    return JSONResponse({"status": "ready", "database": dialect})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(observability.metrics_text(), media_type=observability.METRICS_CONTENT_TYPE)
