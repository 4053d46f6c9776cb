"""Preview a schedule spec without creating a run (works while the database is down)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.common import LARGE_ANSWER_VALUES, json_with_groups
from service.api.deps import settings_of
from service.api.schemas import PreviewIn, PreviewOut, problems
from service.runs import evaluation
from service.runs.evaluation import heavy

router = APIRouter(prefix="/v1", tags=["schedules"])


@router.post(
    "/schedules/preview",
    summary="Values of a spec for a window or a decimated range",
    response_model=PreviewOut,
    responses=problems(401, 403, 413, 415, 422),
)
async def preview(body: PreviewIn, request: Request) -> Response:
    sampled = await evaluation.preview(
        body.schedule_spec(),
        body.start,
        body.count,
        body.points,
        body.stop,
        settings_of(request).max_curve_span,
        settings_of(request).max_request_work,
    )
    answer: dict[str, Any] = {"start": body.start, "count": sampled.count}
    if sampled.steps is not None:
        answer["steps"] = sampled.steps
    answer["groups"] = sampled.groups
    # Encoded a piece at a time, a large one in a worker thread (see json_with_groups).
    if sampled.count * len(sampled.groups) > LARGE_ANSWER_VALUES:
        encoded = await heavy(json_with_groups, answer)
    else:
        encoded = json_with_groups(answer)
    return Response(encoded, media_type="application/json")
