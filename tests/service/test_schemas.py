"""Every answer is what OpenAPI documents: real answers held to the response models.

The response models forbid extra keys, so an answer with an undocumented field, a missing
field or a wrongly typed one fails here; and the OpenAPI document must name a schema for
every /v1 route's success answer and problem+json for its errors.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from service.api import schemas
from tests.conftest import ServerProcess
from tests.service.helpers import new_id

SPEC: dict[str, Any] = {
    "groups": [
        {"name": "backbone", "lr": 0.01, "momentum": 0.9},
        {"name": "head", "lr": 0.1, "betas": [0.9, 0.999]},
    ],
    "schedule": {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 1000},
    "group_schedules": {"head": {"type": "ReduceLROnPlateau", "metric": "val_loss", "patience": 0}},
    "world_size": 2,
}


def _check(model: type[BaseModel], response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    model.model_validate(response.json())
    return response.json()


def _problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    schemas.Problem.model_validate(response.json())


def test_answers_match_their_response_models(live_server: ServerProcess) -> None:
    rid = new_id("schema")
    with live_server.client() as c:
        _check(schemas.RunOut, c.put(f"/v1/runs/{rid}", json=SPEC), 201)
        _check(schemas.RunOut, c.put(f"/v1/runs/{rid}", json=SPEC), 200)
        for rank, loss in ((0, 1.0), (1, "NaN")):
            report = {"step": 5, "rank": rank, "values": {"val_loss": loss, "acc": None}}
            answer = _check(schemas.ReportOut, c.post(f"/v1/runs/{rid}/metrics", json=report))
        assert answer["complete"] and answer["decision"] is not None
        override = {"from_step": 10, "action": "scale", "value": 0.5, "groups": ["backbone"]}
        run = _check(schemas.RunOut, c.post(f"/v1/runs/{rid}/overrides", json=override), 201)
        assert run["overrides"][0]["groups"] == ["backbone"]
        _check(schemas.RunOut, c.get(f"/v1/runs/{rid}"))
        _check(schemas.RunListOut, c.get("/v1/runs", params={"limit": 1}))
        _check(schemas.StepValuesOut, c.get(f"/v1/runs/{rid}/lr", params={"step": 3}))
        _check(schemas.StepValuesOut, c.get(f"/v1/runs/{rid}/lr"))
        window = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 20})
        _check(schemas.WindowOut, window)
        not_modified = c.get(
            f"/v1/runs/{rid}/lr",
            params={"step": 3},
            headers={"If-None-Match": window.headers["etag"]},
        )
        assert not_modified.status_code == 304 and not_modified.content == b""
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"})
        body = _check(schemas.MetricHistoryOut, history)
        assert body["aggregate"] == [{"step": 5, "value": "NaN", "branch": 0}]
        # Steering: an amendment, an override withdrawn, a rewind; then the history of both
        # branches and the events that say which is which.
        amend = {"from_step": 900, "schedule": {"type": "ConstantLR", "factor": 0.5}}
        run = _check(schemas.RunOut, c.post(f"/v1/runs/{rid}/amendments", json=amend), 201)
        assert run["amendments"][0]["n"] == 1
        _check(schemas.RunOut, c.post(f"/v1/runs/{rid}/amendments", json=amend), 200)
        run = _check(schemas.RunOut, c.delete(f"/v1/runs/{rid}/overrides/1"))
        assert run["overrides"][0]["until_step"] == run["leased_until"]
        too_late = c.post(f"/v1/runs/{rid}/overrides", json={**override, "from_step": 0})
        _problem(too_late, 409)
        assert too_late.json()["earliest_step"] > run["leased_until"]
        for rank in (0, 1):
            report = {"step": 6, "rank": rank, "values": {"val_loss": 0.5}}
            _check(schemas.ReportOut, c.post(f"/v1/runs/{rid}/metrics", json=report))
        rewound = c.post(f"/v1/runs/{rid}/rewind", json={"to_step": 5, "key": "k1"})
        run = _check(schemas.RunOut, rewound)
        assert run["branch"] == 1 and run["rewinds"][0]["reports_set_aside"] == 2
        history = c.get(f"/v1/runs/{rid}/metrics", params={"name": "val_loss"})
        body = _check(schemas.MetricHistoryOut, history)
        assert [p["step"] for p in body["abandoned"]] == [6, 6]
        events = _check(schemas.EventsOut, c.get(f"/v1/runs/{rid}/events"))
        assert [e["type"] for e in events["events"] if e["abandoned_by"]] == ["report_completed"]
        _check(schemas.CurveOut, c.get(f"/v1/runs/{rid}/curve", params={"points": 50}))
        schedule = {k: SPEC[k] for k in ("groups", "schedule", "group_schedules")}
        _check(schemas.PreviewOut, c.post("/v1/schedules/preview", json={**schedule, "count": 5}))
        points = {**schedule, "points": 20, "stop": 1000}
        assert "steps" in _check(schemas.PreviewOut, c.post("/v1/schedules/preview", json=points))

        _problem(c.get("/v1/runs/nope-0/lr"), 404)
        _problem(c.get(f"/v1/runs/{rid}/lr", params={"step": "x"}), 422)
        _problem(c.put(f"/v1/runs/{rid}", json={**SPEC, "world_size": 3}), 409)
        _problem(c.post(f"/v1/runs/{rid}/metrics", json={"step": 5, "rank": 9, "values": {}}), 422)
        _problem(c.post(f"/v1/runs/{rid}/metrics", json={"step": 1, "values": {}}), 409)
        assert c.delete(f"/v1/runs/{rid}").status_code == 204
        _problem(c.delete(f"/v1/runs/{rid}"), 404)


@pytest.mark.parametrize("auth", [False, True])
def test_openapi_documents_every_answer(server_factory: Any, auth: bool) -> None:
    server = server_factory(token="t0k" if auth else None)
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path, item in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in item.items():
            responses = op["responses"]
            success = [s for s in responses if s.startswith("2")]
            assert success, (method, path)
            for status in success:
                if status == "204":
                    continue
                if path.endswith("/stream"):  # server-sent events, not JSON
                    assert list(responses[status]["content"]) == ["text/event-stream"]
                    continue
                content = responses[status]["content"]["application/json"]
                assert "$ref" in content["schema"] or "anyOf" in content["schema"], (path, status)
            errors = [s for s in responses if s.startswith(("4", "5")) and s != "304"]
            if "{run_id}" in path and method != "put":
                assert "404" in errors, (method, path)
            assert "422" in errors, (method, path)
            for status in errors:
                content = responses[status]["content"]
                assert list(content) == ["application/problem+json"], (method, path, status)
                assert content["application/problem+json"]["schema"] == {
                    "$ref": "#/components/schemas/Problem"
                }
    schemas_doc = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas_doc
    lr = doc["paths"]["/v1/runs/{run_id}/lr"]["get"]
    step = next(p for p in lr["parameters"] if p["name"] == "step")
    assert step["schema"]["maximum"] == 2**53 - 1


def test_sdk_types_follow_the_response_models() -> None:
    """The SDK's TypedDicts describe the same answers: the same keys as the models."""
    import typing

    from lrserve import _types

    pairs: dict[type[BaseModel], Any] = {
        schemas.RunOut: _types.Run,
        schemas.RunSummaryOut: _types.RunSummary,
        schemas.RunListOut: _types.RunList,
        schemas.StepValuesOut: _types.LRValues,
        schemas.ReportOut: _types.ReportResult,
        schemas.DecisionOut: _types.Decision,
        schemas.MetricHistoryOut: _types.MetricHistory,
        schemas.MetricPointOut: _types.MetricPoint,
        schemas.EventOut: _types.Event,
        schemas.EventsOut: _types.EventList,
        schemas.CurveOut: _types.Curve,
        schemas.PreviewOut: _types.Preview,
    }
    for model, typed in pairs.items():
        assert set(typing.get_type_hints(typed)) == set(model.model_fields), model.__name__
