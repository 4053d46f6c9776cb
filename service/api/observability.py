"""Prometheus metrics and structured (one JSON object per line) logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REQUESTS = Counter(
    "lrserve_http_requests_total", "HTTP requests answered", ["method", "path", "status"]
)
LATENCY = Histogram(
    "lrserve_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300),
)
REPORTS = Counter("lrserve_reports_total", "Metric reports received", ["outcome"])
DECISIONS = Counter("lrserve_decisions_total", "Completed steps decided", ["reduced"])

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


# labels() costs a lock and a few microseconds per call: keep the labelled children. Keys are
# bounded: path is a route template (or "<unmatched>"), never the raw path.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def observe_request(method: str, path: str, status: int, duration: float) -> None:
    key = (method, path, status)
    child = _children.get(key)
    if child is None:
        child = (REQUESTS.labels(method, path, str(status)), LATENCY.labels(method, path))
        if len(_children) < 10_000:
            _children[key] = child
    child[0].inc()
    child[1].observe(duration)


def metrics_text() -> bytes:
    return generate_latest()


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created * 1000) % 1000:03d}Z"
    )


def access_line(method: str, path: str, status: int, duration: float) -> None:
    """The per-request log line, written straight to stderr.

    Same JSON shape as every other log line, without the logging module's per-record
    machinery (which cost a fifth of a GET's CPU): one ``write`` of one line, so lines from
    several workers never interleave. Only the route template is logged, never the query,
    headers or body, so never a token.
    """
    line = json.dumps(
        {
            "ts": _timestamp(time.time()),
            "level": "info",
            "logger": "lrserve.access",
            "event": "request",
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000, 3),
        }
    )
    with contextlib.suppress(OSError):  # stderr closed: logging must never fail a request
        os.write(2, (line + "\n").encode())


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...}``; messages that are JSON objects are merged."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            # Structured call sites pass their fields directly: no JSON round trip.
            out.update(fields)
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            return json.dumps(out, default=str)
        message = record.getMessage()
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                out.update(parsed)
            else:
                out["msg"] = message
        else:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for lrserve's and uvicorn's loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    for name in ("lrserve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
