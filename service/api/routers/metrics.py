"""Metric reports (exactly once per (run, step, rank)) and metric history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.api import observability
from service.api.common import (
    RUN_ID_PATTERN,
    JsonBytesResponse,
    RunId,
    hot,
    json_body_openapi,
    json_bytes,
    json_response,
    param_doc,
    parse_json_body,
    path_run_id,
    query_number,
)
from service.api.deps import get_runs
from service.api.protocol import ANSWER_NOW, ANSWERED, DISCONNECTED
from service.api.schemas import MetricHistoryOut, MetricNamesOut, ReportIn, ReportOut, problems
from service.runs.service import Abandoned, Runs
from service.runs.views import MetricHistory, ReportOutcome

router = APIRouter(prefix="/v1", tags=["metrics"])


@hot
@router.post(
    "/runs/{run_id}/metrics",
    summary="Report metrics for (step, rank); the answer carries the values from step + 1",
    response_model=ReportOut,
    responses=problems(401, 403, 404, 409, 413, 415, 422, 503),
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
    runs = await get_runs(request)
    delivered = False
    try:
        if wait:
            outcome, delivered = await _report_and_wait(request, runs, run_id, body, wait)
        else:
            outcome = await runs.report(run_id, body.step, body.rank, body.values)
    except Exception:
        observability.REPORT_OUTCOMES.inc("refused")
        raise
    observability.REPORT_OUTCOMES.inc("duplicate" if outcome.duplicate else "new")
    if outcome.completed_now and outcome.decision is not None:
        observability.DECISION_OUTCOMES.inc("true" if outcome.decision.get("reduced") else "false")
    if delivered:
        return ALREADY_SENT
    return JsonBytesResponse(json_bytes(_report_body(run_id, outcome)))


def _report_body(run_id: str, outcome: ReportOutcome) -> dict[str, Any]:
    return {
        "run": run_id,
        "step": outcome.step,
        "rank": outcome.rank,
        "complete": outcome.complete,
        "reported_ranks": outcome.reported_ranks,
        "version": outcome.version,
        "values_version": outcome.values_version,
        "decision": outcome.decision,
        "applies_from": outcome.step + 1,
        "groups": outcome.groups,
        "stop": outcome.stop,
    }


class _AlreadySent(Response):
    """The answer of a request whose answer was written already (``ANSWER_NOW``): nothing."""

    def __init__(self) -> None:
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


ALREADY_SENT = _AlreadySent()


async def _report_and_wait(
    request: Request, runs: Runs, run_id: str, body: ReportIn, wait: float
) -> tuple[ReportOutcome, bool]:
    """``runs.report`` with a wait that ends when the client disconnects (an abandoned wait
    would otherwise poll the database until its deadline: 300 of them cost a quarter of a
    core), counted in ``lrserve_report_waits`` and ``..._abandoned_total``; and whether the
    answer was delivered already, written by the protocol's ``ANSWER_NOW`` when the step's
    completion in this process handed it over (see ``Runs.report``)."""
    gone = False
    disconnected: Callable[[], bool] | None = request.scope.get(DISCONNECTED)
    abandoned: Abandoned
    if disconnected is not None:
        # The protocol's flag: the run's ticker asks it without waking the wait.
        def abandoned() -> bool:
            nonlocal gone
            gone = disconnected()
            return gone
    else:

        async def abandoned() -> bool:
            nonlocal gone
            gone = await request.is_disconnected()
            return gone

    answer_now: Callable[[bytes], bool] | None = request.scope.get(ANSWER_NOW)
    deliver = None
    if answer_now is not None:

        def deliver(outcome: ReportOutcome) -> bool:
            if not answer_now(json_bytes(_report_body(run_id, outcome))):
                return False
            observability.DELIVERED_ANSWERS.inc()
            return True

    observability.WAITING_REPORTS.inc()
    try:
        outcome = await runs.report(
            run_id, body.step, body.rank, body.values, wait, abandoned, deliver
        )
    finally:
        observability.WAITING_REPORTS.dec()
        if gone:
            observability.ABANDONED_WAITS.inc()
    return outcome, request.scope.get(ANSWERED) is not None


MAX_HISTORY_STEPS = 100_000


@router.get(
    "/runs/{run_id}/metrics",
    summary="The names of the metrics reported, or the history of one (per report and "
    "aggregated), a window of steps at a time",
    response_model=MetricHistoryOut | MetricNamesOut,
    responses=problems(401, 404, 422, 503),
)
async def get_metrics(
    run_id: RunId,
    runs: Annotated[Runs, Depends(get_runs)],
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            description="the metric; without it the answer lists the names reported",
        ),
    ] = None,
    after_step: Annotated[
        int | None,
        Query(ge=-1, description="only steps after this one (exclusive): the live tail"),
    ] = None,
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_HISTORY_STEPS,
            description="at most this many reported steps (every rank's point of a step "
            "together); next_after_step continues",
        ),
    ] = 10_000,
) -> Response:
    if name is None:
        return json_response({"run": run_id, "names": await runs.metric_names(run_id)})
    # Read, build and encode the page in a worker thread: none of it on the event loop.
    body = await runs.metric_history_rendered(
        run_id, name, -1 if after_step is None else after_step, limit, _history_document
    )
    return JsonBytesResponse(body)


def _history_document(history: MetricHistory) -> bytes:
    """The JSON answer of ``GET /v1/runs/{id}/metrics?name=`` for one page of history."""
    return json_bytes(
        {
            "run": history.run_id,
            "name": history.name,
            "next_after_step": history.next_after_step,
            "points": [
                {"step": p.step, "rank": p.rank, "value": p.value, "branch": p.branch}
                for p in history.points
            ],
            "aggregate": [{"step": s, "value": v, "branch": b} for s, v, b in history.aggregate],
            "abandoned": [
                {
                    "step": p.step,
                    "rank": p.rank,
                    "value": p.value,
                    "branch": p.branch,
                    "abandoned_by": p.abandoned_by,
                }
                for p in history.abandoned
            ],
        }
    )
