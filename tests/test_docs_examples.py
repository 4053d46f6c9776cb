"""The examples of README.md and docs/*.md, run against a live server as written.

Fenced blocks are tagged by their info string:

- ```` ```json file=NAME ````: written to NAME in the document's working directory before the
  document's commands run (the files its examples use);
- ```` ```console run ````: a shell session: every ``$ command`` runs in that directory with
  ``LRSERVE_URL`` pointing at the live server (``lrserve ...`` commands in-process, through
  ``lrserve.cli.main``, anything else with bash), and what it prints (standard output, then
  standard error) must be the lines that follow it, up to the next ``$``;
- ```` ```python run ````: executed in one namespace per document (``http://lrs:8000`` becomes
  the live server's URL); a ```` ```text output ```` block right after it is what it must print;
- ```` ```python run torch ````: a training loop, executed with a small real model: ``opt``
  (SGD, one group), ``model``, ``loader`` (20 batches), ``evaluate``, ``eval_every`` (5) and
  ``spec`` (a StepLR); its ``sched`` must have stepped through the loader.

Each document's blocks run in order, on one fresh server. Blocks run elsewhere: ```` ```bash
walkthrough ```` (tests/test_readme.py) and ```` ```python example ````
(tests/sdk/frameworks/test_docs_examples.py). Every ```` ```json ```` block of every document
must parse, and the request bodies among them must be valid for the server (``json shape``
marks a shape with ``...`` in it). docs/api.md's bodies are checked against the request model of
the endpoint they are written under.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_URL = "http://lrs:8000"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
HEADING = re.compile(r"^#{2,3} (.+)$", re.M)
# Tags this module runs, and tags other tests run (a typo in a tag must not go unnoticed).
RUN_TAGS = {"console run", "python run", "python run torch", "text output", "json shape"}
OTHER_TAGS = {"bash walkthrough", "python example"}


@dataclass(frozen=True)
class Block:
    """One fenced block of a document."""

    doc: Path
    line: int
    info: str
    body: str
    heading: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """Every fenced block of ``doc`` with its info string and the heading it is under."""
    text = doc.read_text()
    headings = [(m.start(), m.group(1).strip()) for m in HEADING.finditer(text)]
    out = []
    for m in FENCE.finditer(text):
        heading = ""
        for start, title in headings:
            if start < m.start():
                heading = title
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(doc, line, m.group(1).strip(), m.group(2), heading))
    return out


def _runnable(doc: Path) -> bool:
    return any(b.info in RUN_TAGS - {"json shape"} for b in blocks(doc))


def test_tags_are_known() -> None:
    for doc in DOCS:
        for block in blocks(doc):
            words = block.info.split()
            if words[:1] == ["json"] and len(words) == 2:
                assert words[1].startswith("file=") or words[1] == "shape", block.where
            elif len(words) > 1:
                assert block.info in RUN_TAGS | OTHER_TAGS, f"{block.where}: tag {block.info!r}"


def test_the_cli_sessions_of_the_sdk_page_are_run() -> None:
    """docs/sdk.md documents the command: its sessions must be tagged to run."""
    tags = [b.info for b in blocks(ROOT / "docs" / "sdk.md")]
    assert tags.count("console run") >= 3 and "python run" in tags
    assert "console" not in tags, "an untagged console block in docs/sdk.md: tag it run"


# -- JSON examples ----------------------------------------------------------------------


def _validators() -> dict[str, Callable[[Any], Any]]:
    from service.api import schemas
    from service.runs.model import RunSpec
    from service.schedules.spec import schedule_adapter

    return {
        "PUT /v1/runs/{run_id}": RunSpec.model_validate,
        "GET /v1/runs/{run_id}/lr": schemas.StepValuesOut.model_validate,
        "POST /v1/runs/{run_id}/metrics": schemas.ReportIn.model_validate,
        "POST /v1/runs/{run_id}/amendments": schemas.AmendmentIn.model_validate,
        "POST /v1/runs/{run_id}/rewind": schemas.RewindIn.model_validate,
        "POST /v1/runs/{run_id}/overrides": schemas.OverrideIn.model_validate,
        "POST /v1/schedules/preview": schemas.PreviewIn.model_validate,
        "LR range test": schedule_adapter.validate_python,
    }


def _json_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc) if b.info.split()[:1] == ["json"]]


@pytest.mark.parametrize("block", _json_blocks(), ids=lambda b: b.where)
def test_json_examples_are_valid(block: Block) -> None:
    if block.info == "json shape":
        return
    try:
        value = json.loads(block.body)
    except json.JSONDecodeError as exc:
        pytest.fail(f"{block.where}: not JSON ({exc}); tag a shape with '```json shape'")
    from service.runs.model import RunSpec
    from service.schedules.spec import NODE_TYPES, schedule_adapter

    validators = _validators()
    if block.doc.name == "api.md" and block.heading in validators:
        validators[block.heading](value)
    elif isinstance(value, dict) and "groups" in value and "schedule" in value:
        RunSpec.model_validate(value)  # a run body
    elif isinstance(value, dict) and value.get("type") in NODE_TYPES and "gama" not in value:
        schedule_adapter.validate_python(value)  # a schedule node (the typo examples aside)


def test_api_doc_bodies_are_checked() -> None:
    """Guards the test above: docs/api.md's request examples meet their models."""
    checked = {b.heading for b in _json_blocks() if b.doc.name == "api.md"}
    assert {"PUT /v1/runs/{run_id}", "POST /v1/runs/{run_id}/metrics"} <= checked


def test_every_schedule_type_is_in_the_schedules_page() -> None:
    """The server's unknown-type message sends people to docs/schedules.md for the list."""
    from service.schedules.spec import NODE_TYPES

    text = (ROOT / "docs" / "schedules.md").read_text()
    missing = [
        name
        for name in NODE_TYPES
        if f"`{name}`" not in text and f"`{name.split('.', 1)[-1]}`" not in text
    ]
    assert not missing, f"docs/schedules.md does not list {missing}"


# -- sessions against a live server -----------------------------------------------------


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


def _console(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a console session."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block.where}: output before the first '$ ' command"
            steps[-1][1].append(line.rstrip())
    return steps


def _run_command(command: str, server: ServerProcess) -> str:
    words = shlex.split(command)
    if words[0] == "lrserve" and not re.search(r"[|;&<>$`]", command):
        from lrserve.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(words[1:])
        return out.getvalue() + err.getvalue()
    proc = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LRSERVE_URL": server.url},
    )
    return proc.stdout + proc.stderr


def _torch_namespace() -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.99, 1.0])
    return {
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "model": model,
        "loader": [torch.randn(8, 4) for _ in range(20)],
        "evaluate": lambda: next(losses),
        "eval_every": 5,
        "spec": {"schedule": {"type": "StepLR", "step_size": 5, "gamma": 0.5}},
    }


def _exec(code: str, namespace: dict[str, Any], block: Block) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, block.where, "exec"), namespace)
    return out.getvalue()


def _check(block: Block, what: str, got: list[str], want: list[str]) -> None:
    if got != want:
        printed, shown = "\n".join(got), "\n".join(want)
        pytest.fail(f"{block.where}: {what} printed\n{printed}\nbut the doc shows\n{shown}")


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if _runnable(d)], ids=lambda d: str(d.relative_to(ROOT))
)
def test_doc_examples_run_against_a_live_server(
    doc: Path,
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = server_factory()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LRSERVE_URL", server.url)
    monkeypatch.delenv("LRSERVE_TOKEN", raising=False)
    doc_blocks = blocks(doc)
    for block in doc_blocks:
        words = block.info.split()
        if words[:1] == ["json"] and len(words) == 2 and words[1].startswith("file="):
            (tmp_path / words[1].removeprefix("file=")).write_text(block.body)
    namespace: dict[str, Any] = {}
    for i, block in enumerate(doc_blocks):
        if block.info == "console run":
            if "--png" in block.body:
                pytest.importorskip("matplotlib")
            for command, want in _console(block):
                got = _lines(_run_command(command.replace(DOC_URL, server.url), server))
                _check(block, f"$ {command}", got, want)
        elif block.info in ("python run", "python run torch"):
            code = block.body.replace(DOC_URL, server.url)
            if block.info == "python run torch":
                scope = {**_torch_namespace()}
                _exec(code, scope, block)
                assert scope["sched"].last_epoch == len(scope["loader"]), block.where
                scope["sched"].close()
                continue
            printed = _exec(code, namespace, block)
            following = doc_blocks[i + 1] if i + 1 < len(doc_blocks) else None
            if following is not None and following.info == "text output":
                _check(block, "the block", _lines(printed), _lines(following.body))
