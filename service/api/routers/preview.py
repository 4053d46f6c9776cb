"""Preview a schedule spec without creating a run (works while the database is down)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.common import json_response
from service.api.deps import settings_of
from service.api.schemas import PreviewIn, PreviewOut, problems
from service.runs import service as runs

router = APIRouter(prefix="/v1", tags=["schedules"])


@router.post(
    "/schedules/preview",
    summary="Values of a spec for a window or a decimated range",
    response_model=PreviewOut,
    responses=problems(401, 403, 413, 415, 422),
)
async def preview(body: PreviewIn, request: Request) -> Response:
    sampled = await runs.preview(
        body.schedule_spec(),
        body.start,
        body.count,
        body.points,
        body.stop,
        settings_of(request).max_curve_span,
    )
    answer: dict[str, Any] = {"start": body.start, "count": sampled.count}
    if sampled.steps is not None:
        answer["steps"] = sampled.steps
    answer["groups"] = sampled.groups
    return json_response(answer)
