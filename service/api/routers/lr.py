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

from service.api.common import (
    RUN_ID_PATTERN,
    JsonBytesResponse,
    etag,
    etag_matches,
    json_bytes,
)
from service.api.deps import db_read, get_store
from service.api.problems import run_not_found, validation_error
from service.runs.model import Values, compile_spec, evaluate
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
    step = _int_param(query, "step", 0, MAX_STEP - 1)
    start = _int_param(query, "start", 0, MAX_STEP)
    count = _int_param(query, "count", 1, MAX_WINDOW)
    if step is not None and (start is not None or count is not None):
        raise validation_error(["query", "step"], "give either step or start/count, not both")
    if count is not None and start is None:
        raise validation_error(["query", "start"], "count needs start")
    if start is not None and start + (count or 1) > MAX_STEP:
        raise validation_error(["query", "count"], f"start + count must be at most {MAX_STEP}")
    store = await get_store(request)
    # One cheap indexed read decides everything: (version, created_at) identifies the run's
    # content (every change bumps version; a re-created id has a new created_at), so values
    # computed for the same key are exact. The caches below only save recomputation.
    current = await db_read(store, store.run_version, run_id)
    if current is None:
        raise run_not_found(run_id)
    version, created_at, run_step = current
    if etag_matches(request.headers.get("if-none-match"), version):
        return Response(status_code=304, headers={"ETag": etag(version)})
    if start is None:
        at = step if step is not None else (run_step or 0)
        version, body = await _one_step(store, run_id, created_at, version, at)
    else:
        key = (run_id, created_at, version, start, count)
        cached = _windows.get(key)
        if cached is None:
            version, body = await _window(store, run_id, start, count or 1)
        else:
            body = cached
    return JsonBytesResponse(
        body, [(b"etag", etag(version).encode()), (b"cache-control", b"no-cache")]
    )


# Blocks of BLOCK consecutive steps, evaluated together (a block costs about what one step
# costs): a trainer asking for step after step, and every rank asking for the same step, are
# answered from memory until the run's version changes.
BLOCK = 1024
_blocks: dict[tuple[Any, ...], Values] = {}
_blocks_bytes = 0
_BLOCKS_MAX_BYTES = 64 * 1024 * 1024
_windows: dict[tuple[Any, ...], bytes] = {}
_WINDOWS_MAX = 256
_WINDOW_MAX_BYTES = 64 * 1024


def _remember_block(key: tuple[Any, ...], values: Values) -> None:
    global _blocks_bytes
    size = sum(a.nbytes for fields in values.values() for a in fields.values())
    if size > _BLOCKS_MAX_BYTES // 16:
        return
    if _blocks_bytes + size > _BLOCKS_MAX_BYTES:
        _blocks.clear()  # crude bound; refilled by the next requests
        _blocks_bytes = 0
    _blocks[key] = values
    _blocks_bytes += size


async def _one_step(
    store: Any, run_id: str, created_at: str, version: int, at: int
) -> tuple[int, bytes]:
    first = at - at % BLOCK
    values = _blocks.get((run_id, created_at, version, first))
    if values is None:
        run = await db_read(store, store.get_run, run_id)
        if run is None:
            raise run_not_found(run_id)
        compiled = compile_spec(run.spec)
        values = evaluate(
            compiled.program,
            json.loads(run.state),
            json.loads(run.overrides),
            first,
            min(BLOCK, MAX_STEP - first),
        )
        # The row may be newer than the first read: answer (and cache) what it says.
        version = run.version
        _remember_block((run_id, run.created_at, version, first), values)
    i = at - first
    groups = {g: {f: float(a[i]) for f, a in fields.items()} for g, fields in values.items()}
    return version, json_bytes({"run": run_id, "step": at, "version": version, "groups": groups})


async def _window(store: Any, run_id: str, start: int, count: int) -> tuple[int, bytes]:
    run = await db_read(store, store.get_run, run_id)
    if run is None:
        raise run_not_found(run_id)
    body = _window_body(run, start, count)
    if len(body) <= _WINDOW_MAX_BYTES:
        if len(_windows) >= _WINDOWS_MAX:
            _windows.clear()
        _windows[(run_id, run.created_at, run.version, start, count)] = body
    return run.version, body


def _window_body(run: RunRecord, start: int, count: int) -> bytes:
    compiled = compile_spec(run.spec)
    values = evaluate(
        compiled.program, json.loads(run.state), json.loads(run.overrides), start, count
    )
    return json_bytes(
        {
            "run": run.id,
            "start": start,
            "count": count,
            "version": run.version,
            "groups": {g: {f: v.tolist() for f, v in fs.items()} for g, fs in values.items()},
        }
    )
