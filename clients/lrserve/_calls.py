"""Every endpoint of the wire contract as a :class:`~lrserve._transport.Call` builder.

Argument checking happens here, once, for both clients.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast
from zlib import error as zlib_error

import httpx

from ._codec import ACCEPT, MEDIA_TYPE, DecodedWindow, binary_supported, decode_window
from ._codec import window_from_json as window_from_json
from ._config import check_run_id
from ._errors import LRServeError, UsageError
from ._metrics import encode_metric
from ._transport import Call, error_from_response, json_body
from ._types import (
    CreateRunResult,
    Curve,
    EventList,
    LRValues,
    LRWindow,
    MetricHistory,
    MetricNames,
    Preview,
    RangeTestResult,
    ReportResult,
    Run,
    RunList,
)

T = TypeVar("T")

# Keys of a run body that are not part of a schedule preview (see preview()).
_RUN_ONLY_KEYS = ("world_size", "aggregate", "metadata")
# Long-poll answers may legitimately take `wait` seconds; leave room for the rest.
_WAIT_SLACK = 10.0


def _run_path(run_id: str, suffix: str = "") -> str:
    return f"/v1/runs/{check_run_id(run_id)}{suffix}"


def _nonneg_int(name: str, value: int | None, *, allow_none: bool = True) -> int | None:
    if value is None:
        if allow_none:
            return None
        raise UsageError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UsageError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _dict(response: httpx.Response) -> Any:
    return json_body(response)


def create_run(run_id: str, spec: Mapping[str, Any]) -> Call[CreateRunResult]:
    """``PUT /v1/runs/{id}``; idempotent for an identical spec."""
    if not isinstance(spec, Mapping):
        raise UsageError(f"spec must be a mapping (the run body), got {type(spec).__name__}")
    return Call(
        "PUT",
        _run_path(run_id),
        parse=lambda r: CreateRunResult(cast(Run, json_body(r)), r.status_code == 201),
        json=dict(spec),
    )


def get_run(run_id: str) -> Call[Run]:
    """``GET /v1/runs/{id}``."""
    return Call("GET", _run_path(run_id), parse=_dict)


_SORTS = ("id", "-id", "created", "-created", "updated", "-updated", "step", "-step")
_STATUSES = ("running", "idle", "finished")


def list_runs(
    limit: int | None = None,
    cursor: str | None = None,
    *,
    status: str | Sequence[str] | None = None,
    search: str | None = None,
    tags: Sequence[str] = (),
    sort: str | None = None,
) -> Call[RunList]:
    """``GET /v1/runs?limit=&cursor=&status=&q=&tag=&sort=``."""
    if limit is not None and (_nonneg_int("limit", limit) or 0) < 1:
        raise UsageError("limit must be at least 1")
    statuses = [status] if isinstance(status, str) else list(status or [])
    for s in statuses:
        if s not in _STATUSES:
            raise UsageError(f"status must be one of {', '.join(_STATUSES)}, got {s!r}")
    if sort is not None and sort not in _SORTS:
        raise UsageError(f"sort must be one of {', '.join(_SORTS)}, got {sort!r}")
    if isinstance(tags, str):
        tags = [tags]
    params: dict[str, Any] = {"limit": limit, "cursor": cursor, "q": search or None, "sort": sort}
    if statuses:
        params["status"] = ",".join(statuses)
    if tags:
        params["tag"] = list(tags)
    return Call("GET", "/v1/runs", parse=_dict, params=params)


def heartbeat(
    run_id: str, step: int | None = None, finished: bool = False, rank: int = 0
) -> Call[None]:
    """``POST /v1/runs/{id}/heartbeat`` (204): the trainer is alive, or with ``finished``
    done; it changes no value and no ``version``, so repeating it is harmless."""
    body: dict[str, Any] = {
        "rank": _nonneg_int("rank", rank, allow_none=False),
        "finished": bool(finished),
    }
    if step is not None:
        body["step"] = _nonneg_int("step", step)
    return Call("POST", _run_path(run_id, "/heartbeat"), parse=lambda r: None, json=body)


def delete_run(run_id: str, missing_ok: bool = False) -> Call[None]:
    """``DELETE /v1/runs/{id}``."""

    def parse(response: httpx.Response) -> None:
        if response.status_code == 404:
            error = error_from_response(response)
            # Only a missing *run* is fine; a 404 for the path means a wrong base URL.
            if error.slug != "run-not-found":
                raise error
        return None

    return Call(
        "DELETE",
        _run_path(run_id),
        parse=parse,
        accept=frozenset({404}) if missing_ok else frozenset(),
    )


def _lease(lease: bool) -> str | None:
    # Trainers lease what they fetch (the default, left out); an inspection read does not.
    return None if lease else "false"


def get_lr(run_id: str, step: int | None = None, *, lease: bool = True) -> Call[LRValues]:
    """``GET /v1/runs/{id}/lr?step=N`` (``lease=False``: an inspection read)."""
    return Call(
        "GET",
        _run_path(run_id, "/lr"),
        parse=_dict,
        params={"step": _nonneg_int("step", step), "lease": _lease(lease)},
    )


def _etag_version(etag: str) -> int | None:
    """The run version in an ETag: ``"7"``, or ``"7-1a2b3c4d"`` (version and a tag of the
    run's creation time)."""
    tag = etag.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    try:
        return int(tag.strip('"').split("-", 1)[0])
    except ValueError:
        return None


def _window_headers(etag: str | None, binary: bool) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    if etag:
        headers["If-None-Match"] = etag if etag.startswith(('"', "W/")) else f'"{etag}"'
    if binary:
        headers["Accept"] = ACCEPT
    return headers or None


def _window_call(
    run_id: str,
    start: int,
    count: int,
    etag: str | None,
    lease: bool,
    binary: bool | None,
    parse: Callable[[httpx.Response, int, int, dict[str, str] | None], T],
) -> Call[T]:
    start_ = cast(int, _nonneg_int("start", start, allow_none=False))
    count_ = cast(int, _nonneg_int("count", count, allow_none=False))
    if not count_:
        raise UsageError("count must be at least 1")
    # Binary whenever numpy is there to decode it; a server without the encoding answers
    # JSON (the Accept names it too), and parse() goes by the answer's content type.
    headers = _window_headers(etag, binary_supported() if binary is None else binary)
    return Call(
        "GET",
        _run_path(run_id, "/lr"),
        parse=lambda r: parse(r, start_, count_, headers),
        params={"start": start_, "count": count_, "lease": _lease(lease)},
        headers=headers,
        accept=frozenset({304}),
    )


def _not_modified(
    response: httpx.Response, run_id: str, start: int, count: int, headers: Any
) -> LRWindow:
    tag = response.headers.get("ETag") or headers["If-None-Match"]
    version = _etag_version(tag)
    return LRWindow(
        run=run_id,
        start=start,
        count=count,
        version=version if version is not None else -1,
        etag=tag,
        not_modified=True,
        values=None,
    )


def _is_binary(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "")
    return kind.split(";", 1)[0].strip().lower() == MEDIA_TYPE


def _decoded(response: httpx.Response) -> DecodedWindow:
    try:
        return decode_window(response.content)
    except (ValueError, KeyError, TypeError, zlib_error) as exc:
        raise LRServeError(
            f"GET {response.request.url.path}: the binary window could not be decoded: {exc}"
        ) from None


def get_lr_window(
    run_id: str,
    start: int,
    count: int,
    etag: str | None = None,
    *,
    lease: bool = True,
    binary: bool | None = None,
) -> Call[LRWindow]:
    """``GET /v1/runs/{id}/lr?start=&count=`` with ``If-None-Match``.

    A trainer's fetch leases the window (``lease=False``: an inspection read, see API.md).
    ``binary`` (default: when numpy is importable) asks for the compact binary encoding;
    the values come back as lists either way."""

    def parse(
        response: httpx.Response, start_: int, count_: int, headers: dict[str, str] | None
    ) -> LRWindow:
        if response.status_code == 304:
            return _not_modified(response, run_id, start_, count_, headers)
        if _is_binary(response):
            w = _decoded(response)
            version = w.version
            return LRWindow(
                run=w.run,
                start=w.start,
                count=w.count,
                version=version,
                etag=response.headers.get("ETag") or f'"{version}"',
                not_modified=False,
                values=w.columns(),
            )
        body = json_body(response)
        version = int(body["version"])
        return LRWindow(
            run=body.get("run", run_id),
            start=int(body.get("start", start_)),
            count=int(body.get("count", count_)),
            version=version,
            etag=response.headers.get("ETag") or f'"{version}"',
            not_modified=False,
            values=body["groups"],
        )

    return _window_call(run_id, start, count, etag, lease, binary, parse)


def get_lr_window_arrays(
    run_id: str,
    start: int,
    count: int,
    etag: str | None = None,
    *,
    lease: bool = True,
    binary: bool = True,
) -> Call[tuple[LRWindow, DecodedWindow | None]]:
    """:func:`get_lr_window` for the schedulers: the values as one ``count x series``
    float64 array (:class:`DecodedWindow`, needs numpy), never as lists; ``None`` with a 304.
    """

    def parse(
        response: httpx.Response, start_: int, count_: int, headers: dict[str, str] | None
    ) -> tuple[LRWindow, DecodedWindow | None]:
        if response.status_code == 304:
            return _not_modified(response, run_id, start_, count_, headers), None
        if _is_binary(response):
            w = _decoded(response)
        else:
            w = window_from_json(json_body(response), run_id, start_, count_)
        meta = LRWindow(
            run=w.run,
            start=w.start,
            count=w.count,
            version=w.version,
            etag=response.headers.get("ETag") or f'"{w.version}"',
            not_modified=False,
            values=None,
        )
        return meta, w

    return _window_call(run_id, start, count, etag, lease, binary, parse)


def report(
    run_id: str,
    step: int,
    values: Mapping[str, Any],
    rank: int = 0,
    wait: float | None = None,
) -> Call[ReportResult]:
    """``POST /v1/runs/{id}/metrics?wait=``; idempotent by (step, rank)."""
    if not isinstance(values, Mapping):
        raise UsageError(f"values must be a mapping of metric name to number, got {values!r}")
    body = {
        "step": _nonneg_int("step", step, allow_none=False),
        "rank": _nonneg_int("rank", rank, allow_none=False),
        "values": {str(k): encode_metric(str(k), v) for k, v in values.items()},
    }
    if wait is not None and (not isinstance(wait, (int, float)) or not 0 <= wait <= 300):
        raise UsageError(f"wait must be between 0 and 300 seconds, got {wait!r}")
    return Call(
        "POST",
        _run_path(run_id, "/metrics"),
        parse=_dict,
        params={"wait": wait},
        json=body,
        min_read_timeout=None if wait is None else float(wait) + _WAIT_SLACK,
    )


def get_metrics(run_id: str, name: str) -> Call[MetricHistory]:
    """``GET /v1/runs/{id}/metrics?name=``."""
    if not name:
        raise UsageError("a metric name is required")
    return Call("GET", _run_path(run_id, "/metrics"), parse=_dict, params={"name": name})


def get_metric_names(run_id: str) -> Call[MetricNames]:
    """``GET /v1/runs/{id}/metrics``: the names of the metrics reported to the run."""
    return Call("GET", _run_path(run_id, "/metrics"), parse=_dict)


def get_events(run_id: str, after: int | None = None) -> Call[EventList]:
    """``GET /v1/runs/{id}/events?after=SEQ``."""
    return Call(
        "GET",
        _run_path(run_id, "/events"),
        parse=_dict,
        params={"after": _nonneg_int("after", after)},
    )


def range_test(run_id: str) -> Call[RangeTestResult]:
    """``GET /v1/runs/{id}/range-test``."""
    return Call("GET", _run_path(run_id, "/range-test"), parse=_dict)


def get_curve(
    run_id: str, start: int | None = None, stop: int | None = None, points: int | None = None
) -> Call[Curve]:
    """``GET /v1/runs/{id}/curve?start=&stop=&points=``."""
    return Call(
        "GET",
        _run_path(run_id, "/curve"),
        parse=_dict,
        params={
            "start": _nonneg_int("start", start),
            "stop": _nonneg_int("stop", stop),
            "points": _nonneg_int("points", points),
        },
    )


def preview(
    spec: Mapping[str, Any],
    start: int = 0,
    count: int | None = None,
    *,
    stop: int | None = None,
    points: int | None = None,
) -> Call[Preview]:
    """``POST /v1/schedules/preview``; a whole run body is accepted too."""
    if not isinstance(spec, Mapping):
        raise UsageError(f"spec must be a mapping, got {type(spec).__name__}")
    # A run body is the natural thing to have at hand; its run-only keys are dropped,
    # anything else (typos included) goes to the server to be validated.
    body = {k: v for k, v in spec.items() if k not in _RUN_ONLY_KEYS}
    body["start"] = _nonneg_int("start", start, allow_none=False)
    for key, value in (("count", count), ("stop", stop), ("points", points)):
        if value is not None:
            body[key] = _nonneg_int(key, value)
    return Call("POST", "/v1/schedules/preview", parse=_dict, json=body)


def override(
    run_id: str,
    from_step: int,
    action: str,
    value: float,
    groups: Sequence[str] | None = None,
    field: str = "lr",
    note: str | None = None,
) -> Call[Run]:
    """``POST /v1/runs/{id}/overrides``: NOT idempotent (see Call.idempotent)."""
    if action not in ("scale", "set"):
        raise UsageError(f"action must be 'scale' or 'set', got {action!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"value must be a finite number, got {value!r}")
    if isinstance(groups, str):
        raise UsageError("groups must be a list of group names, not a string")
    body: dict[str, Any] = {
        "from_step": _nonneg_int("from_step", from_step, allow_none=False),
        "action": action,
        "value": float(value),
        "field": field,
    }
    if groups is not None:
        body["groups"] = list(groups)
    if note is not None:
        body["note"] = note
    return Call("POST", _run_path(run_id, "/overrides"), parse=_dict, json=body, idempotent=False)


def withdraw_override(run_id: str, n: int, from_step: int | None = None) -> Call[Run]:
    """``DELETE /v1/runs/{id}/overrides/{n}?from_step=``."""
    number = _nonneg_int("n", n, allow_none=False)
    if not number:
        raise UsageError("override numbers start at 1")
    return Call(
        "DELETE",
        _run_path(run_id, f"/overrides/{number}"),
        parse=_dict,
        params={"from_step": _nonneg_int("from_step", from_step)},
        # Withdrawing twice is refused (422), so a retry after a lost answer would fail.
        idempotent=False,
    )


def amend(
    run_id: str,
    from_step: int,
    schedule: Mapping[str, Any] | None = None,
    *,
    group_schedules: Mapping[str, Any] | None = None,
    param_schedules: Mapping[str, Any] | None = None,
    restart: bool = False,
    base: str = "initial",
    note: str = "",
) -> Call[CreateRunResult]:
    """``POST /v1/runs/{id}/amendments``; idempotent (the same amendment again is a 200)."""
    if schedule is None and not group_schedules and not param_schedules:
        raise UsageError("give schedule, group_schedules or param_schedules")
    if base not in ("initial", "current"):
        raise UsageError(f"base must be 'initial' or 'current', got {base!r}")
    body: dict[str, Any] = {
        "from_step": _nonneg_int("from_step", from_step, allow_none=False),
        "restart": bool(restart),
        "base": base,
        "note": note,
    }
    for key, part in (
        ("schedule", schedule),
        ("group_schedules", group_schedules),
        ("param_schedules", param_schedules),
    ):
        if part is not None:
            if not isinstance(part, Mapping):
                raise UsageError(f"{key} must be a mapping, got {type(part).__name__}")
            body[key] = dict(part)
    return Call(
        "POST",
        _run_path(run_id, "/amendments"),
        parse=lambda r: CreateRunResult(cast(Run, json_body(r)), r.status_code == 201),
        json=body,
    )


def rewind(run_id: str, to_step: int, key: str | None = None, note: str = "") -> Call[Run]:
    """``POST /v1/runs/{id}/rewind``; idempotent when ``key`` is given."""
    body: dict[str, Any] = {"to_step": _nonneg_int("to_step", to_step, allow_none=False)}
    if key is not None:
        body["key"] = str(key)
    if note:
        body["note"] = note
    return Call(
        "POST", _run_path(run_id, "/rewind"), parse=_dict, json=body, idempotent=key is not None
    )


def _probe(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"status": response.text.strip() or "ok"}
    return body if isinstance(body, dict) else {"status": body}


def healthz() -> Call[dict[str, Any]]:
    """``GET /healthz``."""
    return Call("GET", "/healthz", parse=_probe)


def readyz() -> Call[dict[str, Any]]:
    """``GET /readyz``; a 503 is reported at once, not retried."""
    return Call("GET", "/readyz", parse=_probe, retry_status=False)
