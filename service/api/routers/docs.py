"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with their assets served by this server.

FastAPI's defaults load both from a CDN (and ReDoc's fonts from Google), so on a machine
without internet access the pages stayed blank. The assets are vendored in
``service/api/static/vendor/`` (versions and licences in its README.md) and served by the
dashboard's ``/static/`` route; the pages ask for nothing else.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse

router = APIRouter(tags=["docs"])

_VENDOR = "/static/vendor"
_FAVICON = f"{_VENDOR}/swagger-ui-favicon-32x32.png"


def _root(request: Request) -> str:
    # Behind a proxy that mounts the app under a prefix, the assets are under it too.
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="lrserve - API",
        swagger_js_url=f"{root}{_VENDOR}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{_VENDOR}/swagger-ui.css",
        swagger_favicon_url=f"{root}{_FAVICON}",
        # No badge from the online validator (it would fetch validator.swagger.io).
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title="lrserve - API",
        redoc_js_url=f"{root}{_VENDOR}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{_FAVICON}",
        with_google_fonts=False,
    )
