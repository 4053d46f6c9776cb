"""Plateau state at many reductions (issue 12): exact to torch, and per-report work that does
not copy or rebuild what a report does not change.

torch's ``ReduceLROnPlateau`` is the oracle: a long stream of reports with many reductions
goes to it and to our transition, and every step's lr, read one step at a time, as windows
that start and end anywhere (the windowed evaluation reads only the reductions in its span)
and as scattered steps, must agree. The structural tests check what makes a report's cost
independent of the reductions already made: a report that does not reduce shares the caller's
list instead of copying it, and the parsed table is memoised per list, exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service.schedules.base import CompileContext, GroupBase
from service.schedules.plateau import PlateauCurve, ReduceLROnPlateau
from tests.schedules.conftest import assert_matches, make_optimizer

LRS = [1.0, 0.1, 3e-4]


def _ctx(lrs: list[float]) -> CompileContext:
    base = GroupBase(
        names=tuple(f"g{i}" for i in range(len(lrs))),
        lr=np.asarray(lrs, dtype=np.float64),
        momentum=np.full(len(lrs), np.nan),
    )
    return CompileContext(base=base)


def _spec() -> dict[str, Any]:
    return {
        "type": "ReduceLROnPlateau",
        "metric": "val_loss",
        "factor": 0.97,
        "patience": 0,
        "threshold": 0.0,
        "min_lr": [0.0, 1e-3, 0.0],
        "eps": 0.0,
    }


def _stream(n: int) -> list[float]:
    """Mostly worsening values (a reduction per report), with an improvement now and then."""
    rng = np.random.default_rng(7)
    return [float(v) for v in 1.0 + np.cumsum(rng.choice([0.1, 0.1, 0.1, -0.5], size=n))]


def _run(n: int) -> tuple[PlateauCurve, dict[str, Any], np.ndarray, int]:
    """Our curve and state after ``n`` reports at steps 0, 2, 4, ..., and torch's lr at every
    step ``0 .. 2n`` (torch's ``step(metric)`` at step s gives the lr from s + 1)."""
    spec = _spec()
    curve = ReduceLROnPlateau.model_validate(spec).compile(_ctx(LRS))
    assert isinstance(curve, PlateauCurve)
    opt = make_optimizer(LRS)
    kw = {k: v for k, v in spec.items() if k not in ("type", "metric")}
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    state: dict[str, Any] = {curve.path: curve.initial_state()}
    expected = []
    current = [float(g["lr"]) for g in opt.param_groups]
    for i, value in enumerate(_stream(n)):
        step = 2 * i
        # Steps step and step + 1 carry the lr in force before this report's decision.
        expected += [current, current]
        node, _ = curve.observe(state[curve.path], value, step, state)
        state = {**state, curve.path: node}
        sched.step(value)
        current = [float(g["lr"]) for g in opt.param_groups]
        expected[-1] = current  # the decision applies from step + 1
    expected.append(current)
    return curve, state, np.array(expected).T, len(state[curve.path]["reductions"])


def test_many_reductions_match_torch_in_every_window() -> None:
    curve, state, expected, reductions = _run(1500)
    assert reductions > 1000
    steps = expected.shape[1]
    whole = curve.lr(np.arange(steps, dtype=np.float64), state)
    assert_matches(whole, expected)
    rng = np.random.default_rng(3)
    for _ in range(40):
        start = int(rng.integers(0, steps - 1))
        count = int(rng.integers(1, min(300, steps - start) + 1))
        t = np.arange(start, start + count, dtype=np.float64)
        assert_matches(curve.lr(t, state), expected[:, start : start + count])
    for step in [0, 1, 2, 3, steps // 2, steps - 2, steps - 1, steps + 10_000]:
        ours = curve.lr(np.array([float(step)]), state)
        assert_matches(ours, expected[:, min(step, steps - 1)].reshape(-1, 1))
    scattered = rng.integers(0, steps, size=200)
    assert_matches(curve.lr(scattered.astype(np.float64), state), expected[:, scattered])


def test_windowed_chain_map_and_multiplier_agree_with_the_whole_table() -> None:
    curve, state, _, _ = _run(400)
    node = state[curve.path]
    steps = np.array([r["step"] for r in node["reductions"]])
    factors = np.array([r["factor"] for r in node["reductions"]]).T
    t = np.arange(0, 820, dtype=np.float64)
    a, b = curve.chain_map(t, state)
    expected = np.ones_like(a)
    for k, s in enumerate(steps):
        expected[:, s] = factors[:, k]
    assert np.array_equal(a, expected) and not b.any()
    for start, count in [(0, 1), (301, 7), (799, 21), (5, 400)]:
        window = np.arange(start, start + count, dtype=np.float64)
        assert np.array_equal(curve.chain_map(window, state)[0], expected[:, start : start + count])
    # The multiplier is the running product, in order (as torch multiplies).
    m = curve.multiplier(t, state)
    running = np.concatenate([np.ones((3, 1)), np.multiply.accumulate(factors, axis=1)], axis=1)
    assert np.array_equal(m, running[:, np.searchsorted(steps, t.astype(int), side="right")])


def test_a_report_that_does_not_reduce_shares_the_reductions_list() -> None:
    curve, state, _, reductions = _run(50)
    before = state[curve.path]["reductions"]
    # An improvement: no reduction, so the new state keeps the very same (unchanged) list.
    node, decision = curve.observe(state[curve.path], -1e9, 200, state)
    assert not decision["reduced"]
    assert node["reductions"] is before
    # A reduction: a new list, the caller's untouched.
    node2, decision2 = curve.observe(node, 1e9, 202, {curve.path: node})
    assert decision2["reduced"]
    assert node2["reductions"] is not before
    assert len(before) == reductions and len(node2["reductions"]) == reductions + 1


def test_the_table_memo_is_exact_when_a_list_grows_or_is_replaced() -> None:
    curve, state, _, _ = _run(30)
    node = state[curve.path]
    t = np.arange(0, 200, dtype=np.float64)
    first = curve.multiplier(t, state)
    assert np.array_equal(curve.multiplier(t, state), first)  # (memoised)
    # Appending in place changes the length: the memo must not answer for it.
    node["reductions"].append({"step": 150, "factor": [0.5, 0.5, 0.5], "lr": [0.0, 0.0, 0.0]})
    grown = curve.multiplier(t, state)
    assert np.array_equal(grown[:, :150], first[:, :150])
    assert np.array_equal(grown[:, 150:], first[:, 150:] * 0.5)
    # A different list with the same content: the same values.
    copy = {curve.path: {**node, "reductions": [dict(r) for r in node["reductions"]]}}
    assert np.array_equal(curve.multiplier(t, copy), grown)
