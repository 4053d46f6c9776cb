"""The work budget (issue 14, "One request can stop the server").

Three requests, each within every limit documented before, stopped the server: a
ChainedScheduler of 1,024 x 22 StepLR nodes asked for 100,000 steps (214 s of CPU, /healthz
frozen 245 s); a 1,024-group window of 100,000 steps (14 GB of memory, a 2.5 GB body); a long
expression evaluated at step 67,000,000 (41 s). Each is now refused up front (422
``work-limit``, naming the limit and what to ask for instead), and what is accepted but
expensive runs off the event loop: ``/healthz`` sampled meanwhile answers within 100 ms and
the server's memory stays within the bound docs/operations.md states. Real uvicorn, real
SQLite, real torch for the SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from service.runs.limits import (
    MAX_SPEC_NODES,
    MAX_WINDOW_VALUES,
    check_spec_limits,
    check_values,
)
from service.schedules import Program, ScheduleSpec
from service.schedules.cost import WORK_BUDGET, WorkLimitExceeded, check_work
from tests.conftest import ServerProcess
from tests.service.helpers import new_id

HEALTHZ_MS = 100
RSS_BOUND_MB = 600
"""docs/operations.md: one process stays under 600 MB whatever it is asked (values cache
64 MB, two expensive evaluations at once of at most ~250 MB each, the baseline)."""

TERM = "min(1, (epoch + 1) / 500) * 0.999999"
LONG_EXPR = "(" + " + ".join([TERM] * 19) + ") / 19"  # 745 characters, ~180 operations


def groups(n: int, momentum: bool = False) -> list[dict[str, Any]]:
    return [
        {"name": f"g{i}", "lr": 0.1, **({"momentum": 0.9} if momentum else {})} for i in range(n)
    ]


def chained_steplr_spec(outer: int = 1024, inner: int = 22) -> dict[str, Any]:
    """(a): a ChainedScheduler of ``outer`` ChainedSchedulers of ``inner`` StepLR each."""
    child = {
        "type": "ChainedScheduler",
        "schedulers": [{"type": "StepLR", "step_size": 1000}] * inner,
    }
    return {
        "groups": groups(1),
        "schedule": {"type": "ChainedScheduler", "schedulers": [child] * outer},
    }


def wide_spec(n: int = 1024) -> dict[str, Any]:
    """(b): 1,024 groups with momentum, a cosine."""
    return {
        "groups": groups(n, momentum=True),
        "schedule": {"type": "CosineAnnealingLR", "T_max": 100_000},
    }


def long_lambda_spec() -> dict[str, Any]:
    """(c): MultiplicativeLR with a 760-character lambda (a running product from step 0)."""
    return {
        "groups": groups(1),
        "schedule": {
            "type": "MultiplicativeLR",
            "lr_lambda": f"min(1.0, 0.9999999 + 0 * ({LONG_EXPR}))",
        },
    }


def work_problem(r: httpx.Response, limit: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["type"] == "/problems/work-limit", body
    assert body["limit"] == limit and body["amount"] > body["maximum"], body
    assert f"the limit is {body['maximum']:,}" in body["detail"], body
    return body


PROBE = r"""
import json, select, sys, time, httpx
url, pid = sys.argv[1], int(sys.argv[2])
def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS"))
samples = []
with httpx.Client(base_url=url, timeout=30) as c:
    def sample():
        t = time.perf_counter()
        status = c.get("/healthz").status_code
        samples.append((time.perf_counter() - t, rss(), status))
        time.sleep(0.01)
    for _ in range(3):  # connected
        sample()
    samples.clear()
    idle = time.monotonic() + 0.5
    while time.monotonic() < idle:  # the idle server on this machine now: the baseline
        sample()
    print(json.dumps(max(lat for lat, _, _ in samples)), flush=True)
    samples.clear()
    while not select.select([sys.stdin], [], [], 0)[0]:
        sample()
print(json.dumps(samples), flush=True)
"""


class Watch:
    """/healthz latencies and the server's RSS, sampled while a request runs.

    The probe is its own process: in this one, reading a 50 MB answer would delay it."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.latencies: list[float] = []
        self.rss: list[float] = []

    def __enter__(self) -> Watch:
        self._probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, self.srv.url, str(self.srv.process.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._probe.stdout is not None
        self.idle_worst = float(self._probe.stdout.readline())  # before the request starts
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # at least one answer right after the request
        out, _ = self._probe.communicate("stop\n", timeout=30)
        samples = json.loads(out.strip().splitlines()[-1])
        assert all(status == 200 for _, _, status in samples)
        self.latencies = [lat for lat, _, _ in samples]
        self.rss = [mb for _, mb, _ in samples]

    def check(self) -> None:
        assert self.latencies, "no /healthz answer was sampled"
        worst = max(self.latencies) * 1000
        # 100 ms, unless the idle server on this (shared, loaded) machine was already slower:
        # then twice what it was. A blocked event loop takes seconds and fails either way.
        bound = max(HEALTHZ_MS, 2 * self.idle_worst * 1000)
        assert worst < bound, (
            f"/healthz took {worst:.0f} ms meanwhile (idle: {self.idle_worst * 1000:.0f} ms)"
        )
        idle = self.idle_worst * 1000
        print(f"/healthz worst {worst:.0f} ms (idle {idle:.0f} ms), RSS <= {max(self.rss):.0f} MB")
        assert max(self.rss) < RSS_BOUND_MB, f"RSS reached {max(self.rss):.0f} MB"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.conftest import start_server

    tmp = tmp_path_factory.mktemp("work-budget")
    server = start_server(tmp, f"sqlite:///{tmp / 'lrserve.db'}")
    try:
        yield server
    finally:
        server.stop()


# -- the work model, pure ----------------------------------------------------------------


def test_the_three_requests_cost_more_than_the_budget() -> None:
    with pytest.raises(WorkLimitExceeded) as a:
        check_spec_limits(Program(ScheduleSpec.model_validate(chained_steplr_spec())))
    assert a.value.limit == "spec nodes" and a.value.maximum == MAX_SPEC_NODES
    wide = Program(ScheduleSpec.model_validate(wide_spec()))
    check_spec_limits(wide)  # the spec itself is fine
    with pytest.raises(WorkLimitExceeded) as b:
        check_values(wide.series, 100_000, "this window")
    assert b.value.max_count == MAX_WINDOW_VALUES // 2048 == 512
    long = Program(ScheduleSpec.model_validate(long_lambda_spec()))
    check_spec_limits(long)
    with pytest.raises(WorkLimitExceeded) as c:
        check_work(long, 67_000_000, 1, WORK_BUDGET, "one step")
    assert c.value.limit == "work"


def test_the_budget_boundary_is_exact() -> None:
    program = Program(ScheduleSpec.model_validate(wide_spec(256)))
    work = program.work(0, 4096)
    assert check_work(program, 0, 4096, work, "w", window=True) == work
    with pytest.raises(WorkLimitExceeded) as exc:
        check_work(program, 0, 4096, work - 1, "w", window=True)
    fits = exc.value.max_count
    assert fits is not None and fits < 4096
    assert program.work(0, fits) <= work - 1 < program.work(0, fits + 1)
    # The work grows with the window and, for a recursion, with the step.
    assert program.work(0, 100) < program.work(0, 200)
    long = Program(ScheduleSpec.model_validate(long_lambda_spec()))
    assert long.work(1_000_000, 1) < long.work(2_000_000, 1)


def test_shared_expressions_are_evaluated_once_for_all_groups() -> None:
    spec = {"groups": groups(64), "schedule": {"type": "LambdaLR", "lr_lambda": LONG_EXPR}}
    one = Program(ScheduleSpec.model_validate({**spec, "groups": groups(1)}))
    many = Program(ScheduleSpec.model_validate(spec))
    # The expression's work is counted once for all 64 groups (it is evaluated once).
    assert many._costs[0].exprs == one._costs[0].exprs > 100
    assert many.work(0, 1000) < 64 * one.work(0, 1000) / 2
    values = many.evaluate({}, 0, 50)
    assert all((values[f"g{i}"]["lr"] == values["g0"]["lr"]).all() for i in range(64))


# -- over HTTP ---------------------------------------------------------------------------


def test_a_refused_with_a_message_naming_the_limit(srv: ServerProcess) -> None:
    rid = new_id()
    with srv.client() as c:
        body = work_problem(c.put(f"/v1/runs/{rid}", json=chained_steplr_spec()), "spec nodes")
        assert "4,096" in body["detail"] and "23,553" in body["detail"]
        assert c.get(f"/v1/runs/{rid}").status_code == 404  # nothing was written
        # The same shape within the node limit is accepted, and its large window refused.
        small = chained_steplr_spec(outer=128)
        assert c.put(f"/v1/runs/{rid}", json=small).status_code == 201
        with Watch(srv) as watch:
            r = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 100_000})
        watch.check()
        body = work_problem(r, "work")
        fits = body["max_count"]
        assert f"ask for count <= {fits}" in body["detail"]
        run = c.get(f"/v1/runs/{rid}").json()
        # What the refusal names fits, and is answered with /healthz free meanwhile.
        with Watch(srv) as watch:
            ok = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": fits})
        watch.check()
        assert ok.status_code == 200 and ok.json()["count"] == fits
        work_problem(c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": fits + 1}), "work")
        # Refusals alter nothing: no lease, no version bump.
        assert c.get(f"/v1/runs/{rid}").json()["version"] == run["version"]


def test_b_window_bounded_in_values_and_memory(srv: ServerProcess) -> None:
    rid = new_id()
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=wide_spec()).status_code == 201
        before = c.get(f"/v1/runs/{rid}").json()
        with Watch(srv) as watch:
            r = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 100_000})
        watch.check()
        body = work_problem(r, "values")
        assert body["max_count"] == 512 and "count <= 512" in body["detail"]
        after = c.get(f"/v1/runs/{rid}").json()
        assert after["version"] == before["version"]
        assert after.get("leased_until") == before.get("leased_until")
        # Just under the limit: answered, /healthz free and memory bounded meanwhile.
        with Watch(srv) as watch:
            ok = c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 512})
        watch.check()
        assert ok.status_code == 200
        assert len(ok.content) < 32 * 1024 * 1024
        assert len(ok.json()["groups"]["g1023"]["momentum"]) == 512
        work_problem(c.get(f"/v1/runs/{rid}/lr", params={"start": 0, "count": 513}), "values")
        # Previews and curves are bounded the same way.
        preview = {**wide_spec(), "count": 100_000}
        work_problem(c.post("/v1/schedules/preview", json=preview), "values")
        # A curve too long to evaluate densely is sampled within the budget (bucket starts).
        with Watch(srv) as watch:
            params = {"start": 0, "stop": 10_000_000, "points": 200}
            curve = c.get(f"/v1/runs/{rid}/curve", params=params)
        watch.check()
        assert curve.status_code == 200, curve.text
        steps = curve.json()["steps"]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 9_999_999
        assert len(curve.json()["groups"]["g7"]["lr"]) == len(steps)
        work_problem(c.get(f"/v1/runs/{rid}/curve", params={**params, "points": 600}), "values")


def test_c_long_expression_at_a_late_step_refused(srv: ServerProcess) -> None:
    rid = new_id()
    with srv.client() as c:
        assert c.put(f"/v1/runs/{rid}", json=long_lambda_spec()).status_code == 201
        with Watch(srv) as watch:
            r = c.get(f"/v1/runs/{rid}/lr", params={"step": 67_000_000})
        watch.check()
        body = work_problem(r, "work")
        assert "earlier step" in body["detail"]
        # A report there is refused before it is stored.
        report = {"step": 67_000_000, "values": {"loss": 1.0}}
        work_problem(c.post(f"/v1/runs/{rid}/metrics", json=report), "work")
        run = c.get(f"/v1/runs/{rid}").json()
        assert run["step"] is None and run["version"] == 1
        # Every accepted run answers a single step up to the guaranteed step, off the loop.
        with Watch(srv) as watch:
            ok = c.get(f"/v1/runs/{rid}/lr", params={"step": (1 << 20) - 1})
        watch.check()
        assert ok.status_code == 200


def test_a_recursion_that_cannot_reach_the_guaranteed_step_is_refused_at_put(
    srv: ServerProcess,
) -> None:
    spec = {
        "groups": groups(1024),
        "schedule": {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "StepLR", "step_size": 10},
                {"type": "CosineAnnealingLR", "T_max": 1000, "eta_min": 0.001},
            ],
        },
    }
    with srv.client() as c:
        body = work_problem(c.put(f"/v1/runs/{new_id()}", json=spec), "work")
        assert "1,048,575" in body["detail"] and "fewer groups" in body["detail"]
        assert "metadata.total_steps" in body["detail"]
        # A preview is held to its own span: its first 100 steps are cheap, step 10^6 is not.
        assert c.post("/v1/schedules/preview", json=spec).status_code == 200
        late = c.post("/v1/schedules/preview", json={**spec, "start": 1 << 20, "count": 1})
        work_problem(late, "work")


def test_a_scanning_chain_is_served_as_a_trainer_walks_it(srv: ServerProcess) -> None:
    """A scanning ChainedScheduler over 8 groups would cost more than the budget at step
    2^20 scanned from step 0, but a trainer walking forward meets every step at the cost of
    a few blocks (each scan resumes from the checkpoints the steps before it left): the spec
    is accepted without a stated length. A far step no checkpoint is near is refused when it
    comes, saying to ask for earlier steps first, and nothing changes; walked to, it is
    served, with the values of a scan from step 0."""

    spec: dict[str, Any] = {
        "groups": groups(8),
        "schedule": {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "CosineAnnealingLR", "T_max": 1000, "eta_min": 0.001},
                # (its own gamma: no other test's run shares this spec's stored checkpoints)
                {"type": "ExponentialLR", "gamma": 0.99990001},
            ],
        },
    }
    far = (1 << 20) - 1
    assert Program(ScheduleSpec.model_validate(spec)).work(far, 1) > WORK_BUDGET
    with srv.client() as c:
        rid = new_id()
        assert c.put(f"/v1/runs/{rid}", json=spec).status_code == 201
        before = c.get(f"/v1/runs/{rid}").json()
        problem = work_problem(c.get(f"/v1/runs/{rid}/lr", params={"step": far}), "work")
        assert "earlier step first" in problem["detail"]
        assert c.get(f"/v1/runs/{rid}").json() == before
        for step in range(0, far, 4096):
            r = c.get(f"/v1/runs/{rid}/lr", params={"step": step})
            assert r.status_code == 200, (step, r.text)
        r = c.get(f"/v1/runs/{rid}/lr", params={"step": far})
        assert r.status_code == 200, r.text
        cold = Program(ScheduleSpec.model_validate(spec)).evaluate(None, far, 1)
        for name, fields in r.json()["groups"].items():
            assert fields["lr"] == pytest.approx(float(cold[name]["lr"][0]), rel=1e-12)
        # Past every checkpoint again: refused, the run as it was.
        before = c.get(f"/v1/runs/{rid}").json()
        work_problem(c.get(f"/v1/runs/{rid}/lr", params={"step": 1 << 22}), "work")
        assert c.get(f"/v1/runs/{rid}").json() == before


def test_sdk_default_window_at_128_256_and_1024_groups(
    srv: ServerProcess, server_factory: Callable[..., ServerProcess]
) -> None:
    torch = pytest.importorskip("torch")
    from lrserve.torch import RemoteScheduler

    for n in (128, 256, 1024):
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(n)]
        opt = torch.optim.SGD([{"params": [p], "lr": 0.1, "momentum": 0.9} for p in params])
        spec = {"schedule": {"type": "CosineAnnealingLR", "T_max": 10_000}}
        with RemoteScheduler(opt, new_id(), url=srv.url, spec=spec) as sched:
            for _ in range(5):
                opt.step()
                sched.step()
            assert sched.version is not None and not sched.holding
            expected = 0.05 * (1 + __import__("math").cos(__import__("math").pi * 5 / 10_000))
            assert abs(opt.param_groups[-1]["lr"] - expected) < 1e-12
            # 2 fields x 4096 steps x 128 groups is the limit; at 256 groups twice it: the SDK
            # shrinks its window to what the refusal names (2048 steps; 512 at 1024 groups).
            assert sched._window_size == min(4096, MAX_WINDOW_VALUES // (2 * n))
