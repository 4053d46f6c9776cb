"""The LR range test's curve, stop step and suggestions (API.md, "LR range test")."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from service.api.common import RunId, etag, json_response
from service.api.deps import get_runs
from service.api.schemas import RangeTestOut, problems
from service.runs.service import Runs

router = APIRouter(prefix="/v1", tags=["inspection"])


@router.get(
    "/runs/{run_id}/range-test",
    summary="A range test's loss curve against lr, its stop step and the suggested rates",
    response_model=RangeTestOut,
    responses=problems(401, 404, 409, 422, 503),
)
async def get_range_test(run_id: RunId, runs: Annotated[Runs, Depends(get_runs)]) -> Response:
    curve = await runs.range_test(run_id)
    return json_response(
        {
            "run": run_id,
            "steps": curve.steps,
            "lr": curve.lr,
            "loss": curve.loss,
            "smoothed": curve.smoothed,
            "stopped_at": curve.stopped_at,
            "suggestions": curve.suggestions,
            "version": curve.version,
            "metric": curve.metric,
            "num_iter": curve.num_iter,
            "path": curve.path,
            "finished": curve.finished,
            "groups": curve.groups,
            "suggested_steps": curve.suggested_steps,
        },
        headers={"ETag": etag(curve.version)},
    )
