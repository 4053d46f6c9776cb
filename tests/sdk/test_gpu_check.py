"""bench/gpu_check.py: the skip path without CUDA, and the CPU dry run of what needs no GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sdk.conftest import sdk_env

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
NO_CUDA = (
    "CUDA is not available on this machine: nothing to check; "
    "run with --device cpu for a dry run of the device-independent checks"
)


def run_script(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=sdk_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(SCRIPT.parents[1]),
    )


def test_without_cuda_it_says_so_and_exits_0() -> None:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a CUDA machine too.
    proc = run_script(timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == NO_CUDA


def test_bad_arguments_are_refused() -> None:
    proc = run_script("--device", "cpu", "--steps", "3", timeout=60)
    assert proc.returncode == 2
    assert "--steps must be at least 40" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_passes_every_device_independent_check() -> None:
    # A looser overhead limit than the default 1.25: a test run shares a small machine.
    proc = run_script("--device", "cpu", "--steps", "160", "--max-ratio", "2", timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    lines = {
        m.group(2): (m.group(1), m.group(3))
        for m in re.finditer(r"^(PASS|FAIL|SKIP|INFO)  ([^:]+): (.*)$", out, re.M)
    }
    assert out.startswith("device: cpu") and f"torch {torch.__version__}" in out
    assert lines["rates (fused=True)"][0] == "PASS", out
    assert "plateau reduction" in lines["rates (fused=True)"][1]
    # torch refuses capturable=True for CPU parameters; the script says why.
    status, why = lines["rates (capturable=True)"]
    assert status == "SKIP" and "capturable" in why, out
    compile_lines = [v for k, v in lines.items() if k.startswith("compile (AdamW foreach")]
    assert len(compile_lines) == 1, out
    status, why = compile_lines[0]
    # PASS where a C++ compiler is installed; otherwise SKIP with the reason.
    assert status == "PASS" or (status == "SKIP" and why), out
    if status == "PASS":
        assert "graphs compiled 1, recompiles 0" in why
    assert lines["cuda-graph"][0] == "SKIP" and "CUDA only" in lines["cuda-graph"][1]
    assert lines["overhead"][0] == "PASS", out
    assert lines["syncs"][0] == "SKIP"
    assert all(status != "FAIL" for status, _ in lines.values()), out
    assert re.search(r"^result: PASS \(\d+ passed, 0 failed, \d+ skipped\)", out, re.M), out
