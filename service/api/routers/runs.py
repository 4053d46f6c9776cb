"""Runs: idempotent create, read, list, delete."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.api.common import RUN_ID_PATTERN, RunId, json_response
from service.api.deps import get_runs
from service.api.problems import validation_error
from service.api.schemas import RunListOut, RunOut, problems
from service.runs.model import RunSpec
from service.runs.service import Run, Runs

router = APIRouter(prefix="/v1", tags=["runs"])
_ID = re.compile(RUN_ID_PATTERN)


def encode_cursor(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        run_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        run_id = ""
    if not _ID.fullmatch(run_id):
        raise validation_error(["query", "cursor"], "not a cursor this server returned")
    return run_id


def run_answer(run: Run) -> dict[str, Any]:
    """The wire form of a run (:class:`~service.api.schemas.RunOut`)."""
    return {
        "id": run.id,
        "spec": run.spec_document(),
        "version": run.version,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "step": run.step,
        "completed_step": run.completed_step,
        "state": run.state,
        "overrides": [{"n": i + 1, **ov} for i, ov in enumerate(run.overrides)],
        "amendments": run.amendments,
        "rewinds": run.rewinds,
        "branch": run.branch,
        "leased_until": run.leased_until,
    }


@router.put(
    "/runs/{run_id}",
    status_code=201,
    summary="Create a run (idempotent)",
    response_model=RunOut,
    responses={
        200: {"description": "the run already exists with this spec", "model": RunOut},
        **problems(401, 403, 409, 413, 415, 422, 503),
    },
)
async def put_run(
    run_id: RunId, spec: RunSpec, runs: Annotated[Runs, Depends(get_runs)]
) -> Response:
    run, created = await runs.create(run_id, spec)
    headers = {"Location": f"/v1/runs/{run_id}"} if created else None
    return json_response(run_answer(run), 201 if created else 200, headers)


@router.get(
    "/runs/{run_id}",
    summary="A run: spec, version, step and plateau state",
    response_model=RunOut,
    responses=problems(401, 404, 422, 503),
)
async def get_run(run_id: RunId, runs: Annotated[Runs, Depends(get_runs)]) -> Response:
    return json_response(run_answer(await runs.get(run_id)))


@router.get(
    "/runs",
    summary="List runs (ordered by id, cursor-paginated)",
    response_model=RunListOut,
    responses=problems(401, 422, 503),
)
async def list_runs(
    runs: Annotated[Runs, Depends(get_runs)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> Response:
    after = decode_cursor(cursor) if cursor else None
    rows, more = await runs.list_runs(limit, after)
    return json_response(
        {
            "runs": [
                {"id": r.id, "version": r.version, "created_at": r.created_at, "step": r.step}
                for r in rows
            ],
            "next_cursor": encode_cursor(rows[-1].id) if more and rows else None,
        }
    )


@router.delete(
    "/runs/{run_id}",
    status_code=204,
    summary="Delete a run and its history",
    response_class=Response,
    responses=problems(401, 403, 404, 422, 503),
)
async def delete_run(run_id: RunId, runs: Annotated[Runs, Depends(get_runs)]) -> Response:
    await runs.delete(run_id)
    return Response(status_code=204)
