"""Hostile input over HTTP: every bad request is a 4xx problem+json that names the problem, and
nothing stored changes.

The battery runs against a real server on a SQLite file; a representative subset runs on
PostgreSQL too. A "victim" run with reports is created once per server. Each case sends one
request and then checks the answer (status, ``application/problem+json``, a ``detail`` or
``errors`` naming the problem) and that the victim's run, events, metric history and the run list
read back exactly as before (a request aimed at a new id must not create it). Hypothesis then
throws generated junk JSON at ``PUT`` run and ``POST`` metrics.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, postgres_database, start_server

VICTIM = "victim"
JUNK = "junk"  # generated reports go here: a valid one moves its steps on, never the victim's
PROBLEM = "application/problem+json"
PWNED = Path("/tmp/lrserve-hostile-pwned")

SPEC: dict[str, Any] = {
    "groups": [
        {"name": "backbone", "lr": 0.0001, "momentum": 0.9},
        {"name": "head", "lr": 0.001},
    ],
    "schedule": {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.01, "total_iters": 50},
            {"type": "CosineAnnealingLR", "T_max": 950, "eta_min": 1e-6},
        ],
        "milestones": [50],
    },
    "group_schedules": {
        "head": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0, "factor": 0.5}
    },
    "world_size": 1,
    "metadata": {"model": "resnet50"},
}


def spec_with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """SPEC with the item at ``path`` replaced (or added)."""
    body = copy.deepcopy(SPEC)
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


def raw_spec(lr_literal: str) -> bytes:
    """SPEC as text with the first group's lr written verbatim (for non-JSON literals)."""
    text = json.dumps(spec_with(("groups", 0, "lr"), "LR"))
    return text.replace('"LR"', lr_literal).encode()


def nested_sequential(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "StepLR", "step_size": 10}
    for _ in range(depth):
        node = {"type": "SequentialLR", "schedulers": [node], "milestones": []}
    return node


@dataclass
class Case:
    """One hostile request and what its answer must say."""

    id: str
    method: str
    path: str
    body: Any = None
    """dict/list -> JSON; bytes -> sent verbatim as application/json; None -> no body."""
    status: tuple[int, ...] = (422,)
    names: tuple[str, ...] = ()
    """At least one of these (case-insensitive) must appear in detail or errors."""
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    postgres: bool = False
    """Also run it on PostgreSQL."""


NEW = "/v1/runs/newcomer"  # must still not exist after every case
METRICS = f"/v1/runs/{VICTIM}/metrics"
LAMBDA_CODE = [
    "__import__('os').system('touch /tmp/lrserve-hostile-pwned')",
    "open('/tmp/lrserve-hostile-pwned', 'w')",
    "epoch.__class__.__mro__",
    "(lambda: 1)()",
    "[x for x in (1, 2)][0]",
    "globals()",
    "9 ** 9 ** 9 ** 9",
    "epoch ** 1e9",
    "1 if epoch else",
    "epoch + " * 300 + "1",
]

CASES: list[Case] = [
    # --- malformed JSON and the wrong shapes -------------------------------------------------
    Case("put-not-json", "PUT", NEW, b'{"groups": [', (400, 422), ("json", "pars"), postgres=True),
    Case("put-empty-body", "PUT", NEW, b"", (400, 422), ("body", "json", "missing", "required")),
    Case("put-array", "PUT", NEW, [], (422,), ("dict", "object")),
    Case("put-string", "PUT", NEW, "groups", (422,), ("dict", "object")),
    Case(
        "put-bad-utf8", "PUT", NEW, b'{"groups": "\xff\xfe"}', (400, 422), ("pars", "utf", "json")
    ),
    Case(
        "put-text-plain",
        "PUT",
        NEW,
        json.dumps(SPEC).encode(),
        (415,),  # (every route alike: docs/operations.md, "HTTP limits and timeouts")
        ("media", "content"),
        headers={"Content-Type": "text/plain"},
    ),
    Case("put-unknown-field", "PUT", NEW, spec_with(("bogus",), 1), names=("bogus",)),
    Case("put-groups-string", "PUT", NEW, spec_with(("groups",), "abc"), names=("groups",)),
    Case("put-groups-empty", "PUT", NEW, spec_with(("groups",), []), names=("groups",)),
    Case("put-lr-string", "PUT", NEW, spec_with(("groups", 0, "lr"), "fast"), names=("lr",)),
    Case("put-lr-bool", "PUT", NEW, spec_with(("groups", 0, "lr"), [True]), names=("lr",)),
    Case(
        "put-group-name-missing", "PUT", NEW, spec_with(("groups", 1), {"lr": 0.1}), names=("name",)
    ),
    Case(
        "put-duplicate-groups",
        "PUT",
        NEW,
        spec_with(("groups", 1, "name"), "backbone"),
        names=("backbone", "unique", "twice", "duplicate"),
    ),
    # --- numbers: negative, huge, non-finite ------------------------------------------------
    Case("put-lr-negative", "PUT", NEW, spec_with(("groups", 0, "lr"), -0.1), names=("lr",)),
    Case("put-lr-nan-literal", "PUT", NEW, raw_spec("NaN"), names=("lr", "finite"), postgres=True),
    Case("put-lr-infinity-literal", "PUT", NEW, raw_spec("Infinity"), names=("lr", "finite")),
    Case("put-lr-minus-infinity", "PUT", NEW, raw_spec("-Infinity"), names=("lr", "finite")),
    Case("put-lr-overflow", "PUT", NEW, raw_spec("1e999"), names=("lr", "finite")),
    Case("put-lr-nan-string", "PUT", NEW, spec_with(("groups", 0, "lr"), "NaN"), names=("lr",)),
    Case(
        "put-lr-5000-digits", "PUT", NEW, raw_spec("1" * 5000), (400, 422), ("lr", "pars", "digit")
    ),
    Case("put-lr-huge-int", "PUT", NEW, spec_with(("groups", 0, "lr"), 10**400), names=("lr",)),
    Case(
        "put-tmax-huge-int",
        "PUT",
        NEW,
        spec_with(("schedule", "schedulers", 1, "T_max"), 10**400),
        names=("t_max",),
    ),
    Case(
        "put-tmax-negative",
        "PUT",
        NEW,
        spec_with(("schedule", "schedulers", 1, "T_max"), -5),
        names=("t_max",),
    ),
    Case(
        "put-tmax-2-64",
        "PUT",
        NEW,
        spec_with(("schedule", "schedulers", 1, "T_max"), 2**64),
        names=("t_max",),
        postgres=True,
    ),
    Case(
        "put-milestone-float",
        "PUT",
        NEW,
        spec_with(("schedule", "milestones"), [50.5]),
        names=("milestones",),
    ),
    Case("put-world-size-0", "PUT", NEW, spec_with(("world_size",), 0), names=("world_size",)),
    Case(
        "put-world-size-huge", "PUT", NEW, spec_with(("world_size",), 10**9), names=("world_size",)
    ),
    Case(
        "put-world-size-text", "PUT", NEW, spec_with(("world_size",), "four"), names=("world_size",)
    ),
    Case(
        "put-aggregate-median",
        "PUT",
        NEW,
        spec_with(("aggregate",), "median"),
        names=("aggregate",),
    ),
    # --- unknown types, nesting ---------------------------------------------------------------
    Case(
        "put-unknown-type",
        "PUT",
        NEW,
        spec_with(("schedule",), {"type": "FooLR"}),
        names=("foolr",),
        postgres=True,
    ),
    Case(
        "put-type-missing", "PUT", NEW, spec_with(("schedule",), {"step_size": 3}), names=("type",)
    ),
    Case(
        "put-type-number", "PUT", NEW, spec_with(("schedule",), {"type": 7}), names=("type", "tag")
    ),
    Case(
        "put-unknown-library",
        "PUT",
        NEW,
        spec_with(("schedule",), {"type": "evil.module.Schedule"}),
        names=("evil.module.schedule",),
    ),
    Case(
        "put-unknown-group-schedule",
        "PUT",
        NEW,
        spec_with(("group_schedules",), {"nope": {"type": "ConstantLR"}}),
        names=("nope",),
    ),
    Case(
        "put-nesting-20",
        "PUT",
        NEW,
        spec_with(("schedule",), nested_sequential(20)),
        names=("nest", "deep", "depth"),
        postgres=True,
    ),
    Case("put-json-depth-100000", "PUT", NEW, b"[" * 100_000, names=("nested", "deep", "depth")),
    Case(
        "put-metadata-depth",
        "PUT",
        NEW,
        spec_with(("metadata",), json.loads('{"a":' * 80 + "1" + "}" * 80)),
        names=("nested", "deep", "depth"),
    ),
    # --- oversized -----------------------------------------------------------------------------
    Case(
        "put-oversized",
        "PUT",
        NEW,
        spec_with(("metadata",), {"blob": "x" * 2_000_000}),
        (413,),
        ("exceeds", "large", "bytes"),
        postgres=True,
    ),
    Case(
        "put-many-groups",
        "PUT",
        NEW,
        spec_with(("groups",), [{"name": f"g{i}", "lr": 0.1} for i in range(20_000)]),
        (413, 422),
        ("groups", "exceeds", "large", "bytes", "at most"),
    ),
    # --- code in lr_lambda ---------------------------------------------------------------------
    *(
        Case(
            f"put-lr-lambda-{i}",
            "PUT",
            NEW,
            spec_with(("schedule",), {"type": "LambdaLR", "lr_lambda": code}),
            names=("lr_lambda",),
            postgres=i == 0,
        )
        for i, code in enumerate(LAMBDA_CODE)
    ),
    Case(
        "put-lr-lambda-not-a-string",
        "PUT",
        NEW,
        spec_with(("schedule",), {"type": "LambdaLR", "lr_lambda": {"code": "1"}}),
        names=("lr_lambda",),
    ),
    # --- run ids ---------------------------------------------------------------------------------
    Case(
        "put-bad-id", "PUT", "/v1/runs/bad%20id", SPEC, (404, 422), ("run_id", "pattern", "bad id")
    ),
    Case(
        "put-long-id",
        "PUT",
        "/v1/runs/" + "a" * 200,
        SPEC,
        (404, 422),
        ("run_id", "pattern", "aaaa"),
    ),
    Case(
        "put-dotdot-id",
        "PUT",
        "/v1/runs/..%2Fvictim",
        SPEC,
        (404, 422),
        ("run_id", "pattern", ".."),
    ),
    # --- the existing run -------------------------------------------------------------------------
    Case(
        "put-victim-other-body",
        "PUT",
        f"/v1/runs/{VICTIM}",
        spec_with(("groups", 0, "lr"), 0.5),
        (409,),
        ("exists", "different", "conflict", "other"),
        postgres=True,
    ),
    Case(
        "put-victim-invalid-body",
        "PUT",
        f"/v1/runs/{VICTIM}",
        spec_with(("groups", 0, "lr"), -1),
        (422,),
        ("lr",),
    ),
    Case("patch-victim", "PATCH", f"/v1/runs/{VICTIM}", SPEC, (405,), ("patch", "allowed")),
    # --- metric reports ---------------------------------------------------------------------------
    Case(
        "report-step-negative",
        "POST",
        METRICS,
        {"step": -1, "values": {"val_loss": 1}},
        names=("step",),
    ),
    Case(
        "report-step-2-64",
        "POST",
        METRICS,
        {"step": 2**64, "values": {"val_loss": 1}},
        names=("step",),
        postgres=True,
    ),
    Case(
        "report-step-text",
        "POST",
        METRICS,
        {"step": "ten", "values": {"val_loss": 1}},
        names=("step",),
    ),
    Case(
        "report-step-float",
        "POST",
        METRICS,
        {"step": 30.5, "values": {"val_loss": 1}},
        names=("step",),
    ),
    Case("report-step-missing", "POST", METRICS, {"values": {"val_loss": 1}}, names=("step",)),
    Case(
        "report-rank-negative",
        "POST",
        METRICS,
        {"step": 30, "rank": -1, "values": {}},
        names=("rank",),
    ),
    Case(
        "report-rank-beyond-world",
        "POST",
        METRICS,
        {"step": 30, "rank": 3, "values": {"val_loss": 1}},
        names=("rank", "world_size"),
        postgres=True,
    ),
    Case("report-values-list", "POST", METRICS, {"step": 30, "values": [1, 2]}, names=("values",)),
    Case(
        "report-value-text",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": "low"}},
        names=("val_loss",),
    ),
    Case(
        "report-value-bool",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": True}},
        names=("val_loss",),
    ),
    Case(
        "report-value-list",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": [1]}},
        names=("val_loss",),
    ),
    Case(
        "report-value-object",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": {"$gt": 0}}},
        names=("val_loss",),
    ),
    Case(
        "report-nan-literal",
        "POST",
        METRICS,
        b'{"step": 30, "values": {"val_loss": NaN}}',
        names=("val_loss", "nan", "finite"),
        postgres=True,
    ),
    Case(
        "report-infinity-literal",
        "POST",
        METRICS,
        b'{"step": 30, "values": {"val_loss": -Infinity}}',
        names=("val_loss", "infinity", "finite"),
    ),
    Case(
        "report-overflow",
        "POST",
        METRICS,
        b'{"step": 30, "values": {"val_loss": 1e999}}',
        names=("val_loss", "finite"),
    ),
    Case(
        "report-huge-int",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": 10**400}},
        names=("val_loss", "finite"),
    ),
    Case("report-empty-name", "POST", METRICS, {"step": 30, "values": {"": 1}}, names=("values",)),
    Case(
        "report-long-name",
        "POST",
        METRICS,
        {"step": 30, "values": {"m" * 1000: 1}},
        names=("values", "200"),
    ),
    Case(
        "report-too-many-metrics",
        "POST",
        METRICS,
        {"step": 30, "values": {f"m{i}": 1 for i in range(5000)}},
        names=("values",),
    ),
    Case("report-extra-field", "POST", METRICS, {"step": 30, "values": {}, "x": 1}, names=("x",)),
    Case(
        "report-stale",
        "POST",
        METRICS,
        {"step": 5, "values": {"val_loss": 0.1}},
        (409,),
        ("stale", "older", "completed"),
        postgres=True,
    ),
    Case(
        "report-conflict",
        "POST",
        METRICS,
        {"step": 20, "rank": 0, "values": {"val_loss": 123.0}},
        (409,),
        ("already", "other values"),
        postgres=True,
    ),
    Case(
        "report-wait-negative",
        "POST",
        METRICS,
        {"step": 30, "values": {}},
        names=("wait",),
        params={"wait": -1},
    ),
    Case(
        "report-wait-huge",
        "POST",
        METRICS,
        {"step": 30, "values": {}},
        names=("wait",),
        params={"wait": 1e9},
    ),
    Case(
        "report-wait-text",
        "POST",
        METRICS,
        {"step": 30, "values": {}},
        names=("wait",),
        params={"wait": "forever"},
    ),
    Case(
        "report-wait-nan",
        "POST",
        METRICS,
        {"step": 30, "values": {}},
        names=("wait",),
        params={"wait": "nan"},
    ),
    Case(
        "report-unknown-run",
        "POST",
        "/v1/runs/newcomer/metrics",
        {"step": 1, "values": {"val_loss": 1}},
        (404,),
        ("newcomer",),
        postgres=True,
    ),
    # --- reads with bad parameters ----------------------------------------------------------------
    Case("lr-step-negative", "GET", f"/v1/runs/{VICTIM}/lr", params={"step": -1}, names=("step",)),
    Case("lr-step-2-64", "GET", f"/v1/runs/{VICTIM}/lr", params={"step": 2**64}, names=("step",)),
    Case("lr-step-text", "GET", f"/v1/runs/{VICTIM}/lr", params={"step": "1e3"}, names=("step",)),
    # A single-valued parameter given twice (the last would win silently): refused, on the hot
    # paths (read by hand) and on the documented routes alike; list ones (status, tag) repeat.
    Case(
        "lr-step-repeated",
        "GET",
        f"/v1/runs/{VICTIM}/lr",
        params={"step": [1, 9]},
        names=("step",),
        postgres=True,
    ),
    Case(
        "report-wait-repeated",
        "POST",
        METRICS,
        {"step": 30, "values": {"val_loss": 0.5}},
        names=("wait",),
        params={"wait": [0, 0]},
    ),
    Case("list-q-repeated", "GET", "/v1/runs", params={"q": ["a", "b"]}, names=("q",)),
    Case(
        "list-limit-repeated",
        "GET",
        "/v1/runs",
        params={"limit": [5, 6], "status": ["idle", "running"]},
        names=("limit",),
    ),
    Case(
        "curve-points-repeated",
        "GET",
        f"/v1/runs/{VICTIM}/curve",
        params={"points": [10, 20]},
        names=("points",),
    ),
    Case(
        "lr-count-huge",
        "GET",
        f"/v1/runs/{VICTIM}/lr",
        params={"start": 0, "count": 10**7},
        names=("count",),
    ),
    Case(
        "lr-count-zero",
        "GET",
        f"/v1/runs/{VICTIM}/lr",
        params={"start": 0, "count": 0},
        names=("count",),
    ),
    Case(
        "curve-span-huge",
        "GET",
        f"/v1/runs/{VICTIM}/curve",
        params={"start": 0, "stop": 2**60, "points": 10},
        names=("stop", "span", "curve"),
    ),
    Case(
        "curve-points-huge",
        "GET",
        f"/v1/runs/{VICTIM}/curve",
        params={"start": 0, "stop": 100, "points": 10**9},
        names=("points",),
    ),
    Case("lr-unknown-run", "GET", "/v1/runs/newcomer/lr", None, (404,), ("newcomer",)),
    Case("list-limit-huge", "GET", "/v1/runs", params={"limit": 10**9}, names=("limit",)),
    Case(
        "list-cursor-junk",
        "GET",
        "/v1/runs",
        status=(400, 422),
        names=("cursor",),
        params={"cursor": "\x00junk"},
    ),
    # --- overrides ---
    Case(
        "override-action-unknown",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": 10, "action": "delete", "value": 1},
        names=("action",),
    ),
    Case(
        "override-value-nan",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        b'{"from_step": 10, "action": "set", "value": NaN}',
        names=("value", "finite"),
        postgres=True,
    ),
    Case(
        "override-value-negative",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": 10, "action": "set", "value": -1},
        names=("value",),
    ),
    Case(
        "override-value-huge-int",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": 10, "action": "scale", "value": 10**400},
        names=("value",),
    ),
    Case(
        "override-from-step-negative",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": -3, "action": "scale", "value": 0.5},
        names=("from_step",),
    ),
    Case(
        "override-unknown-group",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": 10, "action": "scale", "value": 0.5, "groups": ["nope"]},
        names=("nope",),
    ),
    Case(
        "override-unknown-field",
        "POST",
        f"/v1/runs/{VICTIM}/overrides",
        {"from_step": 10, "action": "scale", "value": 0.5, "field": "__class__"},
        names=("field", "__class__"),
    ),
    # --- preview ---
    Case(
        "preview-count-huge",
        "POST",
        "/v1/schedules/preview",
        {"groups": SPEC["groups"], "schedule": SPEC["schedule"], "count": 10**8},
        names=("count",),
    ),
    Case(
        "preview-lr-lambda-code",
        "POST",
        "/v1/schedules/preview",
        {"groups": SPEC["groups"], "schedule": {"type": "LambdaLR", "lr_lambda": LAMBDA_CODE[0]}},
        names=("lr_lambda",),
    ),
]


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if isinstance(case.body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return client.request(
            case.method, case.path, content=case.body, headers=headers, params=case.params
        )
    if case.body is None:
        return client.request(case.method, case.path, headers=headers, params=case.params)
    return client.request(
        case.method, case.path, json=case.body, headers=headers, params=case.params
    )


def snapshot(client: httpx.Client, run: str = VICTIM) -> dict[str, Any]:
    """Everything stored about a run (and the run list), read back over HTTP."""
    out: dict[str, Any] = {}
    for key, path, params in (
        ("run", f"/v1/runs/{run}", {}),
        ("events", f"/v1/runs/{run}/events", {}),
        ("history", f"/v1/runs/{run}/metrics", {"name": "val_loss"}),
        ("window", f"/v1/runs/{run}/lr", {"start": 0, "count": 300, "lease": "false"}),
        ("list", "/v1/runs", {"limit": 1000}),
    ):
        r = client.get(path, params=params)
        assert r.status_code == 200, (path, r.status_code, r.text)
        out[key] = r.json()
    return out


def assert_problem(r: httpx.Response, case: Case) -> None:
    assert r.status_code in case.status, (case.id, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith(PROBLEM), (case.id, r.headers["content-type"])
    body = r.json()
    assert body["status"] == r.status_code
    assert body["type"].startswith("/problems/")
    said = (str(body.get("detail", "")) + json.dumps(body.get("errors", []))).lower()
    assert said.strip(), case.id
    if case.names:
        assert any(n.lower() in said for n in case.names), (case.id, case.names, body)


def _prepare(server: ServerProcess) -> httpx.Client:
    client = server.client()
    assert client.put(f"/v1/runs/{VICTIM}", json=SPEC).status_code == 201
    assert client.put(f"/v1/runs/{JUNK}", json=SPEC).status_code == 201
    for step, loss in ((10, 0.9), (20, 0.95)):
        r = client.post(METRICS, json={"step": step, "values": {"val_loss": loss, "acc": 0.5}})
        assert r.status_code == 200, r.text
    return client


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("hostile-sqlite")
    server = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}")
    try:
        client = _prepare(server)
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("hostile-postgres")
    with postgres_database() as url:
        server = start_server(tmp, url)
        try:
            client = _prepare(server)
            yield client
            client.close()
        finally:
            server.stop()


def _check_case(client: httpx.Client, case: Case) -> None:
    before = snapshot(client)
    r = _send(client, case)
    assert_problem(r, case)
    assert snapshot(client) == before, case.id
    gone = client.get(NEW)
    assert gone.status_code == 404, gone.text
    assert not PWNED.exists()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_sqlite(sqlite_client: httpx.Client, case: Case) -> None:
    _check_case(sqlite_client, case)


PG_CASES = [c for c in CASES if c.postgres]


@pytest.mark.postgres
@pytest.mark.parametrize("case", PG_CASES, ids=[c.id for c in PG_CASES])
def test_hostile_request_postgres(postgres_client: httpx.Client, case: Case) -> None:
    _check_case(postgres_client, case)


def test_chunked_oversized_body_is_refused(sqlite_client: httpx.Client) -> None:
    """Without a Content-Length the limit is enforced while reading the stream."""
    before = snapshot(sqlite_client)
    chunk = b" " * 65536

    def body() -> Iterator[bytes]:
        yield b'{"groups": ['
        for _ in range(40):  # 2.5 MiB
            yield chunk
        yield b"]}"

    r = sqlite_client.put(NEW, content=body(), headers={"Content-Type": "application/json"})
    assert_problem(r, Case("chunked", "PUT", NEW, status=(413,), names=("exceeds", "large")))
    assert snapshot(sqlite_client) == before


def test_duplicate_report_is_answered_as_the_first_time(sqlite_client: httpx.Client) -> None:
    """Not hostile, but the control for report-conflict: the exact duplicate is a 200."""
    before = snapshot(sqlite_client)
    r = sqlite_client.post(METRICS, json={"step": 20, "values": {"val_loss": 0.95, "acc": 0.5}})
    assert r.status_code == 200, r.text
    assert snapshot(sqlite_client) == before


# --- generated junk ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -(10**400), 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix]
    paths = [prefix] if prefix else []
    for k, v in items:
        paths += _leaf_paths(v, (*prefix, k))
    return paths


SPEC_PATHS = _leaf_paths(SPEC)


@st.composite
def junk_specs(draw: st.DrawFn) -> bytes:
    """Either any JSON at all, or SPEC with one item (leaf or subtree) replaced by junk."""
    if draw(st.booleans()):
        body = draw(json_values)
    else:
        path = draw(st.sampled_from(SPEC_PATHS))
        body = spec_with(path, draw(json_values))
    return json.dumps(body).encode()  # NaN/Infinity become literals: also hostile


@st.composite
def junk_reports(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {
        "step": draw(st.integers(min_value=21, max_value=10**6) | json_values),
        "values": draw(
            st.dictionaries(st.text(max_size=10), json_values, max_size=4) | json_values
        ),
    }
    if draw(st.booleans()):
        body["rank"] = draw(st.integers(min_value=-2, max_value=2) | json_values)
    if draw(st.booleans()):
        body[draw(st.text(max_size=5))] = draw(json_values)
    return json.dumps(body).encode()


JUNK_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@JUNK_SETTINGS
@given(body=junk_specs())
def test_junk_put_never_changes_the_run(sqlite_client: httpx.Client, body: bytes) -> None:
    before = snapshot(sqlite_client)
    r = sqlite_client.put(
        f"/v1/runs/{VICTIM}", content=body, headers={"Content-Type": "application/json"}
    )
    # A body equal to the stored spec would be a 200; junk never is.
    assert r.status_code in (400, 409, 413, 422), (r.status_code, r.text[:300], body[:300])
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["detail"]
    assert snapshot(sqlite_client) == before


@JUNK_SETTINGS
@given(body=junk_reports())
def test_junk_report_is_a_4xx_or_a_clean_report(sqlite_client: httpx.Client, body: bytes) -> None:
    before = snapshot(sqlite_client, JUNK)
    r = sqlite_client.post(
        f"/v1/runs/{JUNK}/metrics", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code < 500, (r.status_code, r.text[:300], body[:300])
    if r.status_code == 200:
        # Some junk is a valid report (any metric names are allowed): then it is stored whole.
        answer = r.json()
        run = sqlite_client.get(f"/v1/runs/{JUNK}").json()
        assert run["version"] == answer["version"] and run["completed_step"] >= answer["step"]
        return
    assert r.status_code in (400, 404, 409, 413, 422), (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["detail"]
    assert snapshot(sqlite_client, JUNK) == before
