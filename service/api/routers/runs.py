"""Runs: idempotent create, read, list, delete."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.api.common import RUN_ID_PATTERN, RunId, json_response
from service.api.deps import get_runs
from service.api.problems import validation_error
from service.api.schemas import HeartbeatIn, RunListOut, RunOut, problems
from service.runs.listing import STATUSES
from service.runs.model import RunSpec
from service.runs.service import RunQuery, Runs, RunSummary
from service.runs.views import Run

router = APIRouter(prefix="/v1", tags=["runs"])
_ID = re.compile(RUN_ID_PATTERN)


Sort = Literal["id", "-id", "created", "-created", "updated", "-updated", "step", "-step"]
_SORT_VALUE = {
    "id": lambda r: r.id,
    "created": lambda r: r.created_at,
    "updated": lambda r: r.updated_at,
    # The store orders by COALESCE(step, -1): a run without a report sorts first.
    "step": lambda r: -1 if r.step is None else r.step,
}


def encode_cursor(run_id: str, sort: str = "id", value: str | int | None = None) -> str:
    """An opaque cursor: the id alone for ``sort=id`` (the format before sorts existed), else
    ``[sort, value, id]`` as JSON; base64url either way."""
    text = run_id if sort == "id" else json.dumps([sort, value, run_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str = "id") -> tuple[str | int | None, str]:
    """``(sort value, id)`` of a cursor :func:`encode_cursor` made for ``sort``."""
    bad = validation_error(["query", "cursor"], "not a cursor this server returned")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if _ID.fullmatch(text):  # an id cannot start with "[": never confused with the JSON form
        if sort != "id":
            raise validation_error(
                ["query", "cursor"], f"this cursor pages sort=id, not sort={sort}; start over"
            )
        return text, text
    try:
        kind, value, run_id = json.loads(text)
    except (ValueError, TypeError):
        raise bad from None
    if kind != sort:
        raise validation_error(
            ["query", "cursor"], f"this cursor pages sort={kind}, not sort={sort}; start over"
        )
    expected = int if sort == "step" else str
    if (
        not isinstance(run_id, str)
        or not _ID.fullmatch(run_id)
        or not isinstance(value, expected)
        or isinstance(value, bool)
    ):
        raise bad
    return value, run_id


def _statuses(raw: list[str] | None) -> frozenset[str]:
    """``?status=running&status=idle`` or ``?status=running,idle``."""
    wanted = {s.strip() for item in raw or [] for s in item.split(",") if s.strip()}
    unknown = sorted(wanted - set(STATUSES))
    if unknown:
        raise validation_error(
            ["query", "status"], f"unknown status {unknown[0]!r}; use {', '.join(STATUSES)}"
        )
    return frozenset(wanted)


def summary_answer(row: RunSummary, status: str) -> dict[str, Any]:
    """The wire form of a listed run (:class:`~service.api.schemas.RunSummaryOut`)."""
    return {
        "id": row.id,
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "step": row.step,
        "completed_step": row.completed_step,
        "last_report_at": row.last_report_at,
        "heartbeat_at": row.heartbeat_at,
        "status": status,
        "horizon": row.horizon,
        "tags": json.loads(row.tags),
        "metadata": json.loads(row.metadata),
    }


def run_answer(run: Run) -> dict[str, Any]:
    """The wire form of a run (:class:`~service.api.schemas.RunOut`)."""
    return {
        "id": run.id,
        "spec": run.spec_document(),
        "version": run.version,
        "values_version": run.values_version,
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
        "last_report_at": run.last_report_at,
        "heartbeat_at": run.heartbeat_at,
        "status": run.status,
        "heartbeat_step": run.heartbeat_step,
        "horizon": run.horizon,
        "tags": list(run.tags),
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
    summary="List runs: filter by status, search, tags; sort; cursor-paginated",
    response_model=RunListOut,
    responses=problems(401, 422, 503),
)
async def list_runs(
    runs: Annotated[Runs, Depends(get_runs)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    status: Annotated[
        list[str] | None,
        Query(description="running, idle, finished: repeat it or give a comma list (any)"),
    ] = None,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            description="case-insensitive substring of the run id or of a metadata value",
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        Query(description="an exact tag (metadata.tags / metadata.tag); repeated: all of them"),
    ] = None,
    sort: Annotated[
        Sort, Query(description="id, created, updated or step; '-' in front: descending")
    ] = "id",
) -> Response:
    key = sort.lstrip("-")
    after = decode_cursor(cursor, key) if cursor else None
    for t in tag or []:
        if not t or len(t) > 200:
            raise validation_error(["query", "tag"], "a tag has 1 to 200 characters")
    search = q.lower() if q else None
    if search is not None and "\n" in search:
        raise validation_error(["query", "q"], "a search cannot contain a line break")
    since = runs.active_since()
    query = RunQuery(
        limit=limit,
        sort=key,
        descending=sort.startswith("-"),
        after=after,
        statuses=_statuses(status),
        active_since=since,
        search=search,
        tags=tuple(dict.fromkeys(tag or [])),
    )
    rows, more = await runs.list_runs(query)
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = encode_cursor(last.id, key, _SORT_VALUE[key](last))
    return json_response(
        {
            "runs": [summary_answer(r, runs.status(r, since)) for r in rows],
            "next_cursor": next_cursor,
        }
    )


@router.post(
    "/runs/{run_id}/heartbeat",
    status_code=204,
    summary="A trainer is alive (and, with finished, done); the run's version stays",
    response_class=Response,
    responses=problems(401, 403, 404, 413, 415, 422, 503),
)
async def post_heartbeat(
    run_id: RunId, body: HeartbeatIn, runs: Annotated[Runs, Depends(get_runs)]
) -> Response:
    await runs.heartbeat(run_id, body.rank, body.step, body.finished)
    return Response(status_code=204)


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
