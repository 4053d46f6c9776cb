"""Steering a live run: schedule amendments and rewinds (API.md, "Steering a live run")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.api.common import RunId, json_response
from service.api.deps import get_runs
from service.api.routers.runs import run_answer
from service.api.schemas import AmendmentIn, ChangePreviewOut, RewindIn, RunOut, problems
from service.runs.model import AmendmentChange, RewindChange
from service.runs.service import Runs
from service.runs.transactions import Change
from service.runs.views import CurveValues
from service.schedules.base import MAX_STEP

router = APIRouter(prefix="/v1", tags=["control"])


# -- dry runs: ?dry_run=true on every steering call --------------------------------------


@dataclass(frozen=True)
class DryRun:
    """A dry run's curve range (``start``, ``stop``, ``points`` as ``GET .../curve``)."""

    start: int
    stop: int | None
    points: int


def dry_run_query(
    dry_run: Annotated[
        bool,
        Query(
            description="true: store nothing; answer the run as the change would leave it "
            "and its curve over start/stop/points before and after (refusals as without)"
        ),
    ] = False,
    start: Annotated[int, Query(ge=0, le=MAX_STEP, description="dry run: first step")] = 0,
    stop: Annotated[
        int | None, Query(ge=1, le=MAX_STEP, description="dry run: end of the curve")
    ] = None,
    points: Annotated[int, Query(ge=2, le=10_000, description="dry run: about this many")] = 500,
) -> DryRun | None:
    return DryRun(start, stop, points) if dry_run else None


DryRunQuery = Annotated[DryRun | None, Depends(dry_run_query)]


def _curve(curve: CurveValues) -> dict[str, Any]:
    return {
        "run": curve.run_id,
        "version": curve.version,
        "start": curve.start,
        "stop": curve.stop,
        "steps": curve.steps,
        "groups": curve.groups,
    }


async def dry_run_answer(runs: Runs, run_id: str, query: DryRun, change: Change) -> Response:
    """The answer of a dry run of ``change`` (``ChangePreviewOut``)."""
    preview = await runs.dry_run(run_id, change, query.start, query.stop, query.points)
    return json_response(
        {
            "dry_run": True,
            "changed": preview.after.version != preview.before.version,
            "run": run_answer(preview.after),
            "before": _curve(preview.before_curve),
            "after": _curve(preview.after_curve),
        }
    )


DRY_RUN_ANSWER = {
    "description": "a dry run (?dry_run=true): nothing stored",
    "model": ChangePreviewOut,
}


@router.post(
    "/runs/{run_id}/amendments",
    status_code=201,
    summary="Change the schedule from a step on (values before it never change)",
    response_model=RunOut,
    responses={
        200: {
            "description": "the same amendment was already made; or a dry run (nothing stored)",
            "model": RunOut | ChangePreviewOut,
        },
        **problems(401, 403, 404, 409, 413, 415, 422, 503),
    },
)
async def post_amendment(
    run_id: RunId,
    body: AmendmentIn,
    runs: Annotated[Runs, Depends(get_runs)],
    dry_run: DryRunQuery = None,
) -> Response:
    change = AmendmentChange(
        from_step=body.from_step,
        parts=body.parts(),
        restart=body.restart,
        base=body.base,
        note=body.note,
    )
    if dry_run is not None:
        return await dry_run_answer(runs, run_id, dry_run, change)
    run, created = await runs.amend(run_id, change)
    return json_response(run_answer(run), 201 if created else 200)


@router.post(
    "/runs/{run_id}/rewind",
    summary="Take the run back to a step, as when a job restarts from a checkpoint",
    response_model=RunOut | ChangePreviewOut,
    responses=problems(401, 403, 404, 409, 413, 415, 422, 503),
)
async def post_rewind(
    run_id: RunId,
    body: RewindIn,
    runs: Annotated[Runs, Depends(get_runs)],
    dry_run: DryRunQuery = None,
) -> Response:
    change = RewindChange(body.to_step, body.key, body.note)
    if dry_run is not None:
        return await dry_run_answer(runs, run_id, dry_run, change)
    run, _ = await runs.rewind(run_id, change)
    return json_response(run_answer(run))
