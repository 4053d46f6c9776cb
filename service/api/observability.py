"""Prometheus metrics and structured (one JSON object per line) logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.runs.values import BytesLRU

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
STREAMS_OPEN = Gauge("lrserve_streams_open", "Open GET .../stream connections (server-sent events)")
STREAM_POLLS = Counter("lrserve_stream_polls_total", "Point reads made by open streams")
WAITING_REPORTS = Gauge(
    "lrserve_report_waits", "Reports holding their answer (?wait=) until their step completes"
)
ABANDONED_WAITS = Counter(
    "lrserve_report_waits_abandoned_total",
    "Waiting reports whose client went away before the step completed (the wait ended then)",
)

DELIVERED_ANSWERS = Counter(
    "lrserve_report_waits_delivered_total",
    "Waiting reports answered by their step's completion in the same process, written at "
    "once in one pass (the others are answered as their wait ends)",
)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

# -- caches -----------------------------------------------------------------------------------
# Read at scrape time, not counted on the hot path: BytesLRU keeps its own counters.
_CACHES: dict[str, weakref.ref[BytesLRU[Any]]] = {}


def watch_cache(name: str, cache: BytesLRU[Any]) -> None:
    """Export ``cache`` as ``lrserve_cache_*{cache="<name>"}`` (the latest cache of a name:
    an app built again, as tests do, replaces its caches; a collected one is dropped)."""
    _CACHES[name] = weakref.ref(cache)


class _CacheCollector(Collector):
    """Hits, misses, evictions, bytes held, budget and entries of each watched cache: what
    sizing ``LRSERVE_CACHE_BYTES`` and ``LRSERVE_COMPILE_CACHE_BYTES`` needs (a hit ratio
    that falls as runs are added says the budget holds fewer runs than are active)."""

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "hits": CounterMetricFamily(
                "lrserve_cache_hits", "Cache lookups that found their entry", labels=["cache"]
            ),
            "misses": CounterMetricFamily(
                "lrserve_cache_misses",
                "Cache lookups that did not (the entry was then computed)",
                labels=["cache"],
            ),
            "evictions": CounterMetricFamily(
                "lrserve_cache_evictions",
                "Entries evicted, least recently used first, to stay within the budget",
                labels=["cache"],
            ),
            "size_bytes": GaugeMetricFamily(
                "lrserve_cache_bytes", "Bytes the cache holds (its estimate)", labels=["cache"]
            ),
            "max_bytes": GaugeMetricFamily(
                "lrserve_cache_max_bytes", "The cache's budget in bytes", labels=["cache"]
            ),
            "entries": GaugeMetricFamily(
                "lrserve_cache_entries", "Entries the cache holds", labels=["cache"]
            ),
        }
        for name, ref in sorted(_CACHES.items()):
            cache = ref()
            if cache is None:
                continue
            figures = {
                "hits": cache.hits,
                "misses": cache.misses,
                "evictions": cache.evictions,
                "size_bytes": cache.size_bytes,
                "max_bytes": cache.max_bytes,
                "entries": len(cache),
            }
            for key, family in families.items():
                family.add_metric([name], figures[key])
        yield from families.values()


REGISTRY.register(_CacheCollector())


# -- scan checkpoints -------------------------------------------------------------------------
_SCANS: list[weakref.ref[Any]] = []


def watch_scans(scans: Any) -> None:
    """Export a :class:`~service.runs.checkpoints.StoredScans`'s counters (the latest one)."""
    _SCANS[:] = [weakref.ref(scans)]


class _ScanCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        scans = _SCANS[0]() if _SCANS else None
        figures = {
            "loaded": (
                "Reads of stored scan checkpoints that found some: a scan resuming from the "
                "database after a restart or another replica's work (unless their state differs)"
            ),
            "saved": "Scan checkpoints written to the database",
            "dropped": "Scan checkpoints not written (the database failed, or too many pending)",
        }
        for key, text in figures.items():
            family = CounterMetricFamily(f"lrserve_scan_checkpoints_{key}", text)
            family.add_metric([], getattr(scans, key, 0))
            yield family


REGISTRY.register(_ScanCollector())


# labels() costs a lock and a few microseconds per call: keep the labelled children. Keys are
# bounded: path is a route template (or "<unmatched>"), never the raw path.
_children: dict[tuple[str, str, int], tuple[Any, Any, bytes]] = {}
_MAX_CHILDREN = 10_000


def _child(method: str, path: str, status: int) -> tuple[Any, Any, bytes]:
    key = (method, path, status)
    child = _children.get(key)
    if child is None:
        # The constant middle of the access line, JSON-encoded once per (method, path, status).
        middle = json.dumps(
            {
                "level": "info",
                "logger": "lrserve.access",
                "event": "request",
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": 0,
            }
        )
        middle = middle[1 : middle.rindex("0")]  # '"level": ..., "duration_ms": '
        child = (
            REQUESTS.labels(method, path, str(status)),
            LATENCY.labels(method, path),
            middle.encode(),
        )
        if len(_children) < _MAX_CHILDREN:
            _children[key] = child
    return child


def observe_request(
    method: str, path: str, status: int, duration: float, log: bool = False
) -> None:
    """Count one answered request (Prometheus) and, with ``log``, write its access line."""
    child = _child(method, path, status)
    child[0].inc()
    child[1].observe(duration)
    if log:
        _write_access_line(child[2], duration)


class _Reporter:
    """A labelled counter whose children are looked up once per label value."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[str, Any] = {}

    def inc(self, label: str) -> None:
        child = self._children.get(label)
        if child is None:
            child = self._children[label] = self._counter.labels(label)
        child.inc()


REPORT_OUTCOMES = _Reporter(REPORTS)
"""``REPORT_OUTCOMES.inc("new" | "duplicate" | "refused")``."""
DECISION_OUTCOMES = _Reporter(DECISIONS)
"""``DECISION_OUTCOMES.inc("true" | "false")``."""


def metrics_text() -> bytes:
    return generate_latest()


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created * 1000) % 1000:03d}Z"
    )


# The access line's timestamp up to the second, formatted once per second (not per request).
_second: list[Any] = [-1, b""]


def _write_access_line(middle: bytes, duration: float) -> None:
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0] = second
        _second[1] = ('{"ts": "' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))).encode()
    line = b'%s.%03dZ", %s%s}\n' % (
        _second[1],
        int(now * 1000) % 1000,
        middle,
        repr(round(duration * 1000, 3)).encode(),
    )
    with contextlib.suppress(OSError):  # stderr closed: logging must never fail a request
        os.write(2, line)


def access_line(method: str, path: str, status: int, duration: float) -> None:
    """The per-request log line, written straight to stderr.

    Same JSON shape as every other log line, without the logging module's per-record
    machinery (which cost a fifth of a GET's CPU): one ``write`` of one preformatted line
    (only the timestamp and the duration are formatted per request), so lines from several
    workers never interleave. Only the route template is logged, never the query, headers or
    body, so never a token.
    """
    _write_access_line(_child(method, path, status)[2], duration)


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
