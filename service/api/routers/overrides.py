"""Operator overrides from a step on (audited as events, versioned)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

from service.api.common import RunId, json_response
from service.api.deps import get_runs
from service.api.routers.runs import run_answer
from service.api.routers.steering import DRY_RUN_ANSWER, DryRunQuery, dry_run_answer
from service.api.schemas import ChangePreviewOut, OverrideIn, RunOut, problems
from service.runs.model import OverrideChange
from service.runs.service import Runs
from service.runs.transactions import OverrideWithdrawal
from service.schedules.base import MAX_STEP

router = APIRouter(prefix="/v1", tags=["control"])


@router.post(
    "/runs/{run_id}/overrides",
    status_code=201,
    summary="Set or scale a field of some groups from a step on",
    response_model=RunOut,
    responses={200: DRY_RUN_ANSWER, **problems(401, 403, 404, 409, 413, 415, 422, 503)},
)
async def post_override(
    run_id: RunId,
    body: OverrideIn,
    runs: Annotated[Runs, Depends(get_runs)],
    dry_run: DryRunQuery = None,
) -> Response:
    change = OverrideChange(
        from_step=body.from_step,
        action=body.action,
        value=body.value,
        groups=body.groups,
        field=body.field,
        note=body.note,
    )
    if dry_run is not None:
        return await dry_run_answer(runs, run_id, dry_run, change)
    return json_response(run_answer(await runs.add_override(run_id, change)), 201)


@router.delete(
    "/runs/{run_id}/overrides/{n}",
    summary="Withdraw override n from a step on (default: the earliest guaranteed step)",
    response_model=RunOut | ChangePreviewOut,
    responses=problems(401, 403, 404, 409, 422, 503),
)
async def withdraw_override(
    run_id: RunId,
    n: Annotated[int, Path(ge=1, le=1_000_000, description="the override's number")],
    runs: Annotated[Runs, Depends(get_runs)],
    from_step: Annotated[
        int | None,
        Query(ge=0, le=MAX_STEP, description="first step without it (default: earliest)"),
    ] = None,
    dry_run: DryRunQuery = None,
) -> Response:
    if dry_run is not None:
        return await dry_run_answer(runs, run_id, dry_run, OverrideWithdrawal(n, from_step))
    run, _ = await runs.withdraw_override(run_id, n, from_step)
    return json_response(run_answer(run))
