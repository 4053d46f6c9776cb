"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from anyio import to_thread
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from service.api.auth import authorize, require_token
from service.api.common import HotRoute, is_hot, refuse_repeated_query
from service.api.deps import StoreHolder
from service.api.middleware import RequestMiddleware
from service.api.observability import watch_cache
from service.api.problems import install_handlers
from service.api.routers import (
    dashboard,
    docs,
    health,
    inspect,
    lr,
    metrics,
    overrides,
    preview,
    range_test,
    runs,
    steering,
    stream,
)
from service.config import Settings
from service.runs.model import COMPILED
from service.runs.repository import StoreFault
from service.runs.states import LOGS, STATES

log = logging.getLogger("lrserve.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: from ``LRSERVE_*`` environment variables)."""
    settings = settings if settings is not None else Settings.from_env()
    # The compiled-schedule cache is the process's (pure functions of spec texts share it).
    COMPILED.resize(settings.compile_cache_bytes)
    watch_cache("compiled", COMPILED)
    watch_cache("states", STATES)
    watch_cache("reductions", LOGS)
    store_holder = StoreHolder(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await to_thread.run_sync(store_holder.open)
        except StoreFault as exc:
            # Waiting cannot cure it (an unwritable path, a non-UTF8 database): refuse to
            # start, naming the fix, rather than answer 503 forever.
            log.critical(
                "store fault", extra={"fields": {"event": "store_fault", "error": str(exc)}}
            )
            raise
        except Exception as exc:
            # Keep serving: /readyz says 503 and requests retry the migration lazily.
            log.error(
                "store unavailable",
                extra={
                    "fields": {
                        "event": "store_unavailable",
                        "error": type(exc).__name__,
                        "detail": str(exc),
                    }
                },
            )
        # Everything built so far (modules, routes, the compiled OpenAPI models) lives as long
        # as the process: out of the collector's sight, a full collection no longer walks
        # ~10^5 objects while holding the GIL (about 100 ms on a 2-core machine, which every
        # request in flight waited for).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await to_thread.run_sync(store_holder.close)

    app = FastAPI(
        title="lrserve",
        version="0.1.0",
        summary="Learning-rate schedules, plateau state and metric reports for training jobs.",
        lifespan=lifespan,
        # /docs and /redoc come from routers/docs.py: with vendored assets, not a CDN's.
        docs_url=None,
        redoc_url=None,
        # FastAPI's native OpenTelemetry: lrserve has its own metrics and access log, and the
        # check whether a provider is configured cost about 10 us on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.store_holder = store_holder
    install_handlers(app)

    # Without a token there is no auth dependency at all (it costs on every request).
    auth_deps = [Depends(require_token)] if settings.auth_enabled else []
    v1_deps = [*auth_deps, Depends(refuse_repeated_query)]
    v1_routers = [
        m.router
        for m in (lr, metrics, runs, inspect, preview, overrides, steering, range_test, stream)
    ]
    for router in v1_routers:
        app.include_router(router, dependencies=v1_deps)
    for router in (health.router, dashboard.router, docs.router):
        app.include_router(router, dependencies=[Depends(refuse_repeated_query)])
    # The hot paths (endpoints marked @hot), matched before everything else (see HotRoute),
    # guarded by the same auth function as the documented routes' dependency.
    guard = authorize if settings.auth_enabled else None
    hot_routes = [
        HotRoute(route.path, route.endpoint, method, guard)
        for router in v1_routers  # (the app holds included routers lazily: read their own)
        for route in router.routes
        if isinstance(route, APIRoute) and is_hot(route.endpoint)
        for method in sorted(route.methods or ())
    ]
    app.router.routes[:0] = hot_routes

    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
        # (RequestMiddleware calls them itself, past the layers they do not use.)
        hot_routes=hot_routes,
    )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with every error answer under ``application/problem+json`` (the
    media type it is sent with; FastAPI documents a response model as application/json)."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        for item in document.get("paths", {}).values():
            for operation in item.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status[:1] in ("4", "5") and "application/json" in content:
                        content["application/problem+json"] = content.pop("application/json")
        app.openapi_schema = document
    return app.openapi_schema


def app_from_env() -> FastAPI:
    """uvicorn factory (``service.api.app:app_from_env``): every worker reads the env."""
    from service.api.observability import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
