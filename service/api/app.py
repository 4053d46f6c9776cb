"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import Depends, FastAPI

from service.api.auth import check_request, require_token
from service.api.common import HotRoute
from service.api.deps import StoreHolder
from service.api.middleware import RequestMiddleware
from service.api.problems import install_handlers
from service.api.routers import dashboard, health, inspect, lr, metrics, overrides, preview, runs
from service.config import Settings

log = logging.getLogger("lrserve.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: from ``LRSERVE_*`` environment variables)."""
    settings = settings if settings is not None else Settings.from_env()
    store_holder = StoreHolder(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await to_thread.run_sync(store_holder.open)
        except Exception as exc:
            # Keep serving: /readyz says 503 and requests retry the migration lazily.
            log.error(
                "store unavailable",
                extra={"fields": {"event": "store_unavailable", "error": type(exc).__name__}},
            )
        try:
            yield
        finally:
            await to_thread.run_sync(store_holder.close)

    app = FastAPI(
        title="lrserve",
        version="0.1.0",
        summary="Learning-rate schedules, plateau state and metric reports for training jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store_holder = store_holder
    install_handlers(app)

    # Without a token there is nothing to check: no per-request dependency at all.
    v1_deps = [Depends(require_token)] if settings.auth_enabled else []
    for module in (lr, metrics, runs, inspect, preview, overrides):
        app.include_router(module.router, dependencies=v1_deps)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    # The two hot paths, matched before everything else (see HotRoute).
    guard = check_request if settings.auth_enabled else None
    app.router.routes[:0] = [
        HotRoute("/v1/runs/{run_id}/lr", lr.get_lr, "GET", guard),
        HotRoute("/v1/runs/{run_id}/metrics", metrics.post_metrics, "POST", guard),
    ]

    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
    )
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``service.api.app:app_from_env``): every worker reads the env."""
    from service.api.observability import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
