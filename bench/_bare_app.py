"""The reference for bench_http.py: bare FastAPI endpoints doing the least the same work needs.

- ``GET /v1/runs/{run_id}/lr?step=N``: warmup + cosine for two groups computed in closed form,
  returned through a pydantic response model of the same shape as lrserve's answer (and the same
  ``ETag`` header).
- ``POST /v1/runs/{run_id}/metrics``: a same-shaped body validated by pydantic, one row written to
  SQLite (WAL, autocommit, ``synchronous`` from ``BENCH_SYNC``, default NORMAL), and a same-shaped
  answer.

Both are ``async def`` and call sqlite3 directly on the event loop: the fastest arrangement measured
in the performance-ceilings research (the threadpool halves throughput on two cores).

Run: ``BENCH_DB=/tmp/bare.db uvicorn bench._bare_app:app --loop uvloop --http httptools``.
"""

from __future__ import annotations

import math
import os
import sqlite3
from typing import Literal

from fastapi import FastAPI, Query, Response
from pydantic import BaseModel, Field

# The run lrserve is given in the benchmark: warmup over 100 steps from 1 % of the base rate,
# then cosine to 1e-6 over 9,900 steps, on groups "backbone" (lr 1e-4, momentum 0.9) and "head".
_WARMUP = 100
_T_MAX = 9_900
_ETA_MIN = 1e-6
_GROUPS = (("backbone", 1e-4, 0.9), ("head", 1e-3, None))


def _lr(base: float, step: int) -> float:
    if step < _WARMUP:
        return base * (0.01 + 0.99 * step / _WARMUP)
    t = step - _WARMUP
    return _ETA_MIN + (base - _ETA_MIN) * (1 + math.cos(math.pi * t / _T_MAX)) / 2


def _groups(step: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, base, momentum in _GROUPS:
        fields = {"lr": _lr(base, step)}
        if momentum is not None:
            fields["momentum"] = momentum
        out[name] = fields
    return out


class LrResponse(BaseModel):
    run: str
    step: int
    version: int
    groups: dict[str, dict[str, float]]


class Report(BaseModel):
    step: int = Field(ge=0, le=2**53)
    rank: int = Field(default=0, ge=0, le=4095)
    values: dict[str, float | Literal["NaN", "Infinity", "-Infinity"] | None]


class Decision(BaseModel):
    reduced: bool
    nodes: list[dict[str, object]]


class ReportResponse(BaseModel):
    run: str
    step: int
    rank: int
    complete: bool
    reported_ranks: int
    version: int
    decision: Decision | None
    applies_from: int
    groups: dict[str, dict[str, float]]


def _connect() -> sqlite3.Connection:
    db = sqlite3.connect(
        os.environ.get("BENCH_DB", "bare.db"), isolation_level=None, check_same_thread=False
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={os.environ.get('BENCH_SYNC', 'NORMAL')}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS reports (run TEXT, step INTEGER, rank INTEGER, body TEXT,"
        " PRIMARY KEY (run, step, rank))"
    )
    return db


_db = _connect()
app = FastAPI()


@app.get("/v1/runs/{run_id}/lr")
async def get_lr(run_id: str, response: Response, step: int = Query(0, ge=0)) -> LrResponse:
    response.headers["ETag"] = '"1"'
    return LrResponse(run=run_id, step=step, version=1, groups=_groups(step))


@app.post("/v1/runs/{run_id}/metrics")
async def post_metrics(run_id: str, report: Report) -> ReportResponse:
    # INSERT OR REPLACE: the benchmark never repeats a key, but a rerun on the same file must work.
    _db.execute(
        "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
        (run_id, report.step, report.rank, report.model_dump_json()),
    )
    return ReportResponse(
        run=run_id,
        step=report.step,
        rank=report.rank,
        complete=True,
        reported_ranks=1,
        version=report.step,
        decision=Decision(reduced=False, nodes=[]),
        applies_from=report.step + 1,
        groups=_groups(report.step + 1),
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
