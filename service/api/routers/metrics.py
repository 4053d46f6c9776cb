"""Metric reports (exactly once per (run, step, rank)) and metric history."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from service.api import observability
from service.api.common import (
    RUN_ID_PATTERN,
    RunId,
    json_body_openapi,
    json_response,
    param_doc,
    parse_json_body,
    path_run_id,
    query_number,
    translate,
)
from service.api.deps import db_read, db_write, get_store, settings_of
from service.api.problems import run_not_found
from service.runs import service as runs
from service.runs.model import ReportIn
from service.store import Store
from service.store.base import jsonable

router = APIRouter(prefix="/v1", tags=["metrics"])


def _answer(
    run_id: str,
    result: runs.ReportResult,
    groups: dict[str, dict[str, float]],
    version: int,
    decision: dict[str, Any] | None,
    complete: bool,
    reported_ranks: int,
) -> dict[str, Any]:
    return {
        "run": run_id,
        "step": result.step,
        "rank": result.rank,
        "complete": complete,
        "reported_ranks": reported_ranks,
        "version": version,
        "decision": decision if complete else None,
        "applies_from": result.step + 1,
        "groups": groups,
    }


@router.post(
    "/runs/{run_id}/metrics",
    summary="Report metrics for (step, rank); the answer carries the values from step + 1",
    responses={409: {"description": "report-conflict or stale-report"}},
    openapi_extra={
        **json_body_openapi(ReportIn),
        "parameters": [
            param_doc("run_id", "path", "run id", {"type": "string", "pattern": RUN_ID_PATTERN}),
            param_doc(
                "wait",
                "query",
                "seconds to hold the answer until the step completes (0..300)",
                {"type": "number", "minimum": 0, "maximum": 300, "default": 0},
            ),
        ],
    },
)
async def post_metrics(request: Request) -> Response:
    # Parameters and body are read by hand and the body validated by pydantic-core from
    # bytes: FastAPI's generic machinery costs more than the report transaction itself on
    # this, the busiest write path. Errors are the same 422 problems.
    run_id = path_run_id(request)
    wait = query_number(request, "wait", 0, 300) or 0.0
    body = await parse_json_body(request, ReportIn)
    store = await get_store(request)
    try:
        result = await db_write(
            store, translate, runs.report, store, run_id, body.step, body.rank, dict(body.values)
        )
    except Exception:
        observability.REPORT_OUTCOMES.inc("refused")
        raise
    observability.REPORT_OUTCOMES.inc("duplicate" if result.duplicate else "new")
    if result.completed_now and result.decision is not None:
        observability.DECISION_OUTCOMES.inc("true" if result.decision.get("reduced") else "false")
    run = result.run
    complete, ranks, decision = result.complete, result.reported_ranks, result.decision
    if not complete and wait > 0:
        settings = settings_of(request)
        deadline = time.monotonic() + min(wait, settings.max_wait_seconds)
        # Poll the database, not a process-local event: the completing report may arrive at
        # another worker or replica. The sleep is async, so a waiting report holds no thread.
        while time.monotonic() < deadline:
            await anyio.sleep(
                min(settings.wait_poll_seconds, max(0.0, deadline - time.monotonic()))
            )
            exists, completed = await db_read(store, store.completed_step, run_id)
            if not exists:
                raise run_not_found(run_id)
            if completed is not None and completed >= body.step:
                run, complete, ranks, decision = await db_read(
                    store, translate, runs.step_status, store, run_id, body.step
                )
                break
    if complete and decision is None:
        run, complete, ranks, decision = await db_read(
            store, translate, runs.step_status, store, run_id, body.step
        )
    # The state parsed by the report is the stored one unless a wait re-read the run.
    state = result.state if run is result.run else None
    groups = runs.values_at(run, body.step + 1, state)
    return json_response(_answer(run_id, result, groups, run.version, decision, complete, ranks))


@router.get("/runs/{run_id}/metrics", summary="History of one metric (per report and aggregated)")
async def get_metrics(
    run_id: RunId,
    store: Annotated[Store, Depends(get_store)],
    name: Annotated[str, Query(min_length=1, max_length=200)],
) -> Response:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    reports = await db_read(store, store.reports, run_id)
    completed = await db_read(store, store.events_of_type, run_id, "report_completed")
    points = []
    for r in reports:
        values = json.loads(r.values)
        if name in values:
            points.append({"step": r.step, "rank": r.rank, "value": jsonable(values[name])})
    aggregate = []
    for e in completed:
        agg = json.loads(e.data).get("aggregate", {})
        if name in agg:
            aggregate.append({"step": e.step, "value": jsonable(agg[name])})
    return json_response({"run": run_id, "name": name, "points": points, "aggregate": aggregate})
