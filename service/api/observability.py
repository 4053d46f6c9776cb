"""Prometheus metrics and structured (one JSON object per line) logging."""

from __future__ import annotations

import json
import logging
import sys
import time

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


def observe_request(method: str, path: str, status: int, duration: float) -> None:
    REQUESTS.labels(method, path, str(status)).inc()
    LATENCY.labels(method, path).observe(duration)


def metrics_text() -> bytes:
    return generate_latest()


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...}``; messages that are JSON objects are merged."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
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
