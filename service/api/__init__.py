"""The HTTP layer: FastAPI app factory, routers, errors, auth and metrics."""

from __future__ import annotations

from service.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
