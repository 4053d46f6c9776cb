"""Operator overrides from a step on (audited as events, versioned)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from service.api.common import RunId, json_response, run_body, translate
from service.api.deps import db_write, get_store
from service.runs import service as runs
from service.runs.model import OverrideIn
from service.store import Store

router = APIRouter(prefix="/v1", tags=["control"])


@router.post(
    "/runs/{run_id}/overrides",
    status_code=201,
    summary="Set or scale a field of some groups from a step on",
)
async def post_override(
    run_id: RunId, body: OverrideIn, store: Annotated[Store, Depends(get_store)]
) -> Response:
    run = await db_write(store, translate, runs.add_override, store, run_id, body)
    return json_response(run_body(run), 201)
