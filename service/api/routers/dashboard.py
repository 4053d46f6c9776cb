"""The web page people use to watch and steer runs (`GET /`).

One static file: it holds no data and no secret (a token typed into it stays in that
browser) and reads everything through the same `/v1` API as curl, so it needs no auth of
its own.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])

_PAGE = resources.files("service.api").joinpath("static/index.html").read_bytes()


@router.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})
