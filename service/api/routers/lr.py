"""Learning rates for one step or a window, with ETag / If-None-Match.

This is the hot path every rank of every trainer polls, so the endpoint reads its query by
hand (FastAPI's per-request parameter machinery costs more than the whole lookup) and the
parameters are documented through ``openapi_extra`` instead. Validation is the same: a
bad value is a 422 naming the parameter.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.common import RUN_ID_PATTERN, etag, etag_matches, json_bytes
from service.api.deps import db_read, get_store
from service.api.problems import run_not_found, validation_error
from service.runs.model import at_step, compile_spec, evaluate
from service.schedules.base import MAX_STEP
from service.store import RunRecord

router = APIRouter(prefix="/v1", tags=["learning rates"])
MAX_WINDOW = 100_000
_RUN_ID = re.compile(RUN_ID_PATTERN)
_DIGITS = re.compile(r"^[0-9]{1,20}$")


def _int_param(query: Any, name: str, low: int, high: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not _DIGITS.match(raw):
        raise validation_error(["query", name], "must be a non-negative integer")
    value = int(raw)
    if not low <= value <= high:
        raise validation_error(["query", name], f"must be between {low} and {high}")
    return value


def _param(name: str, where: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


_OPENAPI = {
    "parameters": [
        _param("run_id", "path", "run id", {"type": "string", "pattern": RUN_ID_PATTERN}),
        _param(
            "step",
            "query",
            "one step (default: the run's current step)",
            {"type": "integer", "minimum": 0, "maximum": MAX_STEP},
        ),
        _param(
            "start",
            "query",
            "first step of a window",
            {"type": "integer", "minimum": 0, "maximum": MAX_STEP},
        ),
        _param(
            "count",
            "query",
            "window length (needs start)",
            {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW},
        ),
        _param("If-None-Match", "header", 'an ETag ("<version>") seen before', {"type": "string"}),
    ]
}


@router.get(
    "/runs/{run_id}/lr",
    summary="Hyperparameters per group at a step (?step=N) or for a window (?start=N&count=K)",
    responses={304: {"description": "If-None-Match matched the run's version"}},
    openapi_extra=_OPENAPI,
)
async def get_lr(request: Request) -> Response:
    run_id = request.path_params["run_id"]
    if not _RUN_ID.match(run_id):
        raise validation_error(["path", "run_id"], f"must match {RUN_ID_PATTERN}")
    query = request.query_params
    step = _int_param(query, "step", 0, MAX_STEP)
    start = _int_param(query, "start", 0, MAX_STEP)
    count = _int_param(query, "count", 1, MAX_WINDOW)
    if step is not None and (start is not None or count is not None):
        raise validation_error(["query", "step"], "give either step or start/count, not both")
    if count is not None and start is None:
        raise validation_error(["query", "start"], "count needs start")
    store = await get_store(request)
    # One cheap indexed read decides everything: (version, created_at) identifies the run's
    # content (every change bumps version; a re-created id has a new created_at), so an
    # answer rendered for the same key is exact. The cache only saves recomputation.
    current = await db_read(store, store.run_version, run_id)
    if current is None:
        raise run_not_found(run_id)
    version = current[0]
    tag = etag(version)
    if etag_matches(request.headers.get("if-none-match"), version):
        return Response(status_code=304, headers={"ETag": tag})
    key = (run_id, current[1], version, step, start, count)
    body = _rendered.get(key)
    if body is None:
        body = await _render(store, run_id, key, step, start, count)
    return Response(
        body, media_type="application/json", headers={"ETag": tag, "Cache-Control": "no-cache"}
    )


_rendered: dict[tuple[Any, ...], bytes] = {}
_RENDERED_MAX = 4096
_RENDERED_MAX_BYTES = 64 * 1024


async def _render(
    store: Any,
    run_id: str,
    key: tuple[Any, ...],
    step: int | None,
    start: int | None,
    count: int | None,
) -> bytes:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    body = _body(run, step, start, count)
    if (run.created_at, run.version) == key[1:3] and len(body) <= _RENDERED_MAX_BYTES:
        if len(_rendered) >= _RENDERED_MAX:
            _rendered.clear()  # crude bound; refilled by the next requests
        _rendered[key] = body
    return body


def _body(run: RunRecord, step: int | None, start: int | None, count: int | None) -> bytes:
    compiled = compile_spec(run.spec)
    state = json.loads(run.state)
    overrides = json.loads(run.overrides)
    if start is not None:
        n = count if count is not None else 1
        values = evaluate(compiled.program, state, overrides, start, n)
        return json_bytes(
            {
                "run": run.id,
                "start": start,
                "count": n,
                "version": run.version,
                "groups": {g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()},
            }
        )
    at = step if step is not None else (run.step or 0)
    values = evaluate(compiled.program, state, overrides, at, 1)
    return json_bytes(
        {"run": run.id, "step": at, "version": run.version, "groups": at_step(values)}
    )
