"""Cases found by review, each a 500 or a wrong answer before: the run model, the engine,
the hot paths' own checks."""

from __future__ import annotations

import math

import pytest

from service.runs.model import aggregate
from service.schedules import Program, ScheduleSpec, SpecError
from tests.conftest import ServerProcess


def test_mean_of_finite_values_whose_sum_overflows_is_their_mean() -> None:
    # math.fsum raised OverflowError here: a 500, retried for ever by every rank's outbox.
    big = 1.7e308
    assert aggregate([(0, {"x": big}), (1, {"x": big})], "mean") == {"x": big}
    out = aggregate([(0, {"x": big}), (1, {"x": big}), (2, {"x": -big})], "mean")["x"]
    assert out is not None and math.isclose(out, big / 3, rel_tol=1e-15)


def test_far_step_of_a_child_that_keeps_the_previous_lr_is_refused() -> None:
    # SequentialLR scanned from the milestone to the step: at 2**40, an 8 TiB allocation.
    spec = ScheduleSpec.model_validate(
        {
            "groups": [{"name": "a", "lr": 0.1}],
            "schedule": {
                "type": "SequentialLR",
                "milestones": [5],
                "schedulers": [
                    {"type": "ConstantLR"},
                    {"type": "MultiplicativeLR", "lr_lambda": "0.99"},
                ],
            },
        }
    )
    program = Program(spec)
    assert program.evaluate({}, 1000, 1)["a"]["lr"][0] > 0
    with pytest.raises(SpecError, match="step by step"):
        program.evaluate({}, 2**40, 1)


def test_lone_surrogate_in_metadata_is_a_422(live_server: ServerProcess) -> None:
    # FastAPI's JSON parser accepts "\ud800"; the normalised spec then could not be parsed
    # back (a 500, and the keep-alive connection reset). Now the body is refused.
    body = (
        '{"groups": [{"name": "a", "lr": 0.1}], "schedule": {"type": "ConstantLR"}, '
        '"metadata": {"k": "\\ud800"}}'
    )
    with live_server.client() as c:
        answer = c.put(
            "/v1/runs/surrogate-1", content=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0]["loc"][:2] == ["body", "metadata"]
        assert c.get("/v1/runs/surrogate-1").status_code == 404


def test_run_id_with_a_trailing_newline_is_refused_on_the_hot_paths(
    live_server: ServerProcess,
) -> None:
    # Python's "$" matches before a final newline: the hot routes' hand-made check let
    # "id\n" through while the documented routes (pydantic) refused it.
    with live_server.client() as c:
        assert c.get("/v1/runs/abc%0A/lr").status_code == 422
        report = {"step": 0, "values": {"loss": 1.0}}
        assert c.post("/v1/runs/abc%0A/metrics", json=report).status_code == 422
        assert c.get("/v1/runs/abc%0A").status_code == 422
