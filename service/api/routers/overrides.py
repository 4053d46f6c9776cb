"""Operator overrides from a step on (audited as events, versioned)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from service.api.common import RunId, json_response
from service.api.deps import get_runs
from service.api.routers.runs import run_answer
from service.api.schemas import OverrideIn, RunOut, problems
from service.runs.model import OverrideChange
from service.runs.service import Runs

router = APIRouter(prefix="/v1", tags=["control"])


@router.post(
    "/runs/{run_id}/overrides",
    status_code=201,
    summary="Set or scale a field of some groups from a step on",
    response_model=RunOut,
    responses=problems(401, 403, 404, 413, 415, 422, 503),
)
async def post_override(
    run_id: RunId, body: OverrideIn, runs: Annotated[Runs, Depends(get_runs)]
) -> Response:
    change = OverrideChange(
        from_step=body.from_step,
        action=body.action,
        value=body.value,
        groups=body.groups,
        field=body.field,
        note=body.note,
    )
    return json_response(run_answer(await runs.add_override(run_id, change)), 201)
