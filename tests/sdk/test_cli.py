"""The ``lrserve`` command: exit codes, --json output, tables, preview PNGs.

The first part drives ``main(argv)`` against a scripted HTTP server (error paths that a
healthy server cannot produce on demand); test_cli_live.py runs it against the real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lrserve.cli import main

from .conftest import Reply, ScriptedServer, sdk_env

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_api_error_exit_1_prints_the_server_detail(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.play(Reply.problem(404, "run-not-found", "no run with id 'nope'"))
    code, out, err = run_cli(capsys, "--url", scripted.url, "show", "nope")
    assert code == 1
    assert "no run with id 'nope'" in err and out == ""


def test_api_error_with_json_prints_the_problem(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    errors = [{"loc": ["body", "step"], "msg": "bad"}]
    scripted.play(Reply.problem(422, "validation-error", "step: bad", errors))
    code, out, err = run_cli(
        capsys, "report", "r1", "--step", "1", "loss=1", "--url", scripted.url, "--json"
    )
    assert code == 1
    assert json.loads(out) == {
        "error": {
            "type": "/problems/validation-error",
            "title": "Validation error",
            "status": 422,
            "detail": "step: bad",
            "errors": errors,
        }
    }
    assert "step: bad" in err


def test_cannot_connect_exit_3(dead_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--url", dead_url, "--retries", "0", "runs")
    assert out == ""
    assert code == 3
    assert f"cannot connect to lrserve at {dead_url}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show"], "the following arguments are required: run"),
        (["lr", "r1", "--step", "-1"], "is negative"),
        (["report", "r1", "loss=1"], "--step"),
        (["report", "r1", "--step", "1", "loss"], "expected name=value"),
        (["report", "r1", "--step", "1", "loss=low"], "'low' is not a number"),
        (["report", "r1", "--step", "1"], "at least one metric"),
        (["preview", "/nonexistent/spec.json"], "cannot read /nonexistent/spec.json"),
        (["--url", "ftp://x", "runs"], "invalid server URL"),
        (["show", "a/b"], "invalid run id"),
        (["override", "r1", "--from-step", "3"], "one of the arguments --scale --set --withdraw"),
        (["override", "r1", "--scale", "0.5"], "--from-step is required"),
        (["amend", "r1", "x.json"], "--from-step"),
        (["rewind", "r1"], "--to-step"),
        (["bogus"], "invalid choice"),
        ([], "usage:"),
    ],
)
def test_usage_errors_exit_2(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    scripted.play(Reply(200, {}))
    code, _, err = run_cli(capsys, *(["--url", scripted.url] if argv else []), *argv)
    assert code == 2
    assert message in err
    assert scripted.seen == []


def test_bad_spec_json_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text("{not json")
    code, _, err = run_cli(capsys, "preview", str(spec))
    assert code == 2 and "is not valid JSON" in err
    spec.write_text("[1, 2]")
    code, _, err = run_cli(capsys, "preview", str(spec))
    assert code == 2 and "expected a JSON object" in err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "preview" in out and "exit codes" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("lrserve ")


def test_env_url_and_token(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.play(
        Reply(200, {"runs": [{"id": "a", "version": 2, "step": None}], "next_cursor": None})
    )
    monkeypatch.setenv("LRSERVE_URL", scripted.url)
    monkeypatch.setenv("LRSERVE_TOKEN", "tok")
    code, out, _ = run_cli(capsys, "runs")
    # (The table's columns are the runs command's business: here, that the run is listed.)
    assert code == 0 and out.splitlines()[1].split()[0] == "a" and "2" in out.splitlines()[1]
    code, _, _ = run_cli(capsys, "runs", "--token", "other")
    assert code == 0
    assert [s.headers["authorization"] for s in scripted.seen] == ["Bearer tok", "Bearer other"]


def test_preview_table_and_png_from_a_scripted_answer(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    n = 1000
    groups = {
        "backbone": {"lr": [0.1 * 0.99**i for i in range(n)], "momentum": [0.9] * n},
        "head": {"lr": [0.01] * n},
    }
    scripted.play(Reply(200, {"start": 0, "count": n, "groups": groups}))
    spec = tmp_path / "run.json"
    spec.write_text(json.dumps({"groups": [], "schedule": {}, "world_size": 4}))
    png = tmp_path / "curve.png"
    code, out, err = run_cli(
        capsys, "--url", scripted.url, "preview", str(spec), "--steps", str(n),
        "--rows", "5", "--png", str(png),
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["step", "backbone.lr", "backbone.momentum", "head.lr"]
    assert [int(line.split()[0]) for line in lines[1:6]] == [0, 250, 500, 749, 999]
    assert float(lines[-3].split()[1]) == pytest.approx(0.1 * 0.99**999, rel=1e-5)
    assert "5 of 1000 steps shown" in out
    # The run-only key (world_size) is not sent to the preview endpoint.
    assert scripted.seen[0].body == {"groups": [], "schedule": {}, "start": 0, "count": n}
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_python_dash_m_lrserve(dead_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lrserve", "--url", dead_url, "--retries", "0", "--json", "runs"],
        capture_output=True,
        text=True,
        env=sdk_env(),
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot connect" in proc.stderr


# -- issue 14: CLI polish ------------------------------------------------------------------


def test_a_validation_error_is_printed_once(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # lrserve's detail is the first field error itself; the lines below list the others.
    errors = [
        {"loc": ["body", "step"], "msg": "must be >= 0"},
        {"loc": ["body", "rank"], "msg": "must be <= 4095"},
    ]
    scripted.play(
        Reply.problem(422, "validation-error", "body.step: must be >= 0 (and 1 more)", errors)
    )
    code, _, err = run_cli(capsys, "--url", scripted.url, "report", "r1", "--step", "1", "x=1")
    assert code == 1
    assert err.count("body.step: must be >= 0") == 1, err
    assert err.count("body.rank: must be <= 4095") == 1, err
    assert err.splitlines() == [
        "lrserve report: error: 422 Validation error: body.step: must be >= 0 (and 1 more)",
        "  body.rank: must be <= 4095",
    ]


def _spec_file(tmp_path: Path, value: object) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(value))
    return str(path)


PREVIEW_ANSWER = {"start": 0, "count": 1, "groups": {"default": {"lr": [1.0]}}}
STEP_NODE = {"type": "StepLR", "step_size": 3}


@pytest.mark.parametrize(
    ("options", "groups"),
    [
        ([], [{"name": "default", "lr": 1.0}]),
        (["--lr", "0.1"], [{"name": "default", "lr": 0.1}]),
        (
            ["--group", "backbone=0.01", "--group", "head=0.1"],
            [{"name": "backbone", "lr": 0.01}, {"name": "head", "lr": 0.1}],
        ),
    ],
)
def test_preview_of_a_bare_schedule_node_sends_a_run_body(
    scripted: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    groups: list[dict[str, object]],
) -> None:
    scripted.play(Reply(200, PREVIEW_ANSWER))
    spec = _spec_file(tmp_path, STEP_NODE)
    code, _, err = run_cli(capsys, "--url", scripted.url, "preview", spec, "--steps", "1", *options)
    assert code == 0, err
    assert scripted.seen[0].body == {
        "groups": groups,
        "schedule": STEP_NODE,
        "start": 0,
        "count": 1,
    }


def test_create_from_a_bare_node_needs_its_groups(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.play(Reply(201, {"id": "r1", "version": 1}))
    spec = _spec_file(tmp_path, STEP_NODE)
    code, _, err = run_cli(capsys, "--url", scripted.url, "create", "r1", spec)
    assert code == 2 and "single schedule node" in err and "--lr LR or --group NAME=LR" in err
    assert scripted.seen == []
    code, _, err = run_cli(capsys, "--url", scripted.url, "create", "r1", spec, "--lr", "0.5")
    assert code == 0, err
    assert scripted.seen[0].method == "PUT"
    assert scripted.seen[0].body == {
        "groups": [{"name": "default", "lr": 0.5}],
        "schedule": STEP_NODE,
    }


def test_group_options_do_not_replace_a_bodys_own_groups(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.play(Reply(200, PREVIEW_ANSWER))
    body = {"groups": [{"name": "g", "lr": 0.1}], "schedule": STEP_NODE}
    code, _, err = run_cli(
        capsys, "--url", scripted.url, "preview", _spec_file(tmp_path, body), "--lr", "1"
    )
    assert code == 2 and "has its own groups" in err
    assert scripted.seen == []
    # A body without groups takes them from --group.
    no_groups = {"schedule": STEP_NODE}
    code, _, err = run_cli(
        capsys, "--url", scripted.url, "preview", _spec_file(tmp_path, no_groups),
        "--steps", "1", "--group", "a=0.5",
    )  # fmt: skip
    assert code == 0, err
    assert scripted.seen[0].body["groups"] == [{"name": "a", "lr": 0.5}]


def test_a_long_preview_asks_the_server_to_decimate(
    scripted: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server's decimated answer: uneven steps (each bucket's min and max), first and last.
    steps = [0, 1, 99_999, 100_000, 299_999, 300_000, 500_000, 999_998, 999_999]
    answer = {
        "start": 0,
        "count": len(steps),
        "steps": steps,
        "groups": {"default": {"lr": [float(s) for s in steps]}},
    }
    scripted.play(Reply(200, answer))
    spec = _spec_file(tmp_path, STEP_NODE)
    code, out, err = run_cli(
        capsys, "--url", scripted.url, "preview", spec, "--steps", "1000000", "--rows", "3"
    )
    assert code == 0, err
    sent = scripted.seen[0].body
    assert sent["start"] == 0 and sent["stop"] == 1_000_000 and sent["points"] == 2000
    assert "count" not in sent
    lines = out.splitlines()
    # The rows nearest to steps 0, 500000 and 999999, and the true number of steps.
    assert [int(line.split()[0]) for line in lines[1:4]] == [0, 500_000, 999_999]
    assert lines[4] == f"(3 of 1000000 steps shown, from {len(steps)} the server picked)"
    # Up to the window's length a preview still asks for every step.
    scripted.play(Reply(200, PREVIEW_ANSWER))
    assert run_cli(capsys, "--url", scripted.url, "preview", spec, "--steps", "100000")[0] == 0
    assert scripted.seen[0].body["count"] == 100_000 and "points" not in scripted.seen[0].body


def test_metrics_without_a_name_lists_the_names(
    scripted: ScriptedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.play(Reply(200, {"run": "r1", "names": ["acc", "loss"]}))
    code, out, err = run_cli(capsys, "--url", scripted.url, "metrics", "r1")
    assert code == 0, err
    assert out.splitlines() == ["acc", "loss"]
    seen = scripted.seen[0]
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1/runs/r1/metrics", {})
    # A server that cannot list them: what to do instead, not its 422.
    scripted.play(
        Reply.problem(
            422,
            "validation-error",
            "query.name: Field required",
            [{"loc": ["query", "name"], "msg": "Field required"}],
        )
    )
    code, _, err = run_cli(capsys, "--url", scripted.url, "metrics", "r1")
    assert code == 2 and "give the NAME" in err
