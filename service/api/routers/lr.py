"""Learning rates for one step or a window, with ETag / If-None-Match.

This is the hot path every rank of every trainer polls, so the endpoint reads its query by
hand (FastAPI's per-request parameter machinery costs more than the whole lookup) and the
parameters are documented through ``openapi_extra`` instead. Validation is the same: a
bad value is a 422 naming the parameter.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.common import (
    LARGE_ANSWER_VALUES,
    RUN_ID_PATTERN,
    JsonBytesResponse,
    etag,
    etag_matches,
    hot,
    json_bytes,
    json_with_groups,
    param_doc,
    path_run_id,
)
from service.api.deps import get_runs
from service.api.observability import watch_cache
from service.api.problems import validation_error
from service.api.schemas import MAX_WINDOW, StepValuesOut, WindowOut, problems
from service.api.window_codec import MEDIA_TYPE, encode_window, wants_binary
from service.runs.evaluation import heavy
from service.runs.values import BytesLRU
from service.schedules.base import MAX_STEP

router = APIRouter(prefix="/v1", tags=["learning rates"])
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


_OPENAPI = {
    "parameters": [
        param_doc("run_id", "path", "run id", {"type": "string", "pattern": RUN_ID_PATTERN}),
        param_doc(
            "step",
            "query",
            "one step (default: the run's current step)",
            {"type": "integer", "minimum": 0, "maximum": MAX_STEP - 1},
        ),
        param_doc(
            "start",
            "query",
            "first step of a window",
            {"type": "integer", "minimum": 0, "maximum": MAX_STEP - 1},
        ),
        param_doc(
            "count",
            "query",
            "window length (needs start)",
            {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW},
        ),
        param_doc(
            "lease",
            "query",
            "false: an inspection read, not a trainer's; the values are not leased, so a "
            "change may still start inside them (default true)",
            {"type": "boolean", "default": True},
        ),
        param_doc(
            "If-None-Match", "header", 'an ETag ("<version>") seen before', {"type": "string"}
        ),
        param_doc(
            "Accept",
            "header",
            f"{MEDIA_TYPE}: a window in the compact binary encoding (docs/api.md); "
            "anything else: JSON",
            {"type": "string"},
        ),
    ]
}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_VARY = (b"vary", b"Accept")
# Encoded windows, kept because a window is fetched by every rank of a job, and at many groups
# its encoding costs more than the lookup: bytes by (run, created_at, version, start, count,
# encoding), least recently used first out, within a byte budget per app.
_ENCODED_MAX_BYTES = 64 * 1024 * 1024
_ENCODED_MAX_ENTRY = 16 * 1024 * 1024


def _encoded_windows(request: Request) -> BytesLRU[bytes]:
    state = request.app.state
    cache = getattr(state, "lr_encoded_windows", None)
    if cache is None:
        cache = state.lr_encoded_windows = BytesLRU[bytes](_ENCODED_MAX_BYTES, _ENCODED_MAX_ENTRY)
        watch_cache("encoded_windows", cache)
    return cache


@hot
@router.get(
    "/runs/{run_id}/lr",
    summary="Hyperparameters per group at a step (?step=N) or for a window (?start=N&count=K)",
    response_model=StepValuesOut | WindowOut,
    responses=problems(304, 401, 404, 422, 503),
    openapi_extra=_OPENAPI,
)
async def get_lr(request: Request) -> Response:
    run_id = path_run_id(request)
    query = request.query_params
    step = _int_param(query, "step", 0, MAX_STEP - 1)
    start = _int_param(query, "start", 0, MAX_STEP - 1)
    count = _int_param(query, "count", 1, MAX_WINDOW)
    if step is not None and (start is not None or count is not None):
        raise validation_error(["query", "step"], "give either step or start/count, not both")
    if count is not None and start is None:
        raise validation_error(["query", "start"], "count needs start")
    if start is not None and start + (count or 1) > MAX_STEP:
        raise validation_error(["query", "count"], f"start + count must be at most {MAX_STEP}")
    lease = query.get("lease")
    if lease is not None and lease.lower() not in _BOOLEANS:
        raise validation_error(["query", "lease"], "must be true or false")
    runs = await get_runs(request)
    # One cheap indexed read decides everything: (version, created_at) identifies the run's
    # content, so values computed for the same key are exact (runs' cache saves recomputing).
    current = await runs.version(run_id)
    if etag_matches(request.headers.get("if-none-match"), current.version, current.created_at):
        # The trainer keeps the values it has: nothing new is handed out, nothing leased.
        return Response(
            status_code=304,
            headers={"ETag": etag(current.version, current.created_at), "Vary": "Accept"},
        )
    at = step if step is not None else (current.step or 0)
    if lease is None or _BOOLEANS[lease.lower()]:
        # Leased before they are computed: a change committed before the lease is in the
        # version it returns; none after it can start before the window's end.
        first = at if start is None else start
        current, count = await runs.lease(
            run_id, current, first, 1 if start is None else count or 1
        )
    if start is None:
        one = await runs.values_at(run_id, at, current)
        version = one.version
        return JsonBytesResponse(
            json_bytes({"run": run_id, "step": at, "version": version, "groups": one.groups}),
            [
                (b"etag", etag(version, current.created_at).encode()),
                (b"cache-control", b"no-cache"),
            ],
        )
    window = await runs.window(run_id, start, count or 1, current)
    version = window.version
    binary = wants_binary(request.headers.get("accept"))
    cache = _encoded_windows(request)
    key = (run_id, current.created_at, version, start, window.count, binary)
    cached = cache.get(key)
    if cached is not None:
        body = cached
    else:
        large = window.count * len(window.values) > LARGE_ANSWER_VALUES
        if binary:
            args = (run_id, start, window.count, version, window.values)
            # Up to MAX_WINDOW_VALUES values: large ones off the event loop.
            body = await heavy(encode_window, *args) if large else encode_window(*args)
        else:
            answer = {
                "run": run_id,
                "start": start,
                "count": window.count,
                "version": version,
                "groups": window.values,
            }
            # Up to MAX_WINDOW_VALUES values (a second of encoding): off the event loop.
            body = await heavy(json_with_groups, answer) if large else json_with_groups(answer)
        cache.put(key, body, len(body))
    headers = [
        (b"etag", etag(version, current.created_at).encode()),
        (b"cache-control", b"no-cache"),
        _VARY,
    ]
    if binary:
        return Response(
            body,
            media_type=MEDIA_TYPE,
            headers={k.decode(): v.decode() for k, v in headers},
        )
    return JsonBytesResponse(body, headers)
