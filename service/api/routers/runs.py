"""Runs: idempotent create, read, list, delete."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.api.common import RUN_ID_PATTERN, RunId, json_response, run_body, translate
from service.api.deps import db_read, db_write, get_store
from service.api.problems import run_not_found, validation_error
from service.runs import service as runs
from service.runs.model import RunSpec
from service.store import Store

router = APIRouter(prefix="/v1", tags=["runs"])
_ID = re.compile(RUN_ID_PATTERN)


def encode_cursor(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        run_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        run_id = ""
    if not _ID.match(run_id):
        raise validation_error(["query", "cursor"], "not a cursor this server returned")
    return run_id


@router.put(
    "/runs/{run_id}",
    status_code=201,
    summary="Create a run (idempotent)",
    responses={200: {"description": "the run already exists with this spec"}, 409: {}},
)
async def put_run(
    run_id: RunId, spec: RunSpec, store: Annotated[Store, Depends(get_store)]
) -> Response:
    run, created = await db_write(store, translate, runs.create_run, store, run_id, spec)
    headers = {"Location": f"/v1/runs/{run_id}"} if created else None
    return json_response(run_body(run), 201 if created else 200, headers)


@router.get("/runs/{run_id}", summary="A run: spec, version, step and plateau state")
async def get_run(run_id: RunId, store: Annotated[Store, Depends(get_store)]) -> Response:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    return json_response(run_body(run))


@router.get("/runs", summary="List runs (ordered by id, cursor-paginated)")
async def list_runs(
    store: Annotated[Store, Depends(get_store)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> Response:
    after = decode_cursor(cursor) if cursor else None
    rows = await db_read(store, store.list_runs, limit + 1, after)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response(
        {
            "runs": [
                {"id": r.id, "version": r.version, "created_at": r.created_at, "step": r.step}
                for r in rows
            ],
            "next_cursor": encode_cursor(rows[-1].id) if more and rows else None,
        }
    )


@router.delete("/runs/{run_id}", status_code=204, summary="Delete a run and its history")
async def delete_run(run_id: RunId, store: Annotated[Store, Depends(get_store)]) -> Response:
    if not await db_write(store, store.delete_run, run_id):
        raise run_not_found(run_id)
    return Response(status_code=204)
