"""``?dry_run=true`` on the steering calls, over HTTP on both databases.

A dry run answers the run as the change would leave it and the curve before and after; it
stores nothing (the run, its events, its reports and its lease read back the same), and the
"after" it shows is exactly what the server serves once the change is really made. The web
page's confirmation dialog shows these curves (tests/service/test_dashboard_steering.py).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from service.api import schemas
from tests.conftest import ServerProcess
from tests.service.helpers import new_id, plateau_spec

COSINE: dict[str, Any] = {
    "groups": [{"name": "g0", "lr": 0.1, "momentum": 0.9}, {"name": "g1", "lr": 0.02}],
    "schedule": {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 0.0},
}
COOLDOWN = {"type": "LinearLR", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 300}
RANGE = {"start": 0, "stop": 1500, "points": 300}


def _stored(c: httpx.Client, rid: str) -> dict[str, Any]:
    """Everything a change could alter, as stored now."""
    run = c.get(f"/v1/runs/{rid}").json()
    return {
        "run": run,
        "events": c.get(f"/v1/runs/{rid}/events").json(),
        "metrics": c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"}).json(),
        "curve": c.get(f"/v1/runs/{rid}/curve", params=RANGE).json(),
    }


def _untimed(run: dict[str, Any]) -> dict[str, Any]:
    """A run without the times a change stamps (the dry run's and the real one differ)."""
    out = {k: v for k, v in run.items() if k != "updated_at"}
    for key in ("overrides", "amendments", "rewinds"):
        out[key] = [
            {k: v for k, v in x.items() if k not in ("at", "withdrawn_at")} for x in run[key]
        ]
    return out


def _dry(c: httpx.Client, method: str, path: str, body: Any = None, **params: Any) -> Any:
    r = c.request(method, path, json=body, params={"dry_run": "true", **RANGE, **params})
    assert r.status_code == 200, r.text
    schemas.ChangePreviewOut.model_validate(r.json())
    return r.json()


def _check_dry_then_real(
    c: httpx.Client, rid: str, method: str, path: str, body: Any = None, **params: Any
) -> dict[str, Any]:
    """Dry-run a change, check nothing moved, make it for real, check the dry run foretold it."""
    stored = _stored(c, rid)
    answer = _dry(c, method, path, body, **params)
    assert answer["dry_run"] is True and answer["changed"] is True
    assert answer["before"] == stored["curve"]
    assert _stored(c, rid) == stored  # nothing stored: run, events, reports, lease
    real = c.request(method, path, json=body, params=params)
    assert real.status_code in (200, 201), real.text
    assert _untimed(real.json()) == _untimed(answer["run"])
    after = c.get(f"/v1/runs/{rid}/curve", params=RANGE).json()
    assert after == answer["after"]  # bit for bit: the same steps, the same values
    assert after != answer["before"]
    return answer


def test_every_steering_change_dry_runs_exactly(server: ServerProcess) -> None:
    rid = new_id("dry")
    with server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=plateau_spec()).status_code == 201
        for step, loss in enumerate([1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99]):
            report = {"step": step, "values": {"val_loss": loss}}
            assert c.post(f"/v1/runs/{rid}/metrics", json=report).status_code == 200
        # Two reductions so far (patience 1); the rewind to step 2 undoes them.
        assert c.get(f"/v1/runs/{rid}").json()["state"] != {}
        ov = {"from_step": 100, "action": "scale", "value": 0.5, "groups": ["g1"], "note": "x"}
        answer = _check_dry_then_real(c, rid, "POST", f"/v1/runs/{rid}/overrides", ov)
        assert answer["run"]["overrides"][0]["n"] == 1
        amend = {"from_step": 400, "schedule": COOLDOWN, "restart": True, "base": "current"}
        answer = _check_dry_then_real(c, rid, "POST", f"/v1/runs/{rid}/amendments", amend)
        assert [a["from_step"] for a in answer["run"]["amendments"]] == [400]
        answer = _check_dry_then_real(
            c, rid, "DELETE", f"/v1/runs/{rid}/overrides/1", from_step=900
        )
        assert answer["run"]["overrides"][0]["until_step"] == 900
        rewind = {"to_step": 2, "key": "ckpt-2", "note": "spike"}
        answer = _check_dry_then_real(c, rid, "POST", f"/v1/runs/{rid}/rewind", rewind)
        assert answer["run"]["rewinds"][0]["reports_set_aside"] == 4
        assert answer["run"]["branch"] == 1

        # A change that would change nothing says so, and still stores nothing.
        stored = _stored(c, rid)
        same = _dry(c, "POST", f"/v1/runs/{rid}/amendments", amend)
        assert same["changed"] is False and same["after"] == same["before"]
        again = _dry(c, "POST", f"/v1/runs/{rid}/rewind", rewind)
        assert again["changed"] is False
        assert _stored(c, rid) == stored


def test_a_dry_run_is_refused_as_the_change_would_be(server: ServerProcess) -> None:
    rid = new_id("dry-bad")
    with server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=COSINE).status_code == 201
        c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 300})  # a trainer's window
        c.post(f"/v1/runs/{rid}/overrides", json={"from_step": 600, "action": "set", "value": 0.01})
        stored = _stored(c, rid)
        earliest = stored["run"]["leased_until"]
        dry = {"dry_run": "true"}
        late = [
            ("POST", "overrides", {"from_step": 10, "action": "scale", "value": 0.5}, {}),
            ("POST", "amendments", {"from_step": 10, "schedule": COOLDOWN}, {}),
            ("DELETE", "overrides/1", None, {"from_step": 10}),
        ]
        for method, path, body, params in late:
            r = c.request(method, f"/v1/runs/{rid}/{path}", json=body, params={**dry, **params})
            assert r.status_code == 409, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"] == "/problems/too-late"
            assert r.json()["earliest_step"] >= earliest
            assert str(r.json()["earliest_step"]) in r.json()["detail"]
        bad: list[tuple[str, str, Any, dict[str, Any], int]] = [
            (
                "POST",
                "overrides",
                {"from_step": 400, "action": "scale", "value": 1},
                {"dry_run": "maybe"},
                422,
            ),
            (
                "POST",
                "overrides",
                {"from_step": 400, "action": "scale", "value": 1},
                {**dry, "points": 1},
                422,
            ),
            (
                "POST",
                "amendments",
                {"from_step": 400, "schedule": COOLDOWN},
                {**dry, "start": 10, "stop": 5},
                422,
            ),
            (
                "POST",
                "amendments",
                {"from_step": 400, "schedule": COOLDOWN},
                {**dry, "stop": 10**12},
                422,
            ),
            (
                "POST",
                "amendments",
                {"from_step": 400, "schedule": COOLDOWN},
                {**dry, "start": -1},
                422,
            ),
            ("POST", "amendments", {"from_step": 400}, dry, 422),
            (
                "POST",
                "overrides",
                {"from_step": 400, "action": "scale", "value": 1, "groups": ["x"]},
                dry,
                422,
            ),
            ("DELETE", "overrides/7", None, dry, 422),
            ("POST", "rewind", {"to_step": 5}, dry, 422),  # the run has reached no step
            ("POST", "rewind", {"to_step": 5}, {**dry, "stop": "x"}, 422),
        ]
        for method, path, body, params, status in bad:
            r = c.request(method, f"/v1/runs/{rid}/{path}", json=body, params=params)
            assert r.status_code == status, (path, params, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        hostile: list[dict[str, Any]] = [
            {"dry_run": ""},
            {"dry_run": "true", "points": 10_001},
            {"dry_run": "true", "stop": 0},
            {"dry_run": "true", "start": 2**63},
            {"dry_run": "true", "start": "1e3"},
            {"dry_run": ["true", "false"], "points": "NaN"},
        ]
        for params in hostile:
            body = {"from_step": 400, "action": "scale", "value": 0.5}
            r = c.post(f"/v1/runs/{rid}/overrides", json=body, params=params)
            assert r.status_code == 422, (params, r.text)
        junk = c.post(
            f"/v1/runs/{rid}/amendments",
            content=b'{"from_step": 400, "schedule": [',
            headers={"Content-Type": "application/json"},
            params=dry,
        )
        assert junk.status_code == 422, junk.text
        r = c.post("/v1/runs/nope-dry/rewind", json={"to_step": 1}, params=dry)
        assert r.status_code == 404
        assert _stored(c, rid) == stored


@pytest.mark.parametrize("read_only", [False, True])
def test_a_dry_run_needs_the_token_the_change_needs(server_factory: Any, read_only: bool) -> None:
    server = server_factory(token="rw-tok", read_token="ro-tok")
    rid = new_id("dry-auth")
    with server.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=COSINE).status_code == 201
    token = "ro-tok" if read_only else "rw-tok"
    r = httpx.post(
        f"{server.url}/v1/runs/{rid}/overrides",
        params={"dry_run": "true", **RANGE},
        json={"from_step": 400, "action": "scale", "value": 0.5},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == (403 if read_only else 200), r.text
