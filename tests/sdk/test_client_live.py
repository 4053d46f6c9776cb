"""Client and AsyncClient against the real lrserve server (uvicorn subprocess, SQLite file).

Every method of both clients, with torch's own schedulers as the oracle for the values.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import anyio
import lrserve
import pytest
import torch
from torch.optim import lr_scheduler

from ..conftest import ServerProcess

SPEC: dict[str, Any] = {
    "groups": [
        {"name": "backbone", "lr": 0.1, "momentum": 0.9},
        {"name": "head", "lr": 0.01},
    ],
    "schedule": {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": 5},
            {"type": "CosineAnnealingLR", "T_max": 20, "eta_min": 1e-4},
        ],
        "milestones": [5],
    },
    "metadata": {"model": "test"},
}

PLATEAU: dict[str, Any] = {
    "groups": [{"name": "g", "lr": 0.1}],
    "schedule": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 1, "factor": 0.5},
}


def sequential(opt: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
    return lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
            lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4),
        ],
        milestones=[5],
    )


def torch_lrs(
    spec: dict[str, Any], make: Callable[[torch.optim.Optimizer], Any], steps: int
) -> list[list[float]]:
    """lr of every group after 0, 1, ..., steps-1 scheduler steps (torch is the oracle)."""
    opt = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": g["lr"]} for g in spec["groups"]],
        lr=1.0,
    )
    sched = make(opt)
    rows = []
    for _ in range(steps):
        rows.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return rows


def torch_plateau(losses: list[float], steps: int) -> list[float]:
    """lr after each report (index s = the value in force at step s)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    lrs = [opt.param_groups[0]["lr"]]
    for loss in losses:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs + [lrs[-1]] * (steps - len(lrs))


def test_runs_lifecycle(live_server: ServerProcess) -> None:
    with lrserve.Client(live_server.url) as client:
        assert client.healthz() and client.readyz()
        run, created = client.create_run("life-1", SPEC)
        assert created and run["id"] == "life-1" and run["version"] >= 1
        assert run["spec"]["metadata"] == {"model": "test"}
        # Idempotent: the same body again, even with defaults spelled out.
        again = client.create_run("life-1", {**SPEC, "world_size": 1})
        assert again.created is False and again.run["version"] == run["version"]
        with pytest.raises(lrserve.RunConflictError) as info:
            client.create_run("life-1", {**SPEC, "world_size": 2})
        assert info.value.status == 409 and info.value.detail
        assert client.get_run("life-1")["spec"]["world_size"] == 1

        for i in range(3):
            client.create_run(f"life-page-{i}", SPEC)
        page = client.list_runs(limit=2)
        assert len(page["runs"]) == 2 and page["next_cursor"]
        ids = [r["id"] for r in client.iter_runs(page_size=1)]
        assert sorted(ids) == ["life-1", "life-page-0", "life-page-1", "life-page-2"]
        assert len(ids) == len(set(ids))

        client.delete_run("life-1")
        with pytest.raises(lrserve.RunNotFoundError, match="life-1"):
            client.get_run("life-1")
        client.delete_run("life-1", missing_ok=True)
        with pytest.raises(lrserve.NotFoundError):
            client.delete_run("life-1")


def test_values_match_torch(live_server: ServerProcess) -> None:
    steps = 30
    expected = torch_lrs(SPEC, sequential, steps)
    with lrserve.Client(live_server.url) as client:
        client.create_run("vals", SPEC)
        for step in (0, 4, 5, 6, 17, 29):
            got = client.get_lr("vals", step=step)
            assert got["step"] == step
            lrs = [got["groups"]["backbone"]["lr"], got["groups"]["head"]["lr"]]
            assert lrs == pytest.approx(expected[step], rel=1e-12)
            assert got["groups"]["backbone"]["momentum"] == 0.9
        window = client.get_lr_window("vals", 0, steps)
        assert not window.not_modified and window.values is not None
        assert window.etag is not None and window.etag.startswith(f'"{window.version}-')
        for i, name in enumerate(["backbone", "head"]):
            column = window.values[name]["lr"]
            assert column == pytest.approx([row[i] for row in expected], rel=1e-12)
        cached = client.get_lr_window("vals", 0, steps, etag=window.etag)
        assert cached.not_modified and cached.values is None
        assert cached.version == window.version

        preview = client.preview(SPEC, start=0, count=steps)
        assert preview["groups"]["head"]["lr"] == pytest.approx(
            [row[1] for row in expected], rel=1e-12
        )
        curve = client.get_curve("vals", 0, steps, 10)
        assert curve["steps"][0] == 0 and len(curve["steps"]) <= steps
        for step, value in zip(curve["steps"], curve["groups"]["head"]["lr"], strict=True):
            assert value == pytest.approx(expected[step][1], rel=1e-12)


def test_reports_plateau_and_errors(live_server: ServerProcess) -> None:
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]
    expected = torch_plateau(losses, 10)
    with lrserve.Client(live_server.url) as client:
        client.create_run("plat", PLATEAU)
        window = client.get_lr_window("plat", 0, 10)
        for step, loss in enumerate(losses):
            result = client.report("plat", step, {"val_loss": loss, "acc": 0.5})
            assert result["complete"] and result["applies_from"] == step + 1
            assert result["groups"]["g"]["lr"] == pytest.approx(expected[step + 1], rel=1e-12)
        assert client.get_lr_window("plat", 0, 10, etag=window.etag).not_modified is False
        got = [client.get_lr("plat", step=s)["groups"]["g"]["lr"] for s in range(10)]
        assert got == pytest.approx(expected, rel=1e-12)
        assert client.get_lr("plat")["step"] == len(losses) - 1

        # Idempotent by (step, rank); other values for the same key conflict.
        dup = client.report("plat", 5, {"val_loss": 0.9, "acc": 0.5})
        assert dup["step"] == 5
        with pytest.raises(lrserve.ReportConflictError):
            client.report("plat", 5, {"val_loss": 0.1, "acc": 0.5})
        with pytest.raises(lrserve.StaleReportError):
            client.report("plat", 2, {"val_loss": 0.1})
        # Non-finite values travel in the wire form and do not break the run.
        client.report("plat", 6, {"val_loss": math.nan})
        history = client.get_metrics("plat", "val_loss")
        assert [p["step"] for p in history["points"]] == [0, 1, 2, 3, 4, 5, 6]
        assert [p["value"] for p in history["points"]][:6] == losses

        events = client.get_events("plat")["events"]
        types = [e["type"] for e in events]
        assert types[0] == "created" and "reduced" in types
        later = client.get_events("plat", after=events[-2]["seq"])["events"]
        assert [e["seq"] for e in later] == [events[-1]["seq"]]


def test_override(live_server: ServerProcess) -> None:
    expected = torch_lrs(SPEC, sequential, 20)
    with lrserve.Client(live_server.url) as client:
        client.create_run("ovr", SPEC)
        before = client.get_run("ovr")["version"]
        run = client.override("ovr", 10, "scale", 0.5, groups=["head"], note="too hot")
        assert run["version"] > before and run["overrides"][-1]["note"] == "too hot"
        for step in (9, 10, 15):
            # Inspection reads: a trainer's read would lease the steps and refuse the next
            # override as too late.
            lr = client.get_lr("ovr", step=step, lease=False)["groups"]
            factor = 0.5 if step >= 10 else 1.0
            assert lr["head"]["lr"] == pytest.approx(expected[step][1] * factor, rel=1e-12)
            assert lr["backbone"]["lr"] == pytest.approx(expected[step][0], rel=1e-12)
        client.override("ovr", 12, "set", 0.003)
        assert client.get_lr("ovr", step=12)["groups"]["backbone"]["lr"] == 0.003
        assert [e["type"] for e in client.get_events("ovr")["events"]].count("override") == 2
        with pytest.raises(lrserve.ValidationError):
            client.override("ovr", 1, "scale", 2.0, groups=["nope"])


def test_validation_errors_name_the_problem(live_server: ServerProcess) -> None:
    with lrserve.Client(live_server.url) as client:
        with pytest.raises(lrserve.ValidationError) as info:
            client.create_run("bad", {"groups": [{"name": "g", "lr": 0.1}], "schedule": {}})
        assert info.value.status == 422 and info.value.errors
        assert info.value.slug == "validation-error"
        with pytest.raises(lrserve.ValidationError):
            client.preview({"groups": [{"name": "g", "lr": -1}], "schedule": {"type": "x"}})
        with pytest.raises(lrserve.RunNotFoundError):
            client.get_lr("never-created")
        with pytest.raises(lrserve.NotFoundError):
            client.report("never-created", 0, {"a": 1})


def test_auth(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(token="rw-secret", read_token="ro-secret")
    with lrserve.Client(server.url) as anonymous:
        assert anonymous.healthz()
        with pytest.raises(lrserve.AuthenticationError):
            anonymous.list_runs()
    with lrserve.Client(server.url, token="rw-secret") as writer:
        assert writer.create_run("authed", PLATEAU).created
    with lrserve.Client(server.url, token="ro-secret") as reader:
        assert reader.get_run("authed")["id"] == "authed"
        with pytest.raises(lrserve.PermissionDeniedError):
            reader.report("authed", 0, {"val_loss": 1.0})


def test_world_size_two_with_wait(live_server: ServerProcess) -> None:
    spec = {**PLATEAU, "world_size": 2}
    results: dict[int, Any] = {}
    with lrserve.Client(live_server.url) as client:
        client.create_run("ddp", spec)

        def rank(r: int) -> None:
            results[r] = client.report("ddp", 0, {"val_loss": 1.0 + r}, rank=r, wait=20)

        first = threading.Thread(target=rank, args=(0,))
        first.start()
        rank(1)
        first.join(30)
    assert results[0]["complete"] and results[1]["complete"]
    assert results[0]["groups"] == results[1]["groups"]


@pytest.mark.anyio
async def test_async_client_every_method(live_server: ServerProcess) -> None:
    expected = torch_lrs(SPEC, sequential, 12)
    async with lrserve.AsyncClient(live_server.url) as client:
        assert await client.healthz() and await client.readyz()
        run, created = await client.create_run("a1", SPEC)
        assert (
            run["id"] == "a1" and created and (await client.create_run("a1", SPEC)).created is False
        )
        assert (await client.get_run("a1"))["id"] == "a1"
        assert [r["id"] async for r in client.iter_runs(page_size=1)] == ["a1"]
        assert (await client.list_runs())["runs"][0]["id"] == "a1"
        got = await client.get_lr("a1", step=7)
        assert got["groups"]["head"]["lr"] == pytest.approx(expected[7][1], rel=1e-12)
        window = await client.get_lr_window("a1", 0, 12)
        assert window.values is not None
        assert window.values["backbone"]["lr"] == pytest.approx([r[0] for r in expected], rel=1e-12)
        assert (await client.get_lr_window("a1", 0, 12, etag=window.etag)).not_modified
        preview = await client.preview(SPEC, count=12)
        assert preview["groups"]["backbone"]["lr"] == pytest.approx(
            [r[0] for r in expected], rel=1e-12
        )
        curve = await client.get_curve("a1", 0, 12, 4)
        assert curve["steps"]
        report = await client.report("a1", 0, {"loss": 2.0})
        assert report["complete"]
        assert (await client.get_metrics("a1", "loss"))["points"][0]["value"] == 2.0
        with pytest.raises(lrserve.TooLateError) as late:  # the windows above leased step 5
            await client.override("a1", 5, "set", 0.05, groups=["head"])
        first = late.value.earliest_step
        assert first is not None and first > 12
        ovr = await client.override("a1", first, "set", 0.05, groups=["head"])
        assert ovr["overrides"] and ovr["leased_until"] < first  # first leaves headroom
        assert (await client.get_lr("a1", step=first))["groups"]["head"]["lr"] == 0.05
        amended, created = await client.amend(
            "a1", first + 300, {"type": "ConstantLR", "factor": 0.5}, restart=True
        )
        assert created and amended["amendments"][0]["from_step"] == first + 300
        assert not (await client.amend("a1", first + 300, {"type": "ConstantLR", "factor": 0.5},
                                       restart=True)).created  # fmt: skip
        withdrawn = await client.withdraw_override("a1", 1)
        assert withdrawn["overrides"][0]["until_step"] == withdrawn["leased_until"]
        types = [e["type"] for e in (await client.get_events("a1"))["events"]]
        assert types[0] == "created" and "override" in types and "amended" in types
        assert (await client.report("a1", 1, {"loss": 2.0}))["complete"]
        with pytest.raises(lrserve.ConflictError):
            await client.report("a1", 0, {"loss": 3.0})
        rewound = await client.rewind("a1", 0, key="k", note="from the top")
        assert rewound["branch"] == 1 and rewound["completed_step"] == 0
        assert (await client.rewind("a1", 0, key="k"))["version"] == rewound["version"]
        with pytest.raises(lrserve.RewindConflictError):
            await client.rewind("a1", 1, key="k")
        assert (await client.report("a1", 1, {"loss": 3.0}))["complete"]  # a new branch
        await client.delete_run("a1")
        with pytest.raises(lrserve.RunNotFoundError):
            await client.get_run("a1")


@pytest.mark.anyio
async def test_async_ranks_wait_for_each_other(live_server: ServerProcess) -> None:
    results: dict[int, Any] = {}
    async with lrserve.AsyncClient(live_server.url) as client:
        await client.create_run("ddp-a", {**PLATEAU, "world_size": 3})

        async def rank(r: int) -> None:
            results[r] = await client.report("ddp-a", 0, {"val_loss": 1.0}, rank=r, wait=20)

        async with anyio.create_task_group() as tg:
            for r in range(3):
                tg.start_soon(rank, r)
    assert all(results[r]["complete"] for r in range(3))
    assert all(results[r]["reported_ranks"] == 3 for r in range(3))
