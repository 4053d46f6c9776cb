"""The ``lrserve`` command against the real server: every subcommand, --json and tables.

Values are checked against torch's schedulers; ``--png`` must write a real PNG.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import lrserve
import pytest
import torch
from lrserve.cli import main
from torch.optim import lr_scheduler

from ..conftest import ServerProcess
from .conftest import sdk_env
from .test_client_live import SPEC, sequential, torch_lrs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(
    capsys: pytest.CaptureFixture[str], server: ServerProcess, *argv: str
) -> tuple[int, str, str]:
    code = main(["--url", server.url, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys: pytest.CaptureFixture[str], server: ServerProcess, *argv: str) -> Any:
    code, out, err = cli(capsys, server, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def run_server(live_server: ServerProcess) -> ServerProcess:
    with lrserve.Client(live_server.url) as client:
        client.create_run("cli-run", SPEC)
    return live_server


def test_runs_and_show(capsys: pytest.CaptureFixture[str], run_server: ServerProcess) -> None:
    code, out, _ = cli(capsys, run_server, "runs")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[0] == "id" and {"version", "step", "created_at"} <= set(header.split())
    assert row.split()[0] == "cli-run"
    listed = cli_json(capsys, run_server, "runs", "--all")
    assert [r["id"] for r in listed["runs"]] == ["cli-run"]

    code, out, _ = cli(capsys, run_server, "show", "cli-run")
    assert code == 0
    assert out.splitlines()[0].split() == ["run", "cli-run"]
    assert "backbone" in out and "SequentialLR" in out
    shown = cli_json(capsys, run_server, "show", "cli-run")
    assert shown["id"] == "cli-run" and shown["spec"]["groups"][1]["name"] == "head"


def test_lr_matches_torch(capsys: pytest.CaptureFixture[str], run_server: ServerProcess) -> None:
    expected = torch_lrs(SPEC, sequential, 30)
    got = cli_json(capsys, run_server, "lr", "cli-run", "--step", "17")
    assert got["step"] == 17
    assert got["groups"]["head"]["lr"] == pytest.approx(expected[17][1], rel=1e-12)

    code, out, _ = cli(capsys, run_server, "lr", "cli-run", "--step", "17")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert out.splitlines()[1].split() == ["group", "lr", "momentum"]
    assert float(rows["backbone"][0]) == pytest.approx(expected[17][0], rel=1e-5)
    assert rows["head"] == [f"{expected[17][1]:.6g}", "-"]

    window = cli_json(capsys, run_server, "lr", "cli-run", "--start", "3", "--count", "20")
    assert window["groups"]["backbone"]["lr"] == pytest.approx(
        [r[0] for r in expected[3:23]], rel=1e-12
    )
    code, out, _ = cli(capsys, run_server, "lr", "cli-run", "--count", "30", "--rows", "4")
    lines = out.splitlines()
    assert lines[0].split() == ["step", "backbone.lr", "backbone.momentum", "head.lr"]
    assert [int(line.split()[0]) for line in lines[1:5]] == [0, 10, 19, 29]


def test_report_events_metrics(
    capsys: pytest.CaptureFixture[str], run_server: ServerProcess
) -> None:
    expected = torch_lrs(SPEC, sequential, 30)
    code, out, err = cli(capsys, run_server, "report", "cli-run", "--step", "4", "loss=0.25")
    assert code == 0, err
    assert "complete        yes" in out and "values from step 5" in out
    result = cli_json(capsys, run_server, "report", "cli-run", "acc=0.5", "--step", "5", "loss=nan")
    assert result["complete"] and result["applies_from"] == 6
    assert result["groups"]["head"]["lr"] == pytest.approx(expected[6][1], rel=1e-12)

    history = cli_json(capsys, run_server, "metrics", "cli-run", "loss")
    assert history["points"][0]["value"] == 0.25
    events = cli_json(capsys, run_server, "events", "cli-run")["events"]
    assert events[0]["type"] == "created"
    code, out, _ = cli(capsys, run_server, "events", "cli-run")
    assert out.splitlines()[0].split() == ["seq", "type", "step", "at", "data"]
    assert out.splitlines()[1].split()[:2] == ["1", "created"]

    # A conflicting report: exit 1 with the server's explanation.
    code, _, err = cli(capsys, run_server, "report", "cli-run", "--step", "4", "loss=9")
    assert code == 1 and "409" in err


def test_create_override_delete(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    spec_file = tmp_path / "run.json"
    spec_file.write_text(json.dumps(SPEC))
    made = cli_json(capsys, live_server, "create", "c2", str(spec_file))
    assert made["created"] is True
    assert cli_json(capsys, live_server, "create", "c2", str(spec_file))["created"] is False
    run = cli_json(
        capsys, live_server, "override", "c2", "--from-step", "3", "--set", "0.02",
        "--group", "head", "--note", "manual",
    )  # fmt: skip
    assert run["overrides"][-1]["value"] == 0.02
    assert cli_json(capsys, live_server, "lr", "c2", "--step", "3")["groups"]["head"]["lr"] == 0.02
    code, out, _ = cli(capsys, live_server, "delete", "c2")
    assert code == 0 and "deleted c2" in out
    code, _, err = cli(capsys, live_server, "show", "c2")
    assert code == 1 and "c2" in err
    assert cli(capsys, live_server, "delete", "c2", "--missing-ok")[0] == 0


def test_preview_against_torch_with_png(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    spec = {
        "groups": [{"name": "g", "lr": 0.1, "momentum": 0.95}],
        "schedule": {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 200},
    }
    spec_file = tmp_path / "onecycle.json"
    spec_file.write_text(json.dumps(spec))
    expected = torch_lrs(
        spec, lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=200), 200
    )
    png = tmp_path / "onecycle.png"
    code, out, err = cli(
        capsys, live_server, "preview", str(spec_file), "--steps", "200", "--png", str(png)
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["step", "g.lr", "g.momentum"]
    for line in lines[1:21]:
        step, lr = int(line.split()[0]), float(line.split()[1])
        assert lr == pytest.approx(expected[step][0], rel=1e-5, abs=1e-12)
    assert f"wrote {png}" in out
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000

    full = cli_json(capsys, live_server, "preview", str(spec_file), "--steps", "200")
    assert full["groups"]["g"]["lr"] == pytest.approx([r[0] for r in expected], rel=1e-12)


def test_invalid_spec_is_exit_1_with_field_errors(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    spec_file = tmp_path / "bad.json"
    spec_file.write_text(
        json.dumps({"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "Nope"}})
    )
    code, out, err = cli(capsys, live_server, "--json", "preview", str(spec_file))
    assert code == 1
    problem = json.loads(out)["error"]
    assert problem["status"] == 422 and problem["type"] == "/problems/validation-error"
    assert problem["errors"] and "422" in err


def test_auth_errors(capsys: pytest.CaptureFixture[str], server_factory: Any) -> None:
    server = server_factory(token="tok")
    code, _, err = cli(capsys, server, "runs")
    assert code == 1 and "401" in err
    code, _, _ = cli(capsys, server, "--token", "tok", "runs")
    assert code == 0


def test_console_entry_point_and_serve_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lrserve", "serve", "--help"],
        capture_output=True,
        text=True,
        env=sdk_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--database" in proc.stdout and "--port" in proc.stdout


def test_steering_commands_rewind_override_amend_withdraw(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    """The OPT-style restart: rewind to the checkpoint, lower the rate by 10%, later cool down."""
    spec = {
        "groups": [{"name": "g", "lr": 0.1}],
        "schedule": {"type": "CosineAnnealingLR", "T_max": 1000},
    }
    spec_file = tmp_path / "run.json"
    spec_file.write_text(json.dumps(spec))
    cli_json(capsys, live_server, "create", "opt", str(spec_file))
    for step in range(40):
        assert cli(capsys, live_server, "report", "opt", "--step", str(step), "loss=1")[0] == 0
    code, out, _ = cli(
        capsys, live_server, "rewind", "opt", "--to-step", "20", "--note", "spike at 31"
    )
    assert code == 0, out
    assert "from step 39 to step 20" in out and "19 report(s)" in out and "branch 1" in out
    code, out, _ = cli(
        capsys, live_server, "override", "opt", "--from-step", "21", "--scale", "0.9"
    )
    assert code == 0 and "from step 21" in out
    # Too late: a trainer took a window; the error names the earliest step.
    with lrserve.Client(live_server.url) as client:
        client.get_lr_window("opt", 21, 100)
        earliest = client.get_run("opt")["leased_until"] + 64  # (one lease grain of headroom)
    cooldown = tmp_path / "cooldown.json"
    cooldown.write_text(json.dumps({"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0,
                                    "total_iters": 100}))  # fmt: skip
    code, _, err = cli(capsys, live_server, "amend", "opt", str(cooldown), "--from-step", "50")
    assert code == 1 and "too late" in err and str(earliest) in err
    code, out, _ = cli(
        capsys, live_server, "amend", "opt", str(cooldown), "--from-step", str(earliest),
        "--restart", "--base", "current", "--note", "cooldown",
    )  # fmt: skip
    assert code == 0 and f"amended: opt from step {earliest}" in out and "LinearLR" in out
    code, out, _ = cli(
        capsys, live_server, "override", "opt", "--withdraw", "1", "--from-step", str(earliest)
    )
    assert code == 0 and "withdrew override 1" in out and f"from step {earliest}" in out
    code, out, _ = cli(capsys, live_server, "show", "opt")
    assert "amendments" in out and "rewinds" in out and "spike at 31" in out
    # The record against torch: cosine, x0.9 on [21, earliest), then the cooldown from the
    # value in force at earliest - 1 (overrides stay on top: withdrawn there).
    values = cli_json(capsys, live_server, "lr", "opt", "--start", "0", "--count",
                      str(earliest + 101))["groups"]["g"]["lr"]  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched: Any = lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    want = []
    for s in range(earliest + 101):
        if s == earliest:
            del opt.param_groups[0]["initial_lr"]
            sched = lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=100)
        lr = opt.param_groups[0]["lr"]
        want.append(lr * (0.9 if 21 <= s < earliest else 1.0))
        opt.step()
        if s + 1 != earliest:
            sched.step()
    for s in range(earliest + 101):
        assert values[s] == pytest.approx(want[s], rel=1e-12, abs=1e-18), s


def test_output_into_a_closed_pipe_is_not_a_traceback(live_server: ServerProcess) -> None:
    """`lrserve lr RUN --count N | head -1`: the reader goes away; no BrokenPipeError."""
    with lrserve.Client(live_server.url) as client:
        client.create_run("pipe", SPEC)
    command = (
        f"{sys.executable} -m lrserve --url {live_server.url} lr pipe --start 0 --count 20000 "
        "--rows 20000 | head -n 1"
    )
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env=sdk_env(),
    )
    assert proc.stdout.split()[0] == "step", proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr


# -- issue 14: CLI polish, against the real server ------------------------------------------


def test_a_mistyped_type_or_argument_gets_a_suggestion_once(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    typo = tmp_path / "typo.json"
    body = {"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "CosineAnealingLR"}}
    typo.write_text(json.dumps(body))
    code, out, err = cli(capsys, live_server, "preview", str(typo))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "lrserve preview: error: 422 Validation error: body.schedule: unknown schedule type "
        "'CosineAnealingLR'; did you mean 'CosineAnnealingLR'? (docs/schedules.md lists every "
        "type, 56 in all)"
    ]
    gama = tmp_path / "gama.json"
    gama.write_text(json.dumps({"type": "StepLR", "step_size": 3, "gama": 0.5}))
    code, _, err = cli(capsys, live_server, "preview", str(gama))
    assert code == 1
    assert err.splitlines() == [
        "lrserve preview: error: 422 Validation error: body.schedule.StepLR.gama: unknown "
        "argument 'gama' for StepLR; did you mean 'gamma'? (StepLR takes: step_size, gamma)"
    ]


def test_a_bare_node_sent_as_a_run_body_is_named_as_such(live_server: ServerProcess) -> None:
    node = {"type": "StepLR", "step_size": 3, "gamma": 0.5}
    with lrserve.Client(live_server.url) as client:
        for send in (lambda: client.preview(node), lambda: client.create_run("bare", node)):
            with pytest.raises(lrserve.ValidationError) as info:
                send()
            err = info.value
            assert err.errors == [{"loc": ["body"], "msg": err.detail.removeprefix("body: ")}]
            assert "this is a single schedule node (type 'StepLR'), not a run body" in err.detail
            assert 'put it under "schedule"' in err.detail
        with pytest.raises(lrserve.RunNotFoundError):
            client.get_run("bare")  # nothing was written


def test_preview_and_create_from_a_bare_node_match_torch(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    node = tmp_path / "step.json"
    node.write_text(json.dumps({"type": "StepLR", "step_size": 3, "gamma": 0.5}))
    spec = {"groups": [{"name": "a", "lr": 0.1}, {"name": "b", "lr": 1.0}],
            "schedule": {"type": "StepLR", "step_size": 3, "gamma": 0.5}}  # fmt: skip
    expected = torch_lrs(spec, lambda opt: lr_scheduler.StepLR(opt, 3, 0.5), 12)
    got = cli_json(capsys, live_server, "preview", str(node), "--steps", "12",
                   "--group", "a=0.1", "--group", "b=1")["groups"]  # fmt: skip
    assert got["a"]["lr"] == pytest.approx([r[0] for r in expected], rel=1e-12)
    assert got["b"]["lr"] == pytest.approx([r[1] for r in expected], rel=1e-12)
    factors = cli_json(capsys, live_server, "preview", str(node), "--steps", "12")["groups"]
    assert factors["default"]["lr"] == pytest.approx([r[1] for r in expected], rel=1e-12)
    made = cli_json(capsys, live_server, "create", "bare", str(node), "--lr", "0.1")
    assert made["created"] and made["run"]["spec"]["groups"][0]["name"] == "default"
    assert cli_json(capsys, live_server, "lr", "bare", "--step", "7")["groups"]["default"][
        "lr"
    ] == pytest.approx(expected[7][0], rel=1e-12)


def test_a_preview_longer_than_a_window(
    capsys: pytest.CaptureFixture[str], live_server: ServerProcess, tmp_path: Path
) -> None:
    node = tmp_path / "cosine.json"
    node.write_text(json.dumps({"type": "CosineAnnealingLR", "T_max": 1_000_000, "eta_min": 0.01}))
    answer = cli_json(capsys, live_server, "preview", str(node), "--steps", "1000000")
    steps, lrs = answer["steps"], answer["groups"]["default"]["lr"]
    assert steps[0] == 0 and steps[-1] == 999_999 and 100 < len(steps) <= 2000
    for step, lr in zip(steps, lrs, strict=True):
        want = 0.01 + 0.99 * (1 + math.cos(math.pi * step / 1_000_000)) / 2
        assert lr == pytest.approx(want, rel=1e-9), step
    code, out, err = cli(capsys, live_server, "preview", str(node), "--steps", "1000000",
                         "--rows", "3")  # fmt: skip
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["0", "500000", "999999"]
    assert f"(3 of 1000000 steps shown, from {len(steps)} the server picked)" in out


def test_metrics_lists_the_names_reported(
    capsys: pytest.CaptureFixture[str], run_server: ServerProcess
) -> None:
    code, out, _ = cli(capsys, run_server, "metrics", "cli-run")
    assert code == 0 and out == "(no metric reported to cli-run yet)\n"
    assert cli(capsys, run_server, "report", "cli-run", "--step", "0", "loss=1", "acc=0.5")[0] == 0
    code, out, _ = cli(capsys, run_server, "metrics", "cli-run")
    assert code == 0 and sorted(out.split()) == ["acc", "loss"]
    listed = cli_json(capsys, run_server, "metrics", "cli-run")
    assert listed["run"] == "cli-run" and sorted(listed["names"]) == ["acc", "loss"]


def test_show_into_a_closed_pipe_is_not_a_traceback(live_server: ServerProcess) -> None:
    """`lrserve show RUN | head -1` on a run whose listing is bigger than a pipe's buffer."""
    with lrserve.Client(live_server.url) as client:
        client.create_run("big", {**SPEC, "metadata": {"notes": "x" * 300_000}})
    command = f"{sys.executable} -m lrserve --url {live_server.url} show big | head -n 1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env=sdk_env(),
    )
    assert proc.stdout.split() == ["run", "big"], proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
