"""Inspection: the run's event log and its curve decimated for plotting."""

from __future__ import annotations

import json
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from service.api.common import RunId, json_response
from service.api.deps import db_read, get_store, settings_of
from service.api.problems import run_not_found, validation_error
from service.runs.curve import decimate
from service.runs.model import compile_spec, evaluate
from service.schedules.base import MAX_STEP
from service.store import Store

router = APIRouter(prefix="/v1", tags=["inspection"])


@router.get("/runs/{run_id}/events", summary="The run's events in order (created, reduced, ...)")
async def get_events(
    run_id: RunId,
    store: Annotated[Store, Depends(get_store)],
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    rows = await db_read(store, store.events, run_id, after, limit)
    return json_response(
        {
            "run": run_id,
            "events": [
                {
                    "seq": e.seq,
                    "type": e.type,
                    "step": e.step,
                    "at": e.at,
                    "data": json.loads(e.data),
                }
                for e in rows
            ],
        }
    )


def check_curve_range(start: int, stop: int | None, default_stop: int, max_span: int) -> int:
    stop = default_stop if stop is None else stop
    if stop <= start:
        raise validation_error(
            ["query", "stop"], f"stop ({stop}) must be greater than start ({start})"
        )
    if stop - start > max_span:
        raise validation_error(
            ["query", "stop"], f"a curve spans at most {max_span} steps (asked {stop - start})"
        )
    return stop


@router.get("/runs/{run_id}/curve", summary="Values over [start, stop), decimated to ~points")
async def get_curve(
    run_id: RunId,
    request: Request,
    store: Annotated[Store, Depends(get_store)],
    start: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    stop: Annotated[int | None, Query(ge=1, le=MAX_STEP)] = None,
    points: Annotated[int, Query(ge=2, le=10_000)] = 500,
) -> Response:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    default_stop = max(1000, (run.step or 0) + 1)
    stop = check_curve_range(start, stop, default_stop, settings_of(request).max_curve_span)
    compiled = compile_spec(run.spec)
    state, overrides = json.loads(run.state), json.loads(run.overrides)
    # Up to millions of steps of numpy work: off the event loop.
    steps, groups = await to_thread.run_sync(
        decimate,
        lambda a, n: evaluate(compiled.program, state, overrides, a, n),
        start,
        stop,
        points,
    )
    return json_response(
        {
            "run": run_id,
            "version": run.version,
            "start": start,
            "stop": stop,
            "steps": steps,
            "groups": groups,
        },
        headers={"ETag": f'"{run.version}"'},
    )
