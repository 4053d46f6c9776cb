"""Inspection: the run's event log and its curve decimated for plotting."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.api.common import LARGE_ANSWER_VALUES, RunId, etag, json_response, json_with_groups
from service.api.deps import get_runs
from service.api.schemas import CurveOut, EventsOut, problems
from service.runs.evaluation import heavy
from service.runs.service import Runs
from service.schedules.base import MAX_STEP

router = APIRouter(prefix="/v1", tags=["inspection"])


@router.get(
    "/runs/{run_id}/events",
    summary="The run's events in order (created, reduced, override, amended, rewound, ...)",
    response_model=EventsOut,
    responses=problems(401, 404, 422, 503),
)
async def get_events(
    run_id: RunId,
    runs: Annotated[Runs, Depends(get_runs)],
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    events = await runs.events(run_id, after, limit)
    return json_response(
        {
            "run": run_id,
            "events": [
                {
                    "seq": e.seq,
                    "type": e.type,
                    "step": e.step,
                    "at": e.at,
                    "data": e.data,
                    "branch": e.branch,
                    "abandoned_by": e.abandoned_by,
                }
                for e in events
            ],
        }
    )


@router.get(
    "/runs/{run_id}/curve",
    summary="Values over [start, stop), decimated to ~points",
    response_model=CurveOut,
    responses=problems(401, 404, 422, 503),
)
async def get_curve(
    run_id: RunId,
    runs: Annotated[Runs, Depends(get_runs)],
    start: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    stop: Annotated[int | None, Query(ge=1, le=MAX_STEP)] = None,
    points: Annotated[int, Query(ge=2, le=10_000)] = 500,
) -> Response:
    curve = await runs.curve(run_id, start, stop, points)
    answer = {
        "run": run_id,
        "version": curve.version,
        "start": curve.start,
        "stop": curve.stop,
        "steps": curve.steps,
        "groups": curve.groups,
    }
    # Encoded a piece at a time, a large one in a worker thread (see json_with_groups).
    large = len(curve.steps) * len(curve.groups) > LARGE_ANSWER_VALUES
    body = await heavy(json_with_groups, answer) if large else json_with_groups(answer)
    return Response(body, media_type="application/json", headers={"ETag": etag(curve.version)})
