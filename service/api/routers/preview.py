"""Preview a schedule spec without creating a run."""

from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from service.api.common import json_response, translate
from service.api.deps import settings_of
from service.api.problems import validation_error
from service.api.routers.inspect import check_curve_range
from service.runs.curve import decimate
from service.runs.model import Values, apply_overrides
from service.schedules import Program, ScheduleSpec
from service.schedules.base import MAX_STEP

router = APIRouter(prefix="/v1", tags=["schedules"])
MAX_WINDOW = 100_000


class PreviewIn(ScheduleSpec):
    """A run's schedule part plus the steps to show."""

    start: int = Field(0, ge=0, le=MAX_STEP)
    count: int | None = Field(None, ge=1, le=MAX_WINDOW)
    points: int | None = Field(None, ge=2, le=10_000)
    stop: int | None = Field(None, ge=1, le=MAX_STEP)


def _compile(body: PreviewIn) -> Program:
    schedule = ScheduleSpec.model_validate(
        body.model_dump(exclude={"start", "count", "points", "stop"})
    )
    return Program(schedule)


@router.post("/schedules/preview", summary="Values of a spec for a window or a decimated range")
async def preview(body: PreviewIn, request: Request) -> Response:
    if body.points is not None and body.count is not None:
        raise validation_error(["body", "points"], "give either count or points with stop")
    if body.stop is not None and body.points is None:
        raise validation_error(["body", "points"], "stop needs points")
    program = translate(_compile, body)
    state = program.initial_state()

    def window(a: int, n: int) -> Values:
        return apply_overrides(program.evaluate(state, start=a, count=n), a, n, [])

    if body.points is not None:
        if body.stop is None:
            raise validation_error(["body", "stop"], "points needs stop")
        stop = check_curve_range(
            body.start, body.stop, body.stop, settings_of(request).max_curve_span
        )
        steps, groups = await to_thread.run_sync(decimate, window, body.start, stop, body.points)
        return json_response(
            {"start": body.start, "count": len(steps), "steps": steps, "groups": groups}
        )
    count = body.count if body.count is not None else 100
    values = await to_thread.run_sync(window, body.start, count)
    return json_response(
        {
            "start": body.start,
            "count": count,
            "groups": {g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()},
        }
    )
