"""The LR range test over HTTP, on SQLite and PostgreSQL (a real uvicorn server each).

torch-lr-finder is the oracle of the curve (rates, smoothed losses, stop step, ``steepest``)
and fastai's rules, copied verbatim in ``tests/schedules/test_range_test.py``, of ``valley``
and ``minimum``. With ``world_size > 1`` the ranks' losses differ and each rank alone would
stop at another step; every rank's answers must say ``stop`` from the same step on, the step at
which the ranks' mean diverges.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from lrserve import _types

from service.api import schemas
from tests.conftest import ServerProcess
from tests.schedules.test_range_test import (
    _shape,
    fastai_minimum,
    fastai_span,
    fastai_valley,
    run_finder,
)
from tests.service.helpers import new_id
from tests.service.test_runs_api import problem


@pytest.fixture
def client(server: ServerProcess) -> httpx.Client:
    with server.client() as c:
        yield c  # type: ignore[misc]


def range_spec(**params: Any) -> dict[str, Any]:
    node = {"type": "LRRangeTest", "start_lr": 1e-7, "end_lr": 10, "num_iter": 100, **params}
    return {"groups": [{"name": "g", "lr": 1e-3}], "schedule": node}


def report(client: httpx.Client, rid: str, step: int, loss: float, rank: int = 0) -> dict[str, Any]:
    r = client.post(
        f"/v1/runs/{rid}/metrics", json={"step": step, "rank": rank, "values": {"loss": loss}}
    )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_curve_and_stop_match_torch_lr_finder_and_fastai(client: httpx.Client) -> None:
    losses = _shape(100, 1)
    history, _, suggested = run_finder(losses, 1e-7, end_lr=10, num_iter=100)
    stop_at = len(history["loss"]) - 1
    assert stop_at < 99  # this sequence diverges
    rid = new_id("rt")
    assert client.put(f"/v1/runs/{rid}", json=range_spec()).status_code == 201
    for step, loss in enumerate(losses[: stop_at + 3]):
        a = report(client, rid, step, loss)
        # stop from the diverging step on; the answer's rate is the next step's
        assert a["stop"] is (step >= stop_at), step
        if step + 1 < len(history["lr"]):
            assert a["groups"]["g"]["lr"] == history["lr"][step + 1]
    # An exact duplicate of an earlier report answers its own step's stop.
    assert report(client, rid, stop_at, losses[stop_at])["stop"] is True
    r = client.get(f"/v1/runs/{rid}/range-test")
    assert r.status_code == 200, r.text
    curve = r.json()
    assert curve["run"] == rid and curve["stopped_at"] == stop_at and curve["finished"]
    assert curve["steps"] == list(range(stop_at + 1))  # the reports after the stop: ignored
    assert curve["lr"] == history["lr"] == curve["groups"]["g"]
    assert curve["loss"] == losses[: stop_at + 1]
    assert curve["smoothed"] == history["loss"]
    flrs, flosses = fastai_span(history["lr"], history["loss"], 100)
    assert curve["suggestions"] == {
        "steepest": suggested,
        "valley": fastai_valley(flrs, flosses, 100)[0],
        "minimum": fastai_minimum(flrs, flosses, 100)[0],
    }
    steps = curve["suggested_steps"]
    assert curve["lr"][steps["steepest"]] == suggested
    assert curve["lr"][steps["minimum"]] / 10 == curve["suggestions"]["minimum"]
    assert r.headers["etag"] == f'"{curve["version"]}"'
    # The documented answer model (extra keys forbidden) and the SDK's TypedDict agree.
    schemas.RangeTestOut.model_validate(curve)
    assert set(_types.RangeTestResult.__annotations__) == set(schemas.RangeTestOut.model_fields)
    assert (
        "stop" in _types.ReportResult.__annotations__ and "stop" in schemas.ReportOut.model_fields
    )
    # The state says the same, and reads change nothing.
    run = client.get(f"/v1/runs/{rid}").json()
    assert run["state"]["schedule"]["stopped_at"] == stop_at
    assert client.get(f"/v1/runs/{rid}/range-test").json() == curve


def test_world_size_two_stops_every_rank_at_the_same_step(client: httpx.Client) -> None:
    n = 60
    # Two ranks with different losses: alone, each would diverge at another step.
    a_losses = _shape(n, 11, noise=0.02)
    b_losses = [x * (1.0 + 0.5 * (i > 40) * (i - 40)) for i, x in enumerate(_shape(n, 12))]
    mean = [(x + y) / 2 for x, y in zip(a_losses, b_losses, strict=True)]
    alone_a = len(run_finder(a_losses, 1e-6, end_lr=1.0, num_iter=n)[0]["loss"]) - 1
    alone_b = len(run_finder(b_losses, 1e-6, end_lr=1.0, num_iter=n)[0]["loss"]) - 1
    history, _, _ = run_finder(mean, 1e-6, end_lr=1.0, num_iter=n)
    together = len(history["loss"]) - 1
    assert len({alone_a, alone_b, together}) > 1 and together < n - 1
    rid = new_id("rt2")
    spec = {**range_spec(start_lr=1e-6, end_lr=1.0, num_iter=n), "world_size": 2}
    assert client.put(f"/v1/runs/{rid}", json=spec).status_code == 201
    answers: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for step in range(together + 2):
        first = report(client, rid, step, a_losses[step], rank=0)
        assert not first["complete"]
        answers[1].append(report(client, rid, step, b_losses[step], rank=1))
        # rank 0 asks again (an exact duplicate) once the step is complete
        answers[0].append(report(client, rid, step, a_losses[step], rank=0))
    for step in range(together + 2):
        a0, a1 = answers[0][step], answers[1][step]
        assert a0["complete"] and a1["complete"]
        assert a0["stop"] == a1["stop"] == (step >= together), step
        assert a0["groups"] == a1["groups"]  # identical rates on every rank
    curve = client.get(f"/v1/runs/{rid}/range-test").json()
    assert curve["stopped_at"] == together
    assert curve["loss"] == mean[: together + 1]
    assert curve["smoothed"] == history["loss"]
    assert curve["lr"] == history["lr"]


def test_last_step_says_stop_without_divergence(client: httpx.Client) -> None:
    rid = new_id("rt3")
    assert client.put(f"/v1/runs/{rid}", json=range_spec(num_iter=20)).status_code == 201
    answers = [report(client, rid, s, 1.0 - 0.01 * s)["stop"] for s in range(20)]
    assert answers == [False] * 19 + [True]
    curve = client.get(f"/v1/runs/{rid}/range-test").json()
    assert curve["stopped_at"] is None and curve["finished"] and len(curve["steps"]) == 20
    assert curve["suggestions"]["steepest"] is not None  # 20 >= 17 points


def test_empty_and_short_curves(client: httpx.Client) -> None:
    rid = new_id("rt4")
    assert client.put(f"/v1/runs/{rid}", json=range_spec()).status_code == 201
    empty = client.get(f"/v1/runs/{rid}/range-test").json()
    assert empty["steps"] == empty["lr"] == empty["loss"] == empty["smoothed"] == []
    assert empty["suggestions"] == {"steepest": None, "valley": None, "minimum": None}
    assert empty["stopped_at"] is None and not empty["finished"]
    for s in range(8):
        report(client, rid, s, 2.0 - 0.1 * s)
    short = client.get(f"/v1/runs/{rid}/range-test").json()
    # 8 points: below torch-lr-finder's 17; fastai's span [10:-5] is empty
    assert short["suggestions"] == {"steepest": None, "valley": None, "minimum": None}


def test_non_finite_loss_stops_and_is_written_as_a_string(client: httpx.Client) -> None:
    rid = new_id("rt5")
    assert client.put(f"/v1/runs/{rid}", json=range_spec()).status_code == 201
    report(client, rid, 0, 2.0)
    assert report(client, rid, 1, "NaN")["stop"] is True  # type: ignore[arg-type]
    curve = client.get(f"/v1/runs/{rid}/range-test").json()
    assert curve["stopped_at"] == 1 and curve["loss"] == [2.0, "NaN"]
    assert curve["smoothed"] == [2.0, "NaN"]


def test_bad_input_is_a_4xx_and_changes_nothing(client: httpx.Client) -> None:
    plain = new_id("plain")
    spec = {"groups": [{"name": "g", "lr": 0.1}], "schedule": {"type": "StepLR", "step_size": 3}}
    assert client.put(f"/v1/runs/{plain}", json=spec).status_code == 201
    body = problem(client.get(f"/v1/runs/{plain}/range-test"), 409, "conflict")
    assert "LRRangeTest" in body["detail"]
    problem(client.get(f"/v1/runs/{new_id('missing')}/range-test"), 404, "run-not-found")
    problem(client.get("/v1/runs/bad id!/range-test"), 422, "validation-error")
    # A plain run's report answers stop: false.
    assert report(client, plain, 0, 1.0)["stop"] is False
    for schedule, loc in [
        ({"type": "LRRangeTest", "num_iter": 1}, "num_iter"),
        ({"type": "LRRangeTest", "smooth_f": 1.5}, "smooth_f"),
        ({"type": "LRRangeTest", "end_lr": [1.0, 2.0]}, "end_lr"),
        (
            {
                "type": "SequentialLR",
                "schedulers": [{"type": "LRRangeTest"}, {"type": "StepLR", "step_size": 2}],
                "milestones": [5],
            },
            "schedule",
        ),
    ]:
        rid = new_id("bad")
        r = client.put(
            f"/v1/runs/{rid}", json={"groups": [{"name": "g", "lr": 0.1}], "schedule": schedule}
        )
        err = problem(r, 422, "validation-error")
        assert any(loc in [str(p) for p in e["loc"]] for e in err["errors"]), err
        problem(client.get(f"/v1/runs/{rid}"), 404, "run-not-found")


def test_rewind_replays_the_curve_from_the_new_branch(client: httpx.Client) -> None:
    # A job restarted from a checkpoint: the steps after it are reported again, with other
    # losses; the curve and the stop are those of the run's timeline, not the abandoned branch.
    losses = _shape(100, 1)
    history, _, _ = run_finder(losses, 1e-7, end_lr=10, num_iter=100)
    stop_at = len(history["loss"]) - 1
    rid = new_id("rt6")
    assert client.put(f"/v1/runs/{rid}", json=range_spec()).status_code == 201
    diverging = [*losses[:30], *[x * 100 for x in losses[30:40]]]
    answers = [report(client, rid, s, loss)["stop"] for s, loss in enumerate(diverging)]
    assert answers.index(True) < 40  # the spike stopped the test
    r = client.post(f"/v1/runs/{rid}/rewind", json={"to_step": 29, "key": "restart-1"})
    assert r.status_code == 200, r.text
    for step, loss in enumerate(losses[30 : stop_at + 1], start=30):
        assert report(client, rid, step, loss)["stop"] is (step >= stop_at), step
    curve = client.get(f"/v1/runs/{rid}/range-test").json()
    assert curve["stopped_at"] == stop_at and curve["steps"] == list(range(stop_at + 1))
    assert curve["loss"] == losses[: stop_at + 1]
    assert curve["smoothed"] == history["loss"]
