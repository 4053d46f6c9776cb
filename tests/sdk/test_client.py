"""lrserve.Client: HTTP behaviour against a scripted real HTTP server.

Retries, backoff, Retry-After, timeouts, problem+json mapping, auth and configuration.
The end-to-end tests against the real lrserve server are in test_client_live.py.
"""

from __future__ import annotations

import math
import time

import httpx
import lrserve
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lrserve._transport import RetryPolicy, parse_retry_after

from .conftest import Reply, ScriptedServer

FAST = {"backoff_base": 0.01, "backoff_max": 0.02}

RUN = {"id": "r1", "version": 1, "spec": {}, "step": None}


def test_503_with_retry_after_is_retried_after_waiting(scripted: ScriptedServer) -> None:
    scripted.play(
        Reply.problem(503, "database-busy", "database is busy", Retry_After="1"),
        Reply(200, RUN),
    )
    with lrserve.Client(scripted.url, **FAST) as client:
        assert client.get_run("r1")["id"] == "r1"
    first, second = scripted.seen
    # Retry-After is a floor: the retry must not come earlier than the server asked.
    assert second.at - first.at >= 1.0


def test_retry_after_is_capped(scripted: ScriptedServer) -> None:
    scripted.play(Reply(503, "busy", {"Retry-After": "3600"}), Reply(200, RUN))
    started = time.monotonic()
    with lrserve.Client(scripted.url, retry_after_max=0.2, **FAST) as client:
        client.get_run("r1")
    assert time.monotonic() - started < 5


def test_503_gives_up_after_max_retries_with_server_detail(scripted: ScriptedServer) -> None:
    scripted.play(Reply.problem(503, "database-busy", "database is locked", Retry_After="0"))
    client = lrserve.Client(scripted.url, max_retries=2, **FAST)
    with client, pytest.raises(lrserve.ServiceUnavailableError) as info:
        client.get_run("r1")
    assert len(scripted.seen) == 3
    err = info.value
    assert isinstance(err, lrserve.ServerError) and isinstance(err, lrserve.APIError)
    assert (err.status, err.slug, err.detail) == (503, "database-busy", "database is locked")
    assert "database is locked" in str(err)


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_retried(scripted: ScriptedServer, status: int) -> None:
    scripted.play(Reply(status, "<html>bad gateway</html>"), Reply(200, RUN))
    with lrserve.Client(scripted.url, **FAST) as client:
        assert client.get_run("r1")["version"] == 1
    assert len(scripted.seen) == 2


def test_max_retries_zero_disables_retrying(scripted: ScriptedServer) -> None:
    scripted.play(Reply(502, "<html>bad gateway</html>"), Reply(200, RUN))
    client = lrserve.Client(scripted.url, max_retries=0)
    with client, pytest.raises(lrserve.ServerError) as info:
        client.get_run("r1")
    assert len(scripted.seen) == 1
    # Not a problem document: the text still reaches the message.
    assert info.value.status == 502 and "bad gateway" in info.value.detail


@pytest.mark.parametrize(
    ("status", "slug", "cls"),
    [
        (422, "validation-error", lrserve.ValidationError),
        (404, "run-not-found", lrserve.RunNotFoundError),
        (404, "not-found", lrserve.NotFoundError),
        (409, "run-conflict", lrserve.RunConflictError),
        (409, "report-conflict", lrserve.ReportConflictError),
        (409, "stale-report", lrserve.StaleReportError),
        (401, "unauthorized", lrserve.AuthenticationError),
        (403, "forbidden", lrserve.PermissionDeniedError),
        (413, "payload-too-large", lrserve.PayloadTooLargeError),
        (405, "method-not-allowed", lrserve.BadRequestError),
        (400, "bad-request", lrserve.BadRequestError),
    ],
)
def test_4xx_problems_map_to_typed_errors_and_are_never_retried(
    scripted: ScriptedServer, status: int, slug: str, cls: type[lrserve.APIError]
) -> None:
    errors = [{"loc": ["body", "step"], "msg": "must be >= 0"}]
    scripted.play(Reply.problem(status, slug, f"the {slug} detail", errors), Reply(200, RUN))
    with lrserve.Client(scripted.url, **FAST) as client, pytest.raises(cls) as info:
        client.report("r1", 3, {"loss": 1.0})
    assert len(scripted.seen) == 1
    err = info.value
    assert type(err) is cls
    assert (err.status, err.slug, err.detail, err.errors) == (
        status,
        slug,
        f"the {slug} detail",
        errors,
    )
    assert err.type == f"/problems/{slug}"
    assert "body.step: must be >= 0" in str(err)


def test_conflict_subclasses_share_a_base() -> None:
    for cls in (lrserve.RunConflictError, lrserve.ReportConflictError, lrserve.StaleReportError):
        assert issubclass(cls, lrserve.ConflictError)
        assert issubclass(cls, lrserve.LRServeError)


def test_dropped_connection_is_retried_for_idempotent_requests(scripted: ScriptedServer) -> None:
    scripted.play(Reply(drop=True), Reply(200, {"run": "r1", "step": 5, "complete": True}))
    with lrserve.Client(scripted.url, **FAST) as client:
        result = client.report("r1", 5, {"val_loss": 0.5})
    assert result["complete"] is True
    # The retry repeats the same (step, rank, values): the server treats it as a duplicate.
    assert [s.body for s in scripted.seen] == [
        {"step": 5, "rank": 0, "values": {"val_loss": 0.5}}
    ] * 2


def test_override_is_not_retried_when_the_server_may_have_acted(scripted: ScriptedServer) -> None:
    scripted.play(Reply(drop=True), Reply(201, RUN))
    with lrserve.Client(scripted.url, **FAST) as client, pytest.raises(lrserve.TransportError):
        client.override("r1", 100, "scale", 0.5)
    assert len(scripted.seen) == 1
    scripted.play(Reply(502, "bad gateway"), Reply(201, RUN))
    with lrserve.Client(scripted.url, **FAST) as client, pytest.raises(lrserve.ServerError):
        client.override("r1", 100, "scale", 0.5)
    assert len(scripted.seen) == 1


def test_override_is_retried_on_503(scripted: ScriptedServer) -> None:
    scripted.play(Reply.problem(503, "database-busy", "busy", Retry_After="0"), Reply(201, RUN))
    with lrserve.Client(scripted.url, **FAST) as client:
        assert client.override("r1", 100, "set", 1e-3, groups=["head"], note="x")["id"] == "r1"
    assert len(scripted.seen) == 2
    assert scripted.seen[1].body == {
        "from_step": 100,
        "action": "set",
        "value": 1e-3,
        "field": "lr",
        "groups": ["head"],
        "note": "x",
    }


def test_connection_refused_raises_transport_error_after_retries(dead_url: str) -> None:
    client = lrserve.Client(dead_url, max_retries=2, **FAST)
    with client, pytest.raises(lrserve.TransportError) as info:
        client.healthz()
    assert info.value.attempts == 3
    assert isinstance(info.value.cause, httpx.ConnectError)
    assert "cannot connect to lrserve at " + dead_url in str(info.value)


def test_read_timeout_is_retried_then_reported(scripted: ScriptedServer) -> None:
    scripted.play(Reply(200, RUN, delay=0.6))
    client = lrserve.Client(scripted.url, timeout=0.2, max_retries=1, **FAST)
    with client, pytest.raises(lrserve.TransportError) as info:
        client.get_run("r1")
    assert "timed out" in str(info.value) and info.value.attempts == 2
    assert len(scripted.seen) == 2


def test_report_wait_extends_the_read_timeout(scripted: ScriptedServer) -> None:
    scripted.play(Reply(200, {"run": "r1", "complete": True}, delay=0.8))
    with lrserve.Client(scripted.url, timeout=0.3, max_retries=0) as client:
        assert client.report("r1", 1, {"loss": 1}, rank=2, wait=1)["complete"] is True
    (seen,) = scripted.seen
    assert seen.query == {"wait": ["1"]}
    assert seen.body == {"step": 1, "rank": 2, "values": {"loss": 1.0}}


def test_report_sends_non_finite_values_in_the_wire_form(scripted: ScriptedServer) -> None:
    scripted.play(Reply(200, {"run": "r1"}))
    with lrserve.Client(scripted.url) as client:
        client.report("r1", 0, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": None, "e": 2})
    assert scripted.seen[0].body["values"] == {
        "a": "NaN",
        "b": "Infinity",
        "c": "-Infinity",
        "d": None,
        "e": 2.0,
    }


@pytest.mark.parametrize("bad", ["high", True, object(), [1.0]])
def test_report_rejects_non_numbers_before_sending(scripted: ScriptedServer, bad: object) -> None:
    scripted.play(Reply(200, {}))
    client = lrserve.Client(scripted.url)
    with client, pytest.raises(lrserve.UsageError, match="metric 'm'"):
        client.report("r1", 0, {"m": bad})
    assert scripted.seen == []


def test_lr_window_etag_round_trip(scripted: ScriptedServer) -> None:
    groups = {"head": {"lr": [0.1, 0.2]}}
    scripted.play(
        Reply(
            200,
            {"run": "r1", "start": 4, "count": 2, "version": 7, "groups": groups},
            {"ETag": '"7"'},
        ),
        Reply(304, None, {"ETag": '"7"'}),
    )
    with lrserve.Client(scripted.url) as client:
        window = client.get_lr_window("r1", 4, 2)
        assert (window.version, window.etag, window.not_modified) == (7, '"7"', False)
        assert window.values == groups and (window.start, window.count) == (4, 2)
        again = client.get_lr_window("r1", 4, 2, etag=window.etag)
    assert again.not_modified and again.values is None and again.version == 7
    assert "if-none-match" not in scripted.seen[0].headers
    assert scripted.seen[1].headers["if-none-match"] == '"7"'
    assert scripted.seen[1].query == {"start": ["4"], "count": ["2"]}


def test_paths_and_query_parameters(scripted: ScriptedServer) -> None:
    scripted.play(Reply(200, {"runs": [], "next_cursor": None}))
    spec = {"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "StepLR", "step_size": 2}}
    with lrserve.Client(scripted.url + "/") as client:
        client.list_runs(limit=5, cursor="abc")
        client.get_lr("run.1-x", step=3)
        client.get_lr("run.1-x")
        client.get_metrics("r", "val_loss")
        client.get_events("r", after=4)
        client.get_curve("r", 0, 1000, 50)
        client.preview({**spec, "world_size": 2, "metadata": {"a": 1}}, count=10)
        client.healthz()
        client.readyz()
    got = [(s.method, s.path, s.query) for s in scripted.seen]
    assert got == [
        ("GET", "/v1/runs", {"limit": ["5"], "cursor": ["abc"]}),
        ("GET", "/v1/runs/run.1-x/lr", {"step": ["3"]}),
        ("GET", "/v1/runs/run.1-x/lr", {}),
        ("GET", "/v1/runs/r/metrics", {"name": ["val_loss"]}),
        ("GET", "/v1/runs/r/events", {"after": ["4"]}),
        ("GET", "/v1/runs/r/curve", {"start": ["0"], "stop": ["1000"], "points": ["50"]}),
        ("POST", "/v1/schedules/preview", {}),
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
    ]
    # A whole run body is accepted: its run-only keys are left out of the preview.
    assert scripted.seen[6].body == {**spec, "start": 0, "count": 10}


def test_create_run_reports_whether_it_created(scripted: ScriptedServer) -> None:
    scripted.play(Reply(201, RUN), Reply(200, RUN))
    with lrserve.Client(scripted.url) as client:
        run, created = client.create_run("r1", {"groups": [], "schedule": {}})
        assert created is True and run["id"] == "r1"
        assert client.create_run("r1", {"groups": [], "schedule": {}}).created is False
    assert scripted.seen[0].method == "PUT" and scripted.seen[0].path == "/v1/runs/r1"


def test_delete_missing_ok(scripted: ScriptedServer) -> None:
    scripted.play(Reply.problem(404, "run-not-found", "no run with id 'r1'"))
    with lrserve.Client(scripted.url) as client:
        client.delete_run("r1", missing_ok=True)
        with pytest.raises(lrserve.RunNotFoundError):
            client.delete_run("r1")
    scripted.play(Reply.problem(404, "not-found", "no such path"))
    client = lrserve.Client(scripted.url)
    # A 404 for the path (a wrong base URL) is not "the run is gone".
    with client, pytest.raises(lrserve.NotFoundError):
        client.delete_run("r1", missing_ok=True)


def test_iter_runs_follows_cursors(scripted: ScriptedServer) -> None:
    scripted.play(
        Reply(200, {"runs": [{"id": "a"}, {"id": "b"}], "next_cursor": "c1"}),
        Reply(200, {"runs": [{"id": "c"}], "next_cursor": None}),
    )
    with lrserve.Client(scripted.url) as client:
        assert [r["id"] for r in client.iter_runs(page_size=2)] == ["a", "b", "c"]
    assert [s.query for s in scripted.seen] == [
        {"limit": ["2"]},
        {"limit": ["2"], "cursor": ["c1"]},
    ]


def test_readyz_503_is_not_retried(scripted: ScriptedServer) -> None:
    scripted.play(Reply.problem(503, "service-unavailable", "database down"))
    client = lrserve.Client(scripted.url, **FAST)
    with client, pytest.raises(lrserve.ServiceUnavailableError, match="database down"):
        client.readyz()
    assert len(scripted.seen) == 1


def test_token_from_argument_and_environment(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.play(Reply(200, {"status": "ok"}))
    monkeypatch.setenv("LRSERVE_TOKEN", "from-env")
    monkeypatch.setenv("LRSERVE_URL", scripted.url)
    with lrserve.Client() as client:
        client.healthz()
    with lrserve.Client(token="from-arg") as client:
        client.healthz()
    monkeypatch.setenv("LRSERVE_TOKEN", "")
    with lrserve.Client() as client:
        client.healthz()
    auth = [s.headers.get("authorization") for s in scripted.seen]
    assert auth == ["Bearer from-env", "Bearer from-arg", None]
    assert scripted.seen[0].headers["user-agent"] == f"lrserve-python/{lrserve.__version__}"


@pytest.mark.parametrize(
    "url", ["ftp://x", "localhost:8000", "http://", "http://h:99999", "http://h/?a=1"]
)
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(lrserve.UsageError, match="invalid server URL"):
        lrserve.Client(url)


def test_default_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRSERVE_URL", raising=False)
    assert lrserve.Client().url == lrserve.DEFAULT_URL == "http://127.0.0.1:8000"


@pytest.mark.parametrize("run_id", ["", "a/b", "-x", "a?b", "x" * 129, "é"])
def test_bad_run_ids_are_rejected_before_sending(scripted: ScriptedServer, run_id: str) -> None:
    scripted.play(Reply(200, RUN))
    client = lrserve.Client(scripted.url)
    with client, pytest.raises(lrserve.UsageError, match="invalid run id"):
        client.get_run(run_id)
    assert scripted.seen == []


def test_usage_errors_for_bad_arguments() -> None:
    client = lrserve.Client("http://127.0.0.1:1")
    with pytest.raises(lrserve.UsageError):
        client.override("r", 0, "double", 2.0)
    with pytest.raises(lrserve.UsageError):
        client.override("r", 0, "scale", math.nan)
    with pytest.raises(lrserve.UsageError):
        client.override("r", 0, "scale", 2.0, groups="head")  # type: ignore[arg-type]
    with pytest.raises(lrserve.UsageError):
        client.get_lr("r", step=-1)
    with pytest.raises(lrserve.UsageError):
        client.report("r", 0, {"a": 1}, wait=301)
    with pytest.raises(lrserve.UsageError):
        client.get_lr_window("r", 0, 0)
    with pytest.raises(ValueError):  # UsageError is a ValueError too
        lrserve.Client(timeout=-1)
    client.close()


@given(
    retry=st.integers(0, 100),
    base=st.floats(0, 10),
    cap=st.floats(0, 100),
)
def test_backoff_is_full_jitter_within_the_cap(retry: int, base: float, cap: float) -> None:
    policy = RetryPolicy(backoff_base=base, backoff_max=cap)
    delay = policy.delay(retry)
    assert 0 <= delay <= min(cap, base * 2.0**retry)


@given(after=st.floats(0, 1e6), cap=st.floats(0, 100), base=st.floats(0, 5))
def test_retry_after_is_a_capped_floor(after: float, cap: float, base: float) -> None:
    policy = RetryPolicy(backoff_base=base, retry_after_max=cap)
    delay = policy.delay(0, after)
    assert min(after, cap) <= delay <= min(after, cap) + base


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
