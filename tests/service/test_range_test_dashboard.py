"""The dashboard's range-test view: the page's own plotting code run on a live server's curve.

With Node.js available, the page's ``rangeTestPlot`` (cut from the served HTML, run against a
minimal DOM) draws the loss and smoothed loss against lr on a log axis, one marker line per
suggestion at its rate and the stop step; in headless Chromium (Playwright) the whole page
renders the view.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import ServerProcess
from tests.schedules.test_range_test import _shape

SPEC = {
    "groups": [{"name": "g", "lr": 1e-6}],
    "schedule": {"type": "LRRangeTest", "end_lr": 1.0, "num_iter": 100},
}

# A DOM just large enough for the page's el() and rangeTestPlot(): elements record their
# attributes, children and text; the result is printed as JSON.
SHIM = """
class Node {
  constructor(tag) { this.tag = tag; this.attrs = {}; this.children = []; this.text = ""; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  append(...cs) {
    for (const c of cs) this.children.push(typeof c === "string" ? {tag: "#text", text: c} : c);
  }
  set textContent(v) { this.text = String(v); this.children = []; }
  get textContent() { return this.text; }
}
globalThis.Node = Node;
globalThis.document = {
  createElement: (t) => new Node(t),
  createElementNS: (ns, t) => { const n = new Node(t); n.namespaceURI = ns; return n; },
  createTextNode: (t) => ({tag: "#text", text: t}),
};
"""


def _page(server: ServerProcess) -> str:
    response = httpx.get(server.url + "/")
    assert response.status_code == 200
    return response.text


def _functions(page: str, *names: str) -> str:
    """The source of the page's top-level functions/constants ``names`` (each ends at the first
    line that is a lone closing brace or a one-line ``const``)."""
    script = re.search(r"<script>(.*)</script>", page, re.S)
    assert script is not None
    lines = script.group(1).splitlines()
    out: list[str] = []
    for name in names:
        start = next(
            i
            for i, line in enumerate(lines)
            if re.match(rf"(async )?function {name}\(|const {name} = ", line)
        )
        if lines[start].startswith("const"):
            out.append(lines[start])
            continue
        end = next(i for i in range(start, len(lines)) if lines[i] == "}")
        out.extend(lines[start : end + 1])
    return "\n".join(out)


def _curve(server: ServerProcess, run: str) -> dict[str, Any]:
    with server.client() as client:
        assert client.put(f"/v1/runs/{run}", json=SPEC).status_code == 201
        for step, loss in enumerate(_shape(100, 1)):
            r = client.post(
                f"/v1/runs/{run}/metrics", json={"step": step, "values": {"loss": loss}}
            )
            if r.json()["stop"]:
                break
        curve: dict[str, Any] = client.get(f"/v1/runs/{run}/range-test").json()
        return curve


def test_page_reads_the_range_test_endpoint(live_server: ServerProcess) -> None:
    page = _page(live_server)
    assert "/range-test" in page and "function rangeTestPlot(" in page


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_range_test_plot_marks_suggestions_and_stop(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    curve = _curve(live_server, "dash-rt")
    assert curve["stopped_at"] is not None and all(curve["suggestions"].values())
    code = "\n".join(
        [
            SHIM,
            _functions(_page(live_server), "el", "COLORS", "isRangeTest", "rangeTestPlot"),
            f"const rt = {json.dumps(curve)};",
            "console.log(JSON.stringify({is: isRangeTest(" + json.dumps(SPEC) + "),"
            " svg: rangeTestPlot(rt)}));",
        ]
    )
    script = tmp_path / "plot.js"
    script.write_text(code)
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["is"] is True
    svg = out["svg"]
    assert svg["tag"] == "svg" and svg["attrs"]["id"] == "range-test-plot"
    paths = [c for c in svg["children"] if c["tag"] == "path"]
    assert len(paths) == 2  # loss and smoothed loss
    points = re.findall(r"[ML]([\d.]+),([\d.]+)", paths[1]["attrs"]["d"])
    assert len(points) == len(curve["steps"])
    xs = [float(px) for px, _ in points]
    assert xs == sorted(xs)  # lr rises along the x axis
    # Log axis: x is linear in log10(lr) between the first and the last point.
    lo, hi = math.log10(curve["lr"][0]), math.log10(curve["lr"][-1])
    mid = len(xs) // 2
    frac = (math.log10(curve["lr"][mid]) - lo) / (hi - lo)
    assert xs[mid] == pytest.approx(xs[0] + frac * (xs[-1] - xs[0]), abs=0.2)
    dashed = [c for c in svg["children"] if c["tag"] == "line" and "stroke-dasharray" in c["attrs"]]
    assert len(dashed) == 3
    for line, rule in zip(dashed, ("steepest", "valley", "minimum"), strict=True):
        frac = (math.log10(curve["suggestions"][rule]) - lo) / (hi - lo)
        assert float(line["attrs"]["x1"]) == pytest.approx(xs[0] + frac * (xs[-1] - xs[0]), abs=0.2)
    texts = [c["text"] for c in svg["children"] if c["tag"] == "text"]
    assert f"stop, step {curve['stopped_at']}" in texts
    assert any(t.startswith("steepest ") for t in texts)


def test_dashboard_renders_the_range_test_view(browser_server: ServerProcess, page: Page) -> None:
    curve = _curve(browser_server, "dash-rt2")
    page.goto(browser_server.url + "/#dash-rt2")
    view = page.locator("#range-test")
    view.wait_for()
    assert view.locator("#range-test-plot path").count() == 2  # loss and smoothed loss
    assert f"stopped at step {curve['stopped_at']}" in view.inner_text()
    rows = view.locator("table tr").all_inner_texts()
    assert [r.split("\t")[0] for r in rows] == ["rule", "steepest", "valley", "minimum"]
    # Beside it, the run view's own charts: the lr and the loss on the step axis.
    page.wait_for_function("window.lrserveChartInfo && 'metric:loss' in lrserveChartInfo()")
    steps = page.evaluate("lrserveChartInfo()['metric:loss'].points")
    assert steps == len(curve["steps"])
