"""The web page's steering: the page's own functions run under Node.js on a live server.

The page sends every change first as a dry run (``?dry_run=true``) and shows the curve before
and after in a confirmation; only "confirm" sends it. Here the page's functions (cut from the
served HTML, run against a minimal DOM, with ``fetch`` aimed at the server) build each request
from form fields, ask for the dry run and build the confirmation; the test then makes the change
for real and holds the page's "after" to what the server serves. A too-late answer is shown
with its earliest step and one click asks again from there. The plot draws a marker per change
at its step, and a rewind's abandoned span; in headless Chromium (Playwright) the whole page
shows them, and a person previews, confirms and is told when too late.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from tests.conftest import ServerProcess
from tests.service.helpers import new_id, plateau_spec

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")

COOLDOWN = {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 300}
LOSSES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99]  # patience 1: reductions at steps 3 and 5

# A DOM just large enough for the page's el(), plot() and the confirmation: elements record
# their attributes, children, text and listeners; find() and text() read them back.
SHIM = """
class Node {
  constructor(tag) {
    this.tag = tag; this.attrs = {}; this.children = []; this.text = ""; this.listeners = {};
  }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  append(...cs) {
    for (const c of cs) this.children.push(typeof c === "string" ? {tag: "#text", text: c} : c);
  }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  set textContent(v) { this.text = String(v); this.children = []; }
  get textContent() { return this.text; }
}
globalThis.Node = Node;
globalThis.document = {
  createElement: (t) => new Node(t),
  createElementNS: (ns, t) => { const n = new Node(t); n.namespaceURI = ns; return n; },
  createTextNode: (t) => ({tag: "#text", text: t}),
};
globalThis.logScale = {checked: false};
globalThis.tokenInput = {value: ""};
const serverFetch = globalThis.fetch;
globalThis.fetch = (path, options) => serverFetch(BASE + path, options);
const find = (n, pred, out = []) => {
  if (pred(n)) out.push(n);
  for (const c of n.children || []) find(c, pred, out);
  return out;
};
const text = (n) => (n.tag === "#text" ? n.text : n.text + (n.children || []).map(text).join(""));
const print = (value) => console.log(JSON.stringify(value));
"""

FUNCTIONS = (
    "api",
    "el",
    "COLORS",
    "MARK_COLORS",
    "MAX_PLOT_SPAN",
    "plot",
    "steeringMarkers",
    "curveRange",
    "wholeStep",
    "steeringRequest",
    "requestUrl",
    "sendChange",
    "previewChange",
    "changeStep",
    "tooLateStep",
    "withStep",
    "describeChange",
    "firstDifference",
    "fmtValue",
    "confirmationView",
    "errorView",
)


def _functions(page: str, *names: str) -> str:
    """The source of the page's top-level functions/constants ``names`` (a function ends at
    its first line that is a lone closing brace; a constant is one line)."""
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


def _node(server: ServerProcess, tmp_path: Path, body: str, **values: Any) -> Any:
    """Run ``body`` (a module: top-level await) after the page's functions; its print()."""
    page = httpx.get(server.url + "/").text
    consts = "\n".join(f"const {k} = {json.dumps(v)};" for k, v in values.items())
    code = "\n".join(
        [
            f"const BASE = {json.dumps(server.url)};",
            SHIM,
            _functions(page, *FUNCTIONS),
            consts,
            body,
        ]
    )
    script = tmp_path / "page.mjs"
    script.write_text(code)
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PREVIEW = """
const run = await api(`/v1/runs/${RID}`);
const req = steeringRequest(RID, KIND, FIELDS);
const range = curveRange(run, [changeStep(req)]);
const answer = await previewChange(req, range);
const view = confirmationView(req, answer, () => {}, () => {});
const points = (p) => (p.attrs.d.match(/[ML]/g) || []).length;
const classed = (cls) => find(view, (n) => n.tag === "path" && n.attrs.class === cls);
const paths = (cls) => classed(cls).map(points);
const byGroup = (p) => [p.attrs["data-group"], p.attrs.d];
const drawn = (cls) => Object.fromEntries(classed(cls).map(byGroup));
print({req, range, answer, text: text(view), before: paths("before"), after: paths("after"),
       drawn: {before: drawn("before"), after: drawn("after")},
       buttons: find(view, (n) => n.tag === "button").map(text)});
"""

APPLY = "print(await sendChange(REQ));"


def _check_drawn(paths: dict[str, str], curve: dict[str, Any], both: list[float]) -> None:
    """The plot's paths are ``curve`` (its lr per group), point for point, on the plot's axes
    (``both``: every value the plot shows, which sets its y range)."""
    W, H, L, B = 900, 300, 70, 30  # plot()'s geometry
    steps = curve["steps"]
    ymin, ymax = min(0.0, *both), max(both) or 1.0

    def x(step: int) -> float:
        return L + (W - L - 10) * (step - steps[0]) / max(1, steps[-1] - steps[0])

    def y(value: float) -> float:
        return H - B - (H - B - 10) * (value - ymin) / (ymax - ymin)

    assert set(paths) == set(curve["groups"])
    for group, d in paths.items():
        points = [(float(a), float(b)) for a, b in re.findall(r"[ML]([\d.-]+),([\d.-]+)", d)]
        values = curve["groups"][group]["lr"]
        assert len(points) == len(steps) == len(values)
        for (px, py), step, value in zip(points, steps, values, strict=True):
            assert px == pytest.approx(x(step), abs=0.051)
            assert py == pytest.approx(y(value), abs=0.051)


def _stored(c: httpx.Client, rid: str) -> Any:
    return c.get(f"/v1/runs/{rid}").json(), c.get(f"/v1/runs/{rid}/events").json()


def _preview_then_apply(
    server: ServerProcess, tmp_path: Path, rid: str, kind: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """The page's dry run of a change; nothing stored; the page's apply; the server then
    serves exactly the "after" the confirmation showed."""
    with server.client() as c:
        stored = _stored(c, rid)
        curve_now = None
        out = _node(server, tmp_path, PREVIEW, RID=rid, KIND=kind, FIELDS=fields)
        answer = out["answer"]
        assert answer["dry_run"] is True and answer["changed"] is True
        assert _stored(c, rid) == stored  # the preview stored nothing
        curve_now = c.get(f"/v1/runs/{rid}/curve", params=out["range"]).json()
        assert answer["before"] == curve_now
        # The confirmation draws both curves, every plotted step, and asks before sending.
        groups = len(answer["after"]["groups"])
        assert len(out["after"]) >= groups and len(out["before"]) == len(out["after"])
        assert set(out["after"]) == {len(answer["after"]["steps"])}
        assert set(out["before"]) == {len(answer["before"]["steps"])}
        assert out["buttons"] == ["confirm", "cancel"]
        first = re.search(r"first plotted change at step (\d+)", out["text"])
        assert first is not None, out["text"]
        step = out["req"]["body"]["to_step"] + 1 if kind == "rewind" else None
        if kind == "withdraw":
            step = out["req"]["query"].get("from_step", stored[0]["leased_until"])
        if step is None:
            step = out["req"]["body"]["from_step"]
        assert int(first.group(1)) >= step  # nothing before the change's step moves

        _node(server, tmp_path, APPLY, REQ=out["req"])
        after = c.get(f"/v1/runs/{rid}/curve", params=out["range"]).json()
        assert after == answer["after"]  # what the confirmation showed is what is served
        assert after != curve_now
        # ... and what it drew: the dashed curve is the old one, the solid one the new one.
        both = [v for crv in (curve_now, after) for g in crv["groups"].values() for v in g["lr"]]
        _check_drawn(out["drawn"]["before"], curve_now, both)
        _check_drawn(out["drawn"]["after"], after, both)
        out["run"] = c.get(f"/v1/runs/{rid}").json()
        return out


def _run_with_reports(c: httpx.Client, rid: str) -> None:
    assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
    for step, loss in enumerate(LOSSES):
        r = c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}})
        assert r.status_code == 200, r.text
    # A trainer's window: changes before step 512 are now too late.
    assert c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 300}).status_code == 200


TOO_LATE = """
const run = await api(`/v1/runs/${RID}`);
const fields = {from_step: "10", action: "scale", value: "0.5", groups: "g1", note: "dash"};
const req = steeringRequest(RID, "override", fields);
let err = null;
try { await previewChange(req, curveRange(run, [10])); } catch (e) { err = e; }
let again = null;
const view = errorView(err, req, (r) => { again = r; });
const buttons = find(view, (n) => n.tag === "button");
buttons.forEach((b) => b.listeners.click.forEach((fn) => fn()));
const answer = again && await previewChange(again, curveRange(run, [changeStep(again)]));
print({status: err && err.status, earliest: tooLateStep(err), text: text(view),
       buttons: buttons.map(text), again, answer});
"""


@needs_node
def test_too_late_shows_the_earliest_step_and_one_click_asks_from_there(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    rid = new_id("dash-late")
    with live_server.client() as c:
        _run_with_reports(c, rid)
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["leased_until"] > 10
    out = _node(live_server, tmp_path, TOO_LATE, RID=rid)
    earliest = out["earliest"]
    assert out["status"] == 409 and earliest >= run["leased_until"]
    assert f"apply from step {earliest} instead" in out["buttons"]
    assert "too late" in out["text"] and str(earliest) in out["text"]
    # The click asked again, the same change from the earliest step: a dry run that now passes.
    assert out["again"]["body"] == {
        "from_step": earliest,
        "action": "scale",
        "value": 0.5,
        "groups": ["g1"],
        "note": "dash",
    }
    assert out["answer"]["run"]["overrides"][-1]["from_step"] == earliest
    with live_server.client() as c:
        assert c.get(f"/v1/runs/{rid}").json()["version"] == run["version"]


@needs_node
def test_each_change_shows_before_and_after_and_the_server_then_serves_the_after(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    rid = new_id("dash-steer")
    with live_server.client() as c:
        _run_with_reports(c, rid)
        earliest = c.get(f"/v1/runs/{rid}").json()["leased_until"]
    fields = {"from_step": str(earliest), "action": "scale", "value": "0.5", "groups": ""}
    out = _preview_then_apply(live_server, tmp_path, rid, "override", fields)
    assert out["run"]["overrides"][0]["from_step"] == earliest
    fields = {"from_step": "600", "spec": json.dumps(COOLDOWN), "restart": "on", "base": "current"}
    out = _preview_then_apply(live_server, tmp_path, rid, "amend", {**fields, "note": "cool"})
    assert out["run"]["amendments"][0]["from_step"] == 600
    assert out["run"]["amendments"][0]["restart"] is True
    out = _preview_then_apply(
        live_server, tmp_path, rid, "withdraw", {"n": "1", "from_step": "700"}
    )
    assert out["run"]["overrides"][0]["until_step"] == 700
    out = _preview_then_apply(live_server, tmp_path, rid, "rewind", {"to_step": "2", "key": "ck"})
    assert out["run"]["rewinds"][0]["to_step"] == 2 and out["run"]["branch"] == 1


MARKERS = """
const run = await api(`/v1/runs/${RID}`);
const range = curveRange(run);
const query = `start=${range.start}&stop=${range.stop}&points=${range.points}`;
const curve = await api(`/v1/runs/${RID}/curve?${query}`);
const svg = plot(curve, "lr", steeringMarkers(run));
print({range, steps: [curve.steps[0], curve.steps[curve.steps.length - 1]],
       lines: find(svg, (n) => n.attrs && n.attrs.class === "marker").map((n) => n.attrs),
       labels: find(svg, (n) => n.attrs && n.attrs.class === "marker-label").map(text),
       spans: find(svg, (n) => n.attrs && n.attrs.class === "abandoned").map((n) => n.attrs)});
"""


def _steered_run(c: httpx.Client, rid: str) -> None:
    """A run with an amendment, a withdrawn override, an active one and a rewind."""
    assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
    for step, loss in enumerate(LOSSES):
        c.post(f"/v1/runs/{rid}/metrics", json={"step": step, "values": {"val_loss": loss}})
    ov = {"from_step": 300, "action": "scale", "value": 0.5}
    assert c.post(f"/v1/runs/{rid}/overrides", json=ov).status_code == 201
    assert c.delete(f"/v1/runs/{rid}/overrides/1", params={"from_step": 800}).status_code == 200
    amend = {"from_step": 500, "schedule": COOLDOWN, "restart": True, "note": "cooldown"}
    assert c.post(f"/v1/runs/{rid}/amendments", json=amend).status_code == 201
    assert c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 2}).status_code == 200
    ov = {"from_step": 1100, "action": "set", "value": 0.001}
    assert c.post(f"/v1/runs/{rid}/overrides", json=ov).status_code == 201


@needs_node
def test_the_plot_marks_every_change_at_its_step(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    rid = new_id("dash-marks")
    with live_server.client() as c:
        _steered_run(c, rid)
    out = _node(live_server, tmp_path, MARKERS, RID=rid)
    first, last = out["steps"]
    assert first == 0 and last >= 1100  # the plotted range reaches every change

    def x(step: int) -> float:
        return 70 + (900 - 70 - 10) * (step - first) / (last - first)

    marks = {(m["data-kind"], int(m["data-step"])): m for m in out["lines"]}
    assert set(marks) == {
        ("amendment", 500),
        ("override", 300),
        ("withdrawn", 800),
        ("rewind", 2),
        ("override", 1100),
    }
    for (_, step), line in marks.items():
        assert float(line["x1"]) == pytest.approx(x(step), abs=0.06)
        assert line["x1"] == line["x2"]  # vertical
    assert "amendment 1 (restart)" in out["labels"] and "override 1 withdrawn" in out["labels"]
    assert "rewind 1 to 2" in out["labels"] and "override 2 =0.001" in out["labels"]
    # The abandoned branch: steps after 2 up to 6, the highest step before the rewind.
    (span,) = out["spans"]
    assert float(span["x"]) == pytest.approx(x(2), abs=0.06)
    assert float(span["x"]) + float(span["width"]) == pytest.approx(x(6), abs=0.12)


BAD_INPUT = """
const C = {type: "ConstantLR"}, CONSTANT = JSON.stringify(C);
const bad = [
  ["override", {from_step: "-1", action: "scale", value: "0.5"}],
  ["override", {from_step: "1.5", action: "scale", value: "0.5"}],
  ["override", {from_step: "", action: "scale", value: "0.5"}],
  ["override", {from_step: "10", action: "scale", value: "x"}],
  ["override", {from_step: "10", action: "scale", value: ""}],
  ["withdraw", {n: "one"}],
  ["amend", {from_step: "10", spec: "not json"}],
  ["amend", {from_step: "10", spec: "[1]"}],
  ["amend", {from_step: "10", spec: "{}"}],
  ["amend", {from_step: "10", spec: '{"schedule": {"type": "ConstantLR"}, "restart": true}'}],
  ["rewind", {to_step: "1e3"}],
  ["nope", {}],
];
const errors = bad.map(([kind, f]) => {
  try { steeringRequest("r", kind, f); return null; } catch (e) { return e.message; }
});
const good = [
  steeringRequest("r 1", "amend", {from_step: "7", spec: CONSTANT, base: "current"}),
  steeringRequest("r", "amend", {from_step: "7", spec: JSON.stringify({group_schedules: {g: C}})}),
  steeringRequest("r", "withdraw", {n: "2", from_step: ""}),
  steeringRequest("r", "rewind", {to_step: "5", key: "k", note: "n"}),
];
print({errors, good, urls: good.map((r) => requestUrl(r, {dry_run: "true"}))});
"""


@needs_node
def test_bad_form_input_is_refused_before_anything_is_sent(
    live_server: ServerProcess, tmp_path: Path
) -> None:
    out = _node(live_server, tmp_path, BAD_INPUT)
    assert all(out["errors"]), out["errors"]
    assert "unknown key(s) restart" in out["errors"][9]
    amend, parts, withdraw, rewind = out["good"]
    assert amend["body"] == {
        "from_step": 7,
        "schedule": {"type": "ConstantLR"},
        "restart": False,
        "base": "current",
    }
    assert amend["path"] == "/v1/runs/r%201/amendments"
    assert parts["body"]["group_schedules"] == {"g": {"type": "ConstantLR"}}
    assert withdraw["method"] == "DELETE" and withdraw["query"] == {}
    assert rewind["body"] == {"to_step": 5, "key": "k", "note": "n"}
    assert out["urls"][2] == "/v1/runs/r/overrides/2?dry_run=true"


def test_the_page_shows_the_markers_and_the_steering_forms(
    browser_server: ServerProcess, page: Page
) -> None:
    rid = new_id("dash-dom")
    with browser_server.client() as c:
        _steered_run(c, rid)
    page.goto(f"{browser_server.url}/#{rid}")
    page.wait_for_selector("#steering")
    chart = page.locator("#chart-rate-lr")
    marks = chart.locator(".marker").evaluate_all(
        "ms => ms.map(m => [m.dataset.kind, Number(m.dataset.step)])"
    )
    # The rewind to step 2 undid both reductions (steps 4 and 6): no reduction marker.
    assert sorted(map(tuple, marks)) == [
        ("amendment", 500),
        ("override", 300),
        ("override", 1100),
        ("rewind", 2),
        ("withdrawn", 800),
    ]
    assert chart.locator(".span-abandoned[data-rewind='1']").is_visible()
    assert chart.locator(".span-abandoned").get_attribute("title") == (
        "steps 3..6: abandoned by rewind 1"
    )
    for kind in ("override", "withdraw", "amend", "rewind"):
        assert page.locator(f"#steering form[data-kind={kind}]").count() == 1
    changes = page.locator("#changes").inner_text()
    assert "amendment 1 (restart)" in changes and "rewind 1 to 2" in changes
    assert "abandoned by rewind 1" in page.locator("#events-table").inner_text()


def _fill_override(page: Page, from_step: int) -> None:
    """Fill the override form and submit it, as a person would."""
    form = page.locator("#steering form[data-kind=override]")
    form.get_by_label("from step").fill(str(from_step))
    form.get_by_label("action").select_option("scale")
    form.get_by_label("value").fill("0.5")
    form.get_by_label("note").fill("from the browser")
    form.get_by_role("button", name="apply override").click()


def test_a_person_previews_confirms_and_is_told_when_too_late_in_a_browser(
    browser_server: ServerProcess, page: Page, tmp_path: Path
) -> None:
    rid = new_id("dash-click")
    with browser_server.client() as c:
        _run_with_reports(c, rid)
        run = c.get(f"/v1/runs/{rid}").json()
    page.goto(f"{browser_server.url}/#{rid}")
    page.wait_for_selector("#steering")
    # Too late: the message names the earliest step; its button asks again from there.
    _fill_override(page, 10)
    retry = page.locator("#steer-out .retry")
    offered = re.fullmatch(r"apply from step (\d+) instead", retry.inner_text())
    assert offered is not None, retry.inner_text()
    earliest = int(offered.group(1))
    assert earliest >= run["leased_until"]
    retry.click()
    summary = page.locator("#confirm .first-change").inner_text()
    assert f"from step {earliest}" in page.locator("#confirm b").inner_text()
    curves = page.locator("#confirm path").evaluate_all(
        "ps => ps.map(p => p.getAttribute('class'))"
    )
    assert curves.count("before") == 2 and curves.count("after") == 2  # two groups
    found = re.search(r"step (\d+)", summary)
    assert found is not None and int(found.group(1)) >= earliest
    with browser_server.client() as c:
        assert c.get(f"/v1/runs/{rid}").json()["version"] == run["version"]  # not yet
    page.screenshot(path=str(tmp_path / "confirm.png"))
    # Meanwhile a trainer takes values past that step: "confirm" is now too late, and the
    # offer asks for a new dry run from the new earliest step; nothing is applied unseen.
    with browser_server.client() as c:
        window = {"start": 0, "count": earliest + 100}
        assert c.get(f"/v1/runs/{rid}/lr", params=window).status_code == 200
    page.locator("#confirm .confirm-yes").click()
    retry = page.locator("#steer-out .retry")
    offered = re.fullmatch(r"apply from step (\d+) instead", retry.inner_text())
    assert offered is not None and int(offered.group(1)) > earliest + 100, retry.inner_text()
    later = int(offered.group(1))
    with browser_server.client() as c:
        assert c.get(f"/v1/runs/{rid}").json()["overrides"] == []
    retry.click()
    page.wait_for_function(
        f"document.querySelector('#confirm b')?.textContent.endsWith('from step {later}')"
    )
    # Confirm: the change is made, and the page shows it as a marker at its step.
    page.locator("#confirm .confirm-yes").click()
    page.wait_for_selector(f"#chart-rate-lr .marker[data-kind=override][data-step='{later}']")
    with browser_server.client() as c:
        overrides = c.get(f"/v1/runs/{rid}").json()["overrides"]
    assert [(o["from_step"], o["value"], o["note"]) for o in overrides] == [
        (later, 0.5, "from the browser")
    ]
