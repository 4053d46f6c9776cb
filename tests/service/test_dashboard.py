"""The web page: served at `/`, and it renders a run (plot, events, override form) in a browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

RUN = {
    "groups": [{"name": "backbone", "lr": 0.1}, {"name": "head", "lr": 1.0}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 100},
}


def test_dashboard_page_is_served_and_uses_the_v1_api(live_server: ServerProcess) -> None:
    response = httpx.get(live_server.url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    # The page reads runs, curves and events and posts overrides through the public API.
    for path in ("/v1/runs?limit=", "/curve?", "/events", "/overrides"):
        assert path in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_dashboard_renders_a_run_in_a_browser(live_server: ServerProcess, tmp_path: Path) -> None:
    with live_server.client() as client:
        assert client.put("/v1/runs/dash-1", json=RUN).status_code == 201
        report = {"step": 10, "values": {"val_loss": 0.5}}
        assert client.post("/v1/runs/dash-1/metrics", json=report).status_code == 200
    chromium = _chromium()
    assert chromium is not None
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            live_server.url + "/#dash-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert "dash-1" in dom, result.stderr[-2000:]
    # The curve was plotted (one SVG path per group) and the events table lists the report.
    assert dom.count("<path") >= 2
    assert "report_completed" in dom
    assert "apply override" in dom
