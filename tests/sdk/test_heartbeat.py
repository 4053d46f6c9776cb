"""The SDK's heartbeat and run-list filters against a live server, and RemoteScheduler's
heartbeat from its background thread (never from ``step()``) and ``finish()``."""

from __future__ import annotations

import json
import time
from typing import Any

import lrserve
import pytest
import torch
from lrserve.torch import RemoteScheduler

from ..conftest import ServerProcess

SPEC: dict[str, Any] = {
    "groups": [{"name": "g", "lr": 0.1}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 1000},
    "metadata": {"tags": ["sdk"], "owner": "Ada"},
}


def test_client_heartbeat_and_list_filters(live_server: ServerProcess) -> None:
    with lrserve.Client(live_server.url) as client:
        client.create_run("hb-a", SPEC)
        client.create_run("hb-b", {**SPEC, "metadata": {"tags": ["sdk", "two"]}})
        assert client.get_run("hb-a")["status"] == "idle"
        client.heartbeat("hb-a", step=3)
        run = client.get_run("hb-a")
        assert run["status"] == "running" and run["heartbeat_step"] == 3 and run["version"] == 1
        client.heartbeat("hb-b", finished=True)
        assert [r["id"] for r in client.list_runs(status="running")["runs"]] == ["hb-a"]
        page = client.list_runs(status=["running", "finished"], sort="-id")
        assert [r["id"] for r in page["runs"]] == ["hb-b", "hb-a"]
        assert [r["id"] for r in client.list_runs(search="ADA")["runs"]] == ["hb-a"]
        assert [r["id"] for r in client.list_runs(tags=["sdk", "two"])["runs"]] == ["hb-b"]
        assert [r["id"] for r in client.iter_runs(page_size=1, sort="-created")] == [
            "hb-b",
            "hb-a",
        ]
        with pytest.raises(lrserve.UsageError):
            client.list_runs(status="sleeping")
        with pytest.raises(lrserve.UsageError):
            client.list_runs(sort="name")
        with pytest.raises(lrserve.NotFoundError):
            client.heartbeat("hb-nope")


@pytest.mark.anyio
async def test_async_client_heartbeat(live_server: ServerProcess) -> None:
    async with lrserve.AsyncClient(live_server.url) as client:
        await client.create_run("hb-async", SPEC)
        await client.heartbeat("hb-async", step=9, finished=True)
        assert (await client.get_run("hb-async"))["status"] == "finished"
        page = await client.list_runs(status="finished", tags=["sdk"])
        assert [r["id"] for r in page["runs"]] == ["hb-async"]


def test_remote_scheduler_heartbeats_from_its_thread_and_finishes(
    live_server: ServerProcess,
) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with lrserve.Client(live_server.url) as client:
        sched = RemoteScheduler(opt, "hb-torch", url=live_server.url, spec=SPEC, poll_interval=0.1)
        try:
            for _ in range(5):
                sched.step()
            deadline = time.monotonic() + 10
            while client.get_run("hb-torch")["heartbeat_at"] is None:
                assert time.monotonic() < deadline, "no heartbeat"
                time.sleep(0.05)
            first = client.get_run("hb-torch")
            assert first["status"] == "running" and first["version"] == 1
            # At most one every 30 s, although the refresher polls ten times a second.
            time.sleep(1.0)
            assert client.get_run("hb-torch")["heartbeat_at"] == first["heartbeat_at"]
            for _ in range(5):
                sched.step()
        finally:
            sched.finish()
        run = client.get_run("hb-torch")
        assert run["status"] == "finished" and run["heartbeat_step"] == 10


def test_cli_runs_filters_and_columns(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess
) -> None:
    from lrserve.cli import main

    with lrserve.Client(live_server.url) as client:
        client.create_run("cli-a", SPEC)
        client.create_run("cli-b", {**SPEC, "metadata": {"tags": ["sdk", "two"]}})
        client.report("cli-b", 5, {"loss": 1.0})
    assert main(["--url", live_server.url, "runs", "--sort=-step"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "status", "created_at", "step", "version", "tags"]
    assert [line.split()[0] for line in lines[1:]] == ["cli-b", "cli-a"]
    assert lines[1].split()[1] == "running" and lines[1].split()[-1] == "sdk,two"
    argv = ["--url", live_server.url, "--json", "runs", "--status", "idle", "-q", "ADA"]
    assert main([*argv, "--tag", "sdk"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["cli-a"]
    assert main(["--url", live_server.url, "runs", "--status", "running,idle", "--all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["--url", live_server.url, "runs", "--status", "asleep"]) != 0
    assert "status" in capsys.readouterr().err
