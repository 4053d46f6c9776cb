"""Every example of docs/frameworks.md runs as written against a live server and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sdk.frameworks.support import reported_steps
from tests.sdk.torch_support import sdk_env

DOC = Path(__file__).resolve().parents[3] / "docs" / "frameworks.md"
EXAMPLES = re.findall(r"```python example\n(.*?)```", DOC.read_text(), re.S)
RUN_ID = re.compile(r'run="([^"]+)"|RemoteSchedule\(\s*"([^"]+)"')


def test_every_framework_has_an_example() -> None:
    text = "\n".join(EXAMPLES)
    for module in (
        "lrserve.lightning",
        "lrserve.hf",
        "accelerate",
        "lrserve.keras",
        "lrserve.optax",
    ):
        assert f"import {module}" in text or f"from {module}" in text, module


@pytest.mark.slow
@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_example_runs_and_reports(live_server: Any, tmp_path: Path, code: str) -> None:
    m = RUN_ID.search(code)
    assert m, "the example names its run"
    run = m.group(1) or m.group(2)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=sdk_env() | {"LRSERVE_URL": live_server.url, "KERAS_BACKEND": "torch"},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert reported_steps(live_server.url, run), f"{run}: no report reached the server"
