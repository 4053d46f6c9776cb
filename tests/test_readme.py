"""The README's curl walkthrough, run command by command against a live server.

The walkthrough is the fenced block marked ```` ```bash walkthrough ```` in README.md. Each
command runs with bash, with the README's ``http://127.0.0.1:8000`` replaced by the live
server's URL (``$LRSERVE_URL`` and ``$LRSERVE_TOKEN`` are set too, for a README that uses
them). Every command must exit 0 and print JSON that is not a problem document; the answers are
then checked for sense: a report's answer carries a decision, rates are finite numbers, every
reduction a report announced shows up as a ``reduced`` event at its step, and the events list
what happened in order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8000"
FENCE = re.compile(r"^```bash walkthrough[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def walkthrough_source() -> tuple[Path, str]:
    """The walkthrough block of README.md."""
    path = ROOT / "README.md"
    match = FENCE.search(path.read_text())
    if match is None:
        pytest.fail("README.md has no ```bash walkthrough block")
    return path, match.group(1)


def commands(block: str) -> list[str]:
    """Shell commands of the block: comments and blank lines dropped, continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def test_walkthrough_block_is_well_formed() -> None:
    path, block = walkthrough_source()
    cmds = commands(block)
    assert len(cmds) >= 5, f"{path}: expected a walkthrough of several commands"
    for cmd in cmds:
        # shlex must parse it (balanced quotes), and every command must talk to the README's URL.
        words = shlex.split(cmd)
        assert words[0] == "curl", cmd
        assert README_URL in cmd or "$LRSERVE_URL" in cmd, cmd
    joined = "\n".join(cmds)
    for needle in ("-X PUT", "/lr", "/metrics", "/events"):
        assert needle in joined, f"the walkthrough never uses {needle}"


def _run(cmd: str, server: ServerProcess, token: str | None) -> Any:
    cmd = cmd.replace(README_URL, server.url)
    env = {**os.environ, "LRSERVE_URL": server.url}
    if token:
        env["LRSERVE_TOKEN"] = token
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, f"{cmd}\nexit {result.returncode}: {result.stderr}"
    try:
        body = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{cmd}\ndid not print JSON: {result.stdout[:500]!r}")
    if isinstance(body, dict) and str(body.get("type", "")).startswith("/problems/"):
        pytest.fail(f"{cmd}\nanswered with a problem: {body}")
    return body


def _finite_rates(groups: dict[str, Any]) -> None:
    assert groups
    for fields in groups.values():
        for value in fields.values():
            values = value if isinstance(value, list) else [value]
            assert values and all(isinstance(v, float | int) and math.isfinite(v) for v in values)


def test_walkthrough_runs_against_a_live_server(
    server_factory: Callable[..., ServerProcess],
) -> None:
    _, block = walkthrough_source()
    cmds = commands(block)
    token = "walkthrough-token" if "LRSERVE_TOKEN" in block else None
    server = server_factory(token=token)

    seen_decision = False
    reduced_at: list[int] = []
    lr_answers: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for cmd in cmds:
        body = _run(cmd, server, token)
        if re.search(r"-X\s*PUT\b", cmd) and "/v1/runs/" in cmd:
            assert {"id", "spec", "version"} <= set(body), body
        elif "/metrics" in cmd and re.search(r"-X\s*POST\b", cmd):
            assert "decision" in body, body
            seen_decision = True
            assert body["complete"] is True, body
            _finite_rates(body["groups"])
            if body["decision"] and body["decision"]["reduced"]:
                reduced_at.append(body["step"])
        elif "/lr" in cmd:
            assert body["run"] and isinstance(body["version"], int), body
            _finite_rates(body["groups"])
            lr_answers.append(body)
        elif "/events" in cmd:
            events = body["events"]
    assert seen_decision, "the walkthrough never reports a metric"
    assert lr_answers, "the walkthrough never reads rates"
    assert events, "the walkthrough never lists events"

    types = [e["type"] for e in events]
    assert types[0] == "created"
    assert "report_completed" in types
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    # A reduction decided in a report is visible as an event at the same step.
    assert sorted(e["step"] for e in events if e["type"] == "reduced") == sorted(reduced_at)
    if "reduced" in open_walkthrough_comments(block):
        assert reduced_at, "the walkthrough promises a reduction but no report reduced"


def open_walkthrough_comments(block: str) -> str:
    """The block's comment lines, lower-cased (what the walkthrough tells the reader)."""
    return "\n".join(line.lower() for line in block.splitlines() if line.lstrip().startswith("#"))
