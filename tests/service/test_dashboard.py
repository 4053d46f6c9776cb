"""The web page at `/`, in headless Chromium against a live server with several runs.

One server per module holds: a fine-tuning run of 4 ranks (warmup then cosine, a plateau node
that reduced twice, an override), a baseline to compare it with, a plateau run without a known
horizon, and a sweep of small runs (more than one page of the list). The page's charts say what
they hold through ``window.lrserveChartInfo()``; the tests hold that to what the API serves.

``LRSERVE_SCREENSHOTS=docs`` also writes docs/dashboard-*.png (the screenshots of the docs).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import ROOT, ServerProcess
from tests.service.browser import chart_info, wait_for_charts

FT = "bert-base-ft"
BASELINE = "bert-base-baseline"
PLATEAU = "resnet-plateau"
RANKS = 4
WARMUP_COSINE = {
    "type": "SequentialLR",
    "schedulers": [
        {"type": "LinearLR", "start_factor": 0.01, "total_iters": 500},
        {"type": "CosineAnnealingLR", "T_max": 9500, "eta_min": 1e-6},
    ],
    "milestones": [500],
}
FT_SPEC = {
    "groups": [{"name": "backbone", "lr": 1e-4}, {"name": "head", "lr": 1e-3}],
    "schedule": {
        "type": "ChainedScheduler",
        "schedulers": [
            WARMUP_COSINE,
            {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 2, "factor": 0.5},
        ],
    },
    "world_size": RANKS,
    "metadata": {"tags": ["bert", "finetune"], "total_steps": 10000, "model": "bert-base"},
}
SWEEP = 60  # more than one page (50) of the list


def _loss(step: int) -> float:
    """Falls, stalls from step 3000 to 5200 (the plateau node reduces), falls again."""
    if step < 3000:
        return 2.2 * math.exp(-step / 1500) + 0.9
    stalled = 2.2 * math.exp(-2.0) + 0.9
    if step <= 5200:
        return stalled + 0.01 * (step - 3000) / 250
    return stalled - 0.05 * (step - 5200) / 500


def seed(c: httpx.Client) -> None:
    """The module's runs (see the module docstring)."""
    rng = random.Random(1)
    assert c.put(f"/v1/runs/{FT}", json=FT_SPEC).status_code == 201
    for step in range(0, 7001, 250):
        for rank in range(RANKS):
            values = {
                "val_loss": _loss(step) + rng.gauss(0, 0.02),
                "acc": 0.5 + 0.4 * (1 - math.exp(-step / 2000)) + rng.gauss(0, 0.01),
            }
            body = {"step": step, "rank": rank, "values": values}
            assert c.post(f"/v1/runs/{FT}/metrics", json=body).status_code == 200
    earliest = c.get(f"/v1/runs/{FT}").json()["leased_until"]
    override = {"from_step": max(7200, earliest), "action": "scale", "value": 0.5}
    override |= {"groups": ["head"], "note": "head too hot"}
    assert c.post(f"/v1/runs/{FT}/overrides", json=override).status_code == 201

    baseline = {**FT_SPEC, "schedule": WARMUP_COSINE}
    baseline["metadata"] = {"tags": ["bert", "baseline"], "total_steps": 10000}
    assert c.put(f"/v1/runs/{BASELINE}", json=baseline).status_code == 201
    for step in range(0, 5001, 250):
        for rank in range(RANKS):
            body = {"step": step, "rank": rank, "values": {"val_loss": _loss(step) * 1.04}}
            assert c.post(f"/v1/runs/{BASELINE}/metrics", json=body).status_code == 200

    plateau = {
        "groups": [{"name": "g0", "lr": 0.1}, {"name": "g1", "lr": 0.01}],
        "schedule": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 20},
    }
    assert c.put(f"/v1/runs/{PLATEAU}", json=plateau).status_code == 201
    for step in range(0, 2001, 100):
        body = {"step": step, "values": {"val_loss": 1.0 / (1 + step)}}
        assert c.post(f"/v1/runs/{PLATEAU}/metrics", json=body).status_code == 200

    for i in range(SWEEP):
        spec = {
            "groups": [{"name": "g", "lr": 0.001 * (i + 1)}],
            "schedule": {"type": "StepLR", "step_size": 100},
            "metadata": {"tags": ["sweep", "odd" if i % 2 else "even"]},
        }
        assert c.put(f"/v1/runs/sweep-{i:03d}", json=spec).status_code == 201


@pytest.fixture(scope="module")
def server(browser_server: ServerProcess) -> ServerProcess:
    """The module's server, with the runs of :func:`seed`."""
    with browser_server.client() as c:
        seed(c)
    return browser_server


def _open(page: Page, server: ServerProcess, fragment: str, *charts: str) -> dict[str, Any]:
    page.goto(f"{server.url}/#{fragment}")
    return wait_for_charts(page, *charts)


def _api(server: ServerProcess, path: str, **params: Any) -> Any:
    with server.client() as c:
        r = c.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()


def test_page_and_assets_come_from_the_server_alone(server: ServerProcess, page: Page) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    _open(page, server, FT, "rate:lr")
    remote = [u for u in requested if not u.startswith("data:")]
    assert remote and all(u.startswith(server.url + "/") for u in remote), requested
    assert any(u.endswith("/static/vendor/uPlot.iife.min.js") for u in requested)
    html = httpx.get(server.url + "/").text
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        if ref == "data:,":  # the empty favicon: no request at all
            continue
        assert ref.startswith("/"), ref  # no CDN, no other host
        assert httpx.get(server.url + ref).status_code == 200, ref


def test_assets_are_revalidated_and_nothing_outside_static_is_served(
    server: ServerProcess,
) -> None:
    url = server.url + "/static/vendor/uPlot.iife.min.js"
    first = httpx.get(url)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/javascript")
    assert first.headers["cache-control"] == "no-cache" and first.headers["etag"]
    again = httpx.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for path in (
        "/static/../app.py",
        "/static/vendor/%2e%2e/%2e%2e/app.py",
        "/static/..%2Fapp.py",
        "/static/dashboard.py",  # a suffix the route does not serve
        "/static/vendor/none.js",
        "/static//etc/passwd.txt",
    ):
        r = httpx.get(server.url + path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/problem+json", path


def test_rates_and_metrics_render_every_point_the_api_serves(
    server: ServerProcess, page: Page
) -> None:
    info = _open(page, server, FT, "rate:lr", "metric:val_loss", "metric:acc")
    rate = info["rate:lr"]
    curve = _api(server, f"/v1/runs/{FT}/curve", **rate["request"])
    assert rate["request"]["points"] == pytest.approx(rate["plotWidth"], abs=150)
    assert rate["points"] == len(curve["steps"]) > 100
    assert rate["series"] == ["backbone", "head"]
    assert rate["counts"] == [len(curve["steps"])] * 2
    drawn = page.evaluate("window.lrserveCharts['rate:lr'].u.data")
    assert drawn[0] == curve["steps"]
    assert drawn[2] == pytest.approx(curve["groups"]["head"]["lr"], rel=1e-12)

    history = _api(server, f"/v1/runs/{FT}/metrics", name="val_loss")
    metric = info["metric:val_loss"]
    steps = sorted({p["step"] for p in history["points"]})
    assert len(steps) == 29
    assert metric["points"] == len(steps)
    assert metric["series"] == ["aggregate", *[f"rank {r}" for r in range(RANKS)]]
    assert metric["counts"] == [len(steps)] * (1 + RANKS)
    drawn = page.evaluate("window.lrserveCharts['metric:val_loss'].u.data")
    assert drawn[0] == steps
    assert drawn[1] == pytest.approx([a["value"] for a in history["aggregate"]])
    rank2 = [p["value"] for p in history["points"] if p["rank"] == 2]
    assert drawn[4] == pytest.approx(rank2)
    # One step axis: every chart spans the same steps.
    assert {tuple(c["x"]) for c in info.values()} == {tuple(rate["x"])}


def test_markers_sit_at_their_steps_and_hover_tells_what_they_are(
    server: ServerProcess, page: Page
) -> None:
    info = _open(page, server, FT, "rate:lr", "metric:val_loss")
    run = _api(server, f"/v1/runs/{FT}")
    reductions = [r["step"] for node in run["state"].values() for r in node["reductions"]]
    assert len(reductions) == 2  # the stall made the plateau node reduce twice
    expected = {("reduction", s) for s in reductions}
    expected.add(("override", run["overrides"][0]["from_step"]))
    for chart in info.values():
        marks = {(m["kind"], m["step"]): m for m in chart["markers"]}
        assert set(marks) == expected
        lo, hi = chart["x"]
        for (_, step), m in marks.items():
            assert m["shown"]
            assert m["x"] == pytest.approx((step - lo) / (hi - lo) * chart["plotWidth"], abs=1.0)
    marker = page.locator(
        f"#chart-rate-lr .marker[data-kind=reduction][data-step='{reductions[0]}']"
    )
    marker.hover()
    tip = page.locator("#tip")
    assert tip.is_visible()
    assert "reduction ×0.5" in tip.inner_text() and "val_loss" in tip.inner_text()
    # Keyboard: the markers take focus and say the same.
    page.locator("#chart-rate-lr .marker[data-kind=override]").focus()
    assert "head too hot" in tip.inner_text()


def test_the_x_range_is_the_horizon_or_the_reported_span(server: ServerProcess, page: Page) -> None:
    run = _api(server, f"/v1/runs/{FT}")
    info = _open(page, server, FT, "rate:lr")
    if run.get("horizon") is not None:
        assert run["horizon"] == 10000  # metadata.total_steps
        assert info["rate:lr"]["x"] == [0, 9999]
    else:  # a server without horizon: the reported span (and the override after it)
        assert info["rate:lr"]["x"][1] == pytest.approx(7200, rel=0.05)
    # No horizon: the reported span, not twice the last step.
    plateau = _api(server, f"/v1/runs/{PLATEAU}")
    assert plateau.get("horizon") is None and plateau["step"] == 2000
    info = _open(page, server, PLATEAU, "rate:lr", "metric:val_loss")
    assert info["rate:lr"]["x"] == [0, 2000]
    assert info["metric:val_loss"]["points"] == 21


def test_drag_zooms_every_chart_and_double_click_resets(server: ServerProcess, page: Page) -> None:
    info = _open(page, server, FT, "rate:lr", "metric:val_loss")
    full = info["rate:lr"]["x"]
    box = page.locator("#chart-rate-lr .u-over").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.up()
    page.wait_for_function(f"lrserveChartInfo()['rate:lr'].x[0] > {full[0]}")
    info = chart_info(page)
    lo, hi = info["rate:lr"]["x"]
    span = full[1] - full[0]
    assert lo == pytest.approx(full[0] + 0.25 * span, abs=0.02 * span)
    assert hi == pytest.approx(full[0] + 0.5 * span, abs=0.02 * span)
    assert info["metric:val_loss"]["x"] == [lo, hi]
    # The rates were fetched again over the zoomed span, at the chart's resolution.
    request = info["rate:lr"]["request"]
    assert request["start"] == lo and request["stop"] == hi + 1
    assert info["rate:lr"]["points"] > 100
    page.locator("#chart-metric-val_loss .u-over").dblclick()
    page.wait_for_function(f"lrserveChartInfo()['rate:lr'].x[1] === {full[1]}")
    assert chart_info(page)["metric:val_loss"]["x"] == full


def test_state_and_events_are_tables_a_person_reads(server: ServerProcess, page: Page) -> None:
    _open(page, server, FT, "rate:lr")
    reductions = page.locator("#state table.reductions tr")
    assert reductions.count() == 3  # header and two reductions
    assert "4001" in reductions.nth(1).inner_text()
    rows = page.locator("#events-table tbody tr")
    assert rows.count() == 1 + 29 + 2 + 1  # created, reports, reductions, override
    newest = rows.first.inner_text()
    assert "override" in newest and "head too hot" in newest and "×0.5" in newest
    reduced = page.locator(
        "#events-table tbody tr:has(td.kind:text-is('reduced'))"
    ).first.inner_text()
    assert re.search(r"val_loss [\d.]+ vs best [\d.]+: lr ×0.5", reduced), reduced
    # No JSON blob in sight: the raw data only behind a closed <details>.
    lines = page.eval_on_selector_all(
        "#events-table tbody td:nth-child(6)", "tds => tds.map(td => td.firstChild.textContent)"
    )
    assert len(lines) == rows.count() and all(line and "{" not in line for line in lines)
    assert page.locator("#events-table details[open]").count() == 0
    assert page.locator("#events-table details").count() == rows.count()


def test_a_long_event_log_shows_its_newest_events(server: ServerProcess, page: Page) -> None:
    everything = _api(server, f"/v1/runs/{FT}/events")["events"]
    _open(page, server, FT, "rate:lr")
    # The page's own reader, asked for the newest 5 of the 33 events: it finds the end by
    # probing, not by reading every page.
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    got = page.evaluate(f"fetchRecentEvents({FT!r}, 5)")
    assert got["complete"] is False
    assert [e["seq"] for e in got["events"]][-5:] == [e["seq"] for e in everything][-5:]
    assert len(got["events"]) <= 6 and len(requested) < 20


def test_a_new_report_appears_without_a_reload(server: ServerProcess, page: Page) -> None:
    run_id = "live-run"
    with server.client() as c:
        spec = {**FT_SPEC, "world_size": 2, "metadata": {}}
        assert c.put(f"/v1/runs/{run_id}", json=spec).status_code == 201
        for step in (0, 100):
            for rank in (0, 1):
                body = {"step": step, "rank": rank, "values": {"val_loss": 2.0 - step / 1000}}
                assert c.post(f"/v1/runs/{run_id}/metrics", json=body).status_code == 200
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    info = _open(page, server, run_id, "metric:val_loss")
    assert info["metric:val_loss"]["points"] == 2
    page.evaluate("window.__sameDocument = true")
    with server.client() as c:
        for rank in (0, 1):
            body = {"step": 200, "rank": rank, "values": {"val_loss": 1.5}}
            assert c.post(f"/v1/runs/{run_id}/metrics", json=body).status_code == 200
    page.wait_for_function("lrserveChartInfo()['metric:val_loss']?.points === 3", timeout=20_000)
    assert page.evaluate("window.__sameDocument") is True  # no reload
    assert "step200" in page.locator("#run-head").inner_text().replace(" ", "")
    counts = chart_info(page)["metric:val_loss"]["counts"]
    assert counts == [3, 3, 3]  # aggregate, rank 0, rank 1
    # Only the new points were asked for (from the step before the last one seen).
    assert any("after_step=99" in u for u in requested), requested


def test_a_server_with_a_token_works_once_the_token_is_typed_in(
    server_factory: Callable[..., ServerProcess], page: Page
) -> None:
    srv = server_factory(token="s3cret-token")
    with srv.client() as c:
        spec = {**FT_SPEC, "world_size": 1, "metadata": {}}
        assert c.put("/v1/runs/guarded", json=spec).status_code == 201
        body = {"step": 0, "values": {"val_loss": 2.0}}
        assert c.post("/v1/runs/guarded/metrics", json=body).status_code == 200
    page.goto(srv.url + "/#guarded")
    # Said where the list would be, once the list's request came back (a loaded machine may
    # take a while: waited for, not read at once).
    page.wait_for_function(
        "document.querySelector('#list-error')?.innerText.includes('401')", timeout=20_000
    )
    page.locator("#token").fill("s3cret-token")
    page.locator("#token").press("Enter")
    info = wait_for_charts(page, "metric:val_loss")
    assert info["metric:val_loss"]["points"] == 1
    assert page.locator("#runs tr[data-run='guarded']").count() == 1
    # Live updates carry the token too (EventSource cannot send headers: ?token=).
    with srv.client() as c:
        body = {"step": 1, "values": {"val_loss": 1.5}}
        assert c.post("/v1/runs/guarded/metrics", json=body).status_code == 200
    page.wait_for_function("lrserveChartInfo()['metric:val_loss']?.points === 2", timeout=20_000)
    assert page.locator("#live").inner_text() == "live"


def test_compare_overlays_the_picked_runs(server: ServerProcess, page: Page) -> None:
    page.goto(server.url + "/")
    page.locator("#q").fill("bert-base")  # the sweep's runs may fill the first page
    page.get_by_label(f"compare {FT}").check()
    page.get_by_label(f"compare {BASELINE}").check()
    page.locator("#compare").click()
    info = wait_for_charts(page, "compare:lr", "compare:metric")
    assert page.evaluate("location.hash") == f"#compare:{FT},{BASELINE}"
    rates = info["compare:lr"]
    assert rates["series"] == [f"{r} / {g}" for r in (FT, BASELINE) for g in ("backbone", "head")]
    assert min(rates["counts"]) > 100
    metric = info["compare:metric"]
    assert page.locator("#compare-metric").input_value() == "val_loss"  # the one both report
    assert metric["series"] == [FT, BASELINE]
    assert metric["counts"] == [29, 21]  # each run's aggregate, at its own steps
    drawn = page.evaluate("window.lrserveCharts['compare:metric'].u.data")
    aggregate = _api(server, f"/v1/runs/{BASELINE}/metrics", name="val_loss")["aggregate"]
    assert [y for y in drawn[2] if y is not None] == pytest.approx([a["value"] for a in aggregate])
    page.locator("#compare-metric").select_option("acc")
    page.wait_for_function("lrserveChartInfo()['compare:metric']?.counts.join() === '29,0'")


LISTED = "[...document.querySelectorAll('#runs tr[data-run]')].map((r) => r.dataset.run)"


def _wait_listed(page: Page, want: list[str]) -> None:
    """Wait until the list shows exactly the runs ``want``, in that order."""
    page.wait_for_function(f"(want) => {LISTED}.join() === want.join()", arg=want)


def _ids(server: ServerProcess, **query: Any) -> list[str]:
    """The ids the API lists for ``query`` (the page's first page: 50, newest update first)."""
    page = _api(server, "/v1/runs", limit=50, sort="-updated", **query)
    return [r["id"] for r in page["runs"]]


def test_the_list_pages_and_filters_through_the_api(server: ServerProcess, page: Page) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("#runs tr[data-run]")
    assert page.locator("#runs tr[data-run]").count() == 50
    page.locator("#more").click()
    page.wait_for_function(f"{LISTED}.length >= {SWEEP + 3}")
    assert page.locator("#more").is_hidden()
    first = _api(server, "/v1/runs", limit=1)["runs"][0]
    if "status" not in first:
        pytest.skip("this server's run list has no status and no filters yet")
    assert (
        page.locator(f"#runs tr[data-run='{first['id']}'] .badge").inner_text() == (first["status"])
    )
    # Each filter is the API's: the page shows what the API answers, in its order.
    for field, value in (("#q", "sweep-01"), ("#tag", "baseline")):
        page.locator(field).fill(value)
        page.locator(field).press("Enter")
        want = _ids(server, **{field[1:]: value})
        assert want and len(want) < 20
        _wait_listed(page, want)
        page.locator(field).fill("")
    page.locator("#status-filter").select_option("running")
    want = _ids(server, status="running")
    assert FT in want or BASELINE in want  # reported seconds ago
    _wait_listed(page, want)
    assert set(page.locator("#runs tr[data-run] .badge").all_inner_texts()) == {"running"}
    page.locator("#status-filter").select_option("")
    page.locator("#sort").select_option("id")
    _wait_listed(page, [r["id"] for r in _api(server, "/v1/runs", limit=50, sort="id")["runs"]])


def test_an_override_typed_into_the_page_changes_the_run(server: ServerProcess, page: Page) -> None:
    run_id = "steer-from-page"
    with server.client() as c:
        assert c.put(f"/v1/runs/{run_id}", json={**FT_SPEC, "world_size": 1}).status_code == 201
    _open(page, server, run_id, "rate:lr")
    form = page.locator("#steering form[data-kind=override]")
    form.get_by_label("from step").fill("1200")
    form.get_by_label("value").fill("0.25")
    form.get_by_label("note").fill("typed")
    form.get_by_label("note").press("Enter")  # Enter submits: a dry run and its confirmation
    confirm = page.locator("#confirm")
    assert "from step 1200" in confirm.locator("b").inner_text()
    assert _api(server, f"/v1/runs/{run_id}")["overrides"] == []
    confirm.locator(".confirm-yes").click()
    page.wait_for_selector("#chart-rate-lr .marker[data-kind=override][data-step='1200']")
    overrides = _api(server, f"/v1/runs/{run_id}")["overrides"]
    assert [(o["from_step"], o["value"], o["note"]) for o in overrides] == [(1200, 0.25, "typed")]


def test_the_run_view_works_at_800_px(server: ServerProcess, page: Page) -> None:
    page.set_viewport_size({"width": 800, "height": 1000})
    info = _open(page, server, FT, "rate:lr", "metric:val_loss")
    assert page.evaluate("document.documentElement.scrollWidth") <= 800  # no sideways scroll
    listed = page.locator("#list-panel").bounding_box()
    charts = page.locator("#charts").bounding_box()
    assert listed is not None and charts is not None
    assert listed["y"] + listed["height"] <= charts["y"]  # stacked: the list above the run
    for chart in info.values():
        assert 600 <= chart["width"] <= 800
    assert info["rate:lr"]["request"]["points"] < 800  # resolution follows the width
    card = page.locator("#steering").bounding_box()
    spec = page.locator("#steering textarea").bounding_box()
    assert card is not None and spec is not None
    assert spec["x"] + spec["width"] <= card["x"] + card["width"]
    # An error shows next to the form that caused it: a too-late override.
    form = page.locator("#steering form[data-kind=override]")
    form.get_by_label("from step").fill("0")
    form.get_by_label("value").fill("0.5")
    form.locator("button[type=submit]").click()
    error = page.locator("#steer-out .error")
    error.wait_for()
    assert "too late" in error.inner_text()
    below = form.bounding_box()
    at = error.bounding_box()
    assert below is not None and at is not None
    assert 0 <= at["y"] - (below["y"] + below["height"]) < 40
    assert error.is_visible() and at["y"] < page.viewport_size["height"]  # type: ignore[index]


def _png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big")


def test_screenshots_for_the_docs(server: ServerProcess, page: Page, tmp_path: Path) -> None:
    """The docs' screenshots, taken at 1400 and 800 px (into docs/ with
    ``LRSERVE_SCREENSHOTS=docs``; elsewhere into a temporary folder, so CI runs the path)."""
    docs = Path(ROOT) / "docs" if os.environ.get("LRSERVE_SCREENSHOTS") == "docs" else tmp_path
    _open(page, server, FT, "rate:lr", "metric:val_loss")
    page.locator("#q").fill("bert")  # the run shown, highlighted in the list
    page.wait_for_selector(f"#runs tr.active[data-run='{FT}']")
    page.locator("#chart-rate-lr .marker[data-kind=reduction]").first.hover()
    page.screenshot(path=str(docs / "dashboard-run-1400.png"), full_page=True)
    page.set_viewport_size({"width": 800, "height": 1000})
    page.wait_for_function("lrserveChartInfo()['rate:lr']?.width < 800")
    page.mouse.move(0, 0)
    page.screenshot(path=str(docs / "dashboard-run-800.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{server.url}/#compare:{FT},{BASELINE}")
    wait_for_charts(page, "compare:lr", "compare:metric")
    page.locator("#log-scale").check()  # the backbone's rates, a decade below the head's
    page.wait_for_function("lrserveChartInfo()['compare:lr']?.log")
    page.screenshot(path=str(docs / "dashboard-compare-1400.png"), full_page=True)
    for name, width in (("run-1400", 1400), ("run-800", 800), ("compare-1400", 1400)):
        assert _png_width(docs / f"dashboard-{name}.png") == width, name


def test_a_run_whose_rates_cannot_be_drawn_still_shows_the_rest(
    server: ServerProcess, page: Page
) -> None:
    """A run whose rates over its horizon the server refuses to compute in one request (a
    ChainedScheduler that scans, 32 groups, 10^6 steps, never served): the charts say why,
    and the metrics, state, events and steering are shown; zoomed into a short span, the
    rates are drawn."""
    run, refused = _scanning_run(server)
    page.goto(f"{server.url}/#{run}")
    notice = page.locator("#curve-error")
    notice.wait_for()
    assert refused.json()["detail"][:40] in notice.inner_text()
    wait_for_charts(page, "metric:loss")
    for part in ("#state", "#events-table", "#steering"):
        assert page.locator(part).count() == 1, part
    page.evaluate("zoomTo(view, 0, 300)")
    info = wait_for_charts(page, "rate:lr")
    assert info["rate:lr"]


def test_compare_draws_the_rates_it_can(server: ServerProcess, page: Page) -> None:
    """Compared with a run whose rates are refused over the span, a run's rates are drawn
    and the other one is named with the reason; the metric chart holds both."""
    run, refused = _scanning_run(server)
    page.goto(f"{server.url}/#compare:{BASELINE},{run}")
    info = wait_for_charts(page, "compare:lr", "compare:metric")
    assert info["compare:lr"]["series"] == [f"{BASELINE} / {g}" for g in ("backbone", "head")]
    notice = page.locator("#compare-curve-errors").inner_text()
    assert run in notice and refused.json()["detail"][:40] in notice


def _scanning_run(server: ServerProcess) -> tuple[str, httpx.Response]:
    """A run whose rates over its horizon are over the work budget: a ChainedScheduler that
    scans, 32 groups, 10^6 steps, never served (created once); and the curve's refusal."""
    run = "scan-chain-32"
    chain = [
        {"type": "ExponentialLR", "gamma": 0.999999},
        {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-5},
    ]
    spec = {
        "groups": [{"name": f"layer{i}", "lr": 1e-3 * 0.97**i} for i in range(32)],
        "schedule": {"type": "ChainedScheduler", "schedulers": chain},
        "metadata": {"total_steps": 1_000_000},
    }
    with server.client() as c:
        created = c.put(f"/v1/runs/{run}", json=spec)
        assert created.status_code in (200, 201), created.text
        if created.status_code == 201:
            for step in (0, 100, 200):
                body = {"step": step, "values": {"loss": 1.0 / (1 + step)}}
                assert c.post(f"/v1/runs/{run}/metrics", json=body).status_code == 200
        refused = c.get(f"/v1/runs/{run}/curve", params={"start": 0, "stop": 1_000_000})
        assert refused.status_code == 422, refused.text
    return run, refused
