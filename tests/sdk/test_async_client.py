"""lrserve.AsyncClient: the same HTTP behaviour as the sync client, awaited.

Against a scripted real HTTP server; see test_client_live.py for the real lrserve server.
"""

from __future__ import annotations

import math

import lrserve
import pytest

from .conftest import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

FAST = {"backoff_base": 0.01, "backoff_max": 0.02}
RUN = {"id": "r1", "version": 1, "spec": {}, "step": None}


async def test_503_retry_after_then_success(scripted: ScriptedServer) -> None:
    scripted.play(
        Reply.problem(503, "database-busy", "busy", Retry_After="1"),
        Reply(200, RUN),
    )
    async with lrserve.AsyncClient(scripted.url, **FAST) as client:
        assert (await client.get_run("r1"))["id"] == "r1"
    first, second = scripted.seen
    assert second.at - first.at >= 1.0


async def test_problem_details_become_typed_errors(scripted: ScriptedServer) -> None:
    scripted.play(Reply.problem(409, "stale-report", "step 3 is older than completed step 9"))
    client = lrserve.AsyncClient(scripted.url, **FAST)
    async with client:
        with pytest.raises(lrserve.StaleReportError, match="older than completed") as info:
            await client.report("r1", 3, {"loss": 1.0})
    assert info.value.status == 409 and len(scripted.seen) == 1


async def test_dropped_connection_retried_but_not_for_overrides(scripted: ScriptedServer) -> None:
    scripted.play(Reply(drop=True), Reply(200, RUN))
    async with lrserve.AsyncClient(scripted.url, **FAST) as client:
        assert (await client.get_run("r1"))["version"] == 1
        assert len(scripted.seen) == 2
        scripted.play(Reply(drop=True), Reply(201, RUN))
        with pytest.raises(lrserve.TransportError):
            await client.override("r1", 10, "scale", 0.1)
        assert len(scripted.seen) == 1


async def test_connection_refused(dead_url: str) -> None:
    client = lrserve.AsyncClient(dead_url, max_retries=1, **FAST)
    async with client:
        with pytest.raises(lrserve.TransportError, match="cannot connect") as info:
            await client.healthz()
    assert info.value.attempts == 2


async def test_report_wait_and_non_finite_values(scripted: ScriptedServer) -> None:
    scripted.play(Reply(200, {"run": "r1", "complete": True}, delay=0.6))
    async with lrserve.AsyncClient(scripted.url, timeout=0.2, max_retries=0) as client:
        result = await client.report("r1", 2, {"loss": math.nan}, rank=1, wait=2)
    assert result["complete"] is True
    assert scripted.seen[0].body == {"step": 2, "rank": 1, "values": {"loss": "NaN"}}
    assert scripted.seen[0].query == {"wait": ["2"]}


async def test_window_etag_and_iter_runs(scripted: ScriptedServer) -> None:
    scripted.play(
        Reply(200, {"run": "r1", "start": 0, "count": 1, "version": 3, "groups": {}}),
        Reply(304, None, {"ETag": '"3"'}),
        Reply(200, {"runs": [{"id": "a"}], "next_cursor": "n"}),
        Reply(200, {"runs": [{"id": "b"}], "next_cursor": None}),
    )
    async with lrserve.AsyncClient(scripted.url) as client:
        window = await client.get_lr_window("r1", 0, 1)
        assert window.etag == '"3"'  # derived from the version when no ETag header came
        again = await client.get_lr_window("r1", 0, 1, etag=window.etag)
        assert again.not_modified and again.version == 3
        assert [r["id"] async for r in client.iter_runs()] == ["a", "b"]


async def test_token_and_url_from_environment(
    scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.play(Reply(200, {"status": "ok"}))
    monkeypatch.setenv("LRSERVE_URL", scripted.url)
    monkeypatch.setenv("LRSERVE_TOKEN", "sesame")
    async with lrserve.AsyncClient() as client:
        assert await client.healthz() == {"status": "ok"}
    assert scripted.seen[0].headers["authorization"] == "Bearer sesame"
