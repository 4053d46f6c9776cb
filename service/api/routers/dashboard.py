"""The web page people use to watch and steer runs (`GET /`).

A static page (service/api/static/index.html, its CSS, and the vendored chart library under
`/static/`): it holds no data and no secret (a token typed into it stays in that browser) and
reads everything through the same `/v1` API as curl, so it needs no auth of its own. Every
asset ships inside the package: the page asks no other host for anything.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import HTMLResponse, Response

router = APIRouter(tags=["dashboard"])

_PAGE = resources.files("service.api").joinpath("static/index.html").read_bytes()


@router.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})


# The page's assets (the vendored chart library, its CSS): shipped inside the package, so the
# page needs no network beyond this server. Plain names only: no "..", no absolute paths.
_ASSET = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


@functools.cache
def _asset(path: str) -> tuple[bytes, str] | None:
    """An asset's bytes and ETag (read once: they change only with the package)."""
    asset = resources.files("service.api").joinpath("static", *path.split("/"))
    if not asset.is_file():
        return None
    data = asset.read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


@router.get("/static/{path:path}", include_in_schema=False)
async def static_asset(path: str, request: Request) -> Response:
    """A file under service/api/static/ (the page's CSS, vendored scripts)."""
    suffix = path[path.rfind(".") :] if "." in path else ""
    found = _asset(path) if _ASSET.fullmatch(path) and suffix in _TYPES else None
    if found is None:
        raise HTTPException(404, f"no asset {path!r}")
    data, tag = found
    # Revalidated on every load (an upgrade changes the page's CSS with its HTML); unchanged
    # files cost a 304.
    headers = {"Cache-Control": "no-cache", "ETag": tag}
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=_TYPES[suffix], headers=headers)
