"""``GET /v1/runs/{id}/stream``: a run's changes as server-sent events, for the web page.

One connection costs one point read of the run (``Runs.pulse``: its version and status
columns, by primary key) every ``stream_poll_seconds`` (1 s by default, never more often),
wherever the change was made: another worker, another replica. Events:

- ``run``, data ``{"version", "step", "completed_step", "status", "branch"}``: on connect, and
  whenever one of those changes (a report, override, amendment, rewind; a heartbeat or the
  passing of time changing the status);
- ``deleted``: the run is gone (or was deleted and created again), then the stream ends;
- a ``: keep-alive`` comment after ``stream_keepalive_seconds`` (15 s) without an event, so
  proxies keep the connection open.

The browser's ``EventSource`` cannot send an ``Authorization`` header, so this route alone
also takes the token as ``?token=`` (``service/api/auth.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from service.api import observability
from service.api.common import RunId
from service.api.deps import get_runs, settings_of
from service.api.schemas import problems
from service.runs.errors import RunNotFound
from service.runs.service import RunPulse, Runs

router = APIRouter(prefix="/v1", tags=["runs"])


def _state(runs: Runs, pulse: RunPulse) -> dict[str, Any]:
    return {
        "version": pulse.version,
        "step": pulse.step,
        "completed_step": pulse.completed_step,
        "status": runs.status(pulse),
        "branch": pulse.branch,
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(
    request: Request, runs: Runs, run_id: str, first: RunPulse, poll: float, keepalive: float
) -> AsyncIterator[bytes]:
    observability.STREAMS_OPEN.inc()
    try:
        # Tell EventSource to reconnect after 2 s if the connection drops.
        yield b"retry: 2000\n\n"
        pulse: RunPulse | None = first
        sent: dict[str, Any] | None = None
        quiet_since = time.monotonic()
        while True:
            if pulse is None or pulse.created_at != first.created_at:
                yield _event("deleted", {"run": run_id})
                return
            state = _state(runs, pulse)
            if state != sent:
                yield _event("run", state)
                sent, quiet_since = state, time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            # Wait out the poll interval, looking for the client's disconnect meanwhile (under
            # ASGI 2.4 nothing else notices it until the next write fails).
            deadline = time.monotonic() + poll
            while (left := deadline - time.monotonic()) > 0:
                if await request.is_disconnected():
                    return
                await anyio.sleep(min(left, 0.25))
            if await request.is_disconnected():
                return
            observability.STREAM_POLLS.inc()
            pulse = await runs.pulse(run_id)
    finally:
        observability.STREAMS_OPEN.dec()


@router.get(
    "/runs/{run_id}/stream",
    summary="The run's changes as server-sent events (text/event-stream)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "events `run` (data: version, step, completed_step, status, "
            "branch) on connect and on every change, `deleted` at the end, `: keep-alive` "
            "comments",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **problems(401, 403, 404, 422, 503),
    },
)
async def stream(
    run_id: RunId,
    request: Request,
    runs: Annotated[Runs, Depends(get_runs)],
    token: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="the token, for clients that cannot send Authorization "
            "(EventSource); prefer the read-only token: URLs end up in proxy logs",
        ),
    ] = None,
) -> Response:
    del token  # checked by the auth dependency (service/api/auth.py)
    first = await runs.pulse(run_id)
    if first is None:
        raise RunNotFound(run_id)
    settings = settings_of(request)
    poll = max(1.0, settings.stream_poll_seconds)
    return StreamingResponse(
        _events(request, runs, run_id, first, poll, settings.stream_keepalive_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
