"""Checkpointed scans of a recursive ChainedScheduler (issue 12), against torch itself.

A ChainedScheduler that needs a scan (a child adds to the lr: CosineAnnealingLR with
``eta_min``) keeps the lr at every 2,048-step block edge in a bounded memo, keyed by the
compiled curve and by the metric-driven state the scan depends on up to that edge. These tests
step torch's own schedulers (ReduceLROnPlateau interleaved at its place in the chain, as in
test_plateau_compose) over the whole horizon and compare far windows asked in any order, cold
and warm, before and after a plateau child's state grows.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from service.schedules import Program, ScheduleSpec, torch_compose
from service.schedules.torch_compose import _Checkpoints
from tests.schedules.conftest import assert_matches, make_optimizer

sched_mod = torch.optim.lr_scheduler
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")

N = 200_000
LRS = [0.1, 0.3]
RTOL = 1e-11
EXP = {"type": "ExponentialLR", "gamma": 0.999999}
COS = {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-5}
ROP = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.3}
# A report at 100 sets best; each later equal report is bad and, with patience 0, reduces
# the lr at the step after it (factor 0.3: not a power of two, so rounding shows).
REPORTS = {100: 1.0, 50_000: 1.0, 120_000: 1.0}
LATE = 170_000
"""A report added after the far windows were evaluated (the plateau's state grows)."""


def chain_torch(nodes: list[dict[str, Any]], n: int, reports: dict[int, float]) -> np.ndarray:
    """torch's lr for steps ``0..n-1``: every child's ``step()`` in chain order (what
    ``ChainedScheduler.step`` does), ``ReduceLROnPlateau.step(metric)`` at its place in the
    pass for step ``s + 1`` after a report at ``s``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(LRS)
        kids: list[Any] = []
        for node in nodes:
            kw = {k: v for k, v in node.items() if k not in ("type", "metric")}
            kids.append(getattr(sched_mod, node["type"])(opt, **kw))
        out = np.empty((len(LRS), n))
        out[:, 0] = [g["lr"] for g in opt.param_groups]
        for s in range(n - 1):
            value = reports.get(s)
            for kid in kids:
                if isinstance(kid, sched_mod.ReduceLROnPlateau):
                    if value is not None:
                        kid.step(value)
                else:
                    kid.step()
            out[:, s + 1] = [g["lr"] for g in opt.param_groups]
    return out


def program(nodes: list[dict[str, Any]]) -> Program:
    groups = [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(LRS)]
    schedule = {"type": "ChainedScheduler", "schedulers": nodes}
    return Program(ScheduleSpec.model_validate({"groups": groups, "schedule": schedule}))


def window(p: Program, state: Any, start: int, count: int) -> np.ndarray:
    values = p.evaluate(state, start, count)
    return np.stack([values[name]["lr"] for name in p.group_names])


def feed(p: Program, reports: dict[int, float]) -> Any:
    state = p.initial_state()
    for step in sorted(reports):
        state, _ = p.observe(state, step, {"loss": reports[step]})
    return state


def chain_curve(p: Program) -> Any:
    curve = p._parts[0].curve
    assert isinstance(curve, torch_compose._ChainedCurve)
    return curve


# Windows out of order: far, backwards, a far jump, then near the last one.
ORDER = [(180_000, 10_000), (60_000, 5_000), (190_000, 9_999), (4_000, 300), (181_234, 777)]


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    return chain_torch([EXP, COS], N, {})


@pytest.fixture(scope="module")
def plateau() -> tuple[np.ndarray, np.ndarray]:
    nodes = [EXP, ROP, COS]
    return chain_torch(nodes, N, REPORTS), chain_torch(nodes, N, {**REPORTS, LATE: 1.0})


def test_windows_in_any_order_match_torch_and_resume_from_checkpoints(plain: np.ndarray) -> None:
    p = program([EXP, COS])
    curve = chain_curve(p)
    for start, count in ORDER:
        assert_matches(window(p, None, start, count), plain[:, start : start + count], RTOL)
    # The far windows left checkpoints on the 2,048-step grid (none before this change for
    # a far window asked first: the old scan kept one every 2**18 steps).
    blocks = torch_compose._MEMO.blocks(curve._token, N // curve._block)
    assert blocks and blocks[0] == (190_000 + 9_999 - 1) // curve._block
    assert len(blocks) >= 190_000 // curve._block


def test_cold_and_warm_windows_are_bit_identical(plain: np.ndarray) -> None:
    """A window asked first in a fresh program, the same window reached by a trainer walking
    forward, and the whole horizon at once: the same bits (the block grid fixes them)."""
    cold = window(program([EXP, COS]), None, 190_000, 10_000)
    walker = program([EXP, COS])
    for start in range(150_000, 190_001, 10_000):
        warm = window(walker, None, start, 10_000)
    whole = window(program([EXP, COS]), None, 0, N)
    assert np.array_equal(cold, warm)
    assert np.array_equal(cold, whole[:, 190_000:])
    assert_matches(cold, plain[:, 190_000:], RTOL)


def test_plateau_chain_far_windows_and_a_growing_state(
    plateau: tuple[np.ndarray, np.ndarray],
) -> None:
    before, after = plateau
    nodes = [EXP, ROP, COS]
    p = program(nodes)
    curve = chain_curve(p)
    state = feed(p, REPORTS)
    assert len(state["schedule.schedulers.1"]["reductions"]) == 2
    for start, count in ORDER:
        assert_matches(window(p, state, start, count), before[:, start : start + count], RTOL)
    assert torch_compose._MEMO.blocks(curve._token, N // curve._block)
    # The plateau reduces again at LATE + 1: windows after it follow the new state, windows
    # before it keep their values (their checkpoints stay valid), all equal to torch.
    grown, decision = p.observe(state, LATE, {"loss": 1.0})
    assert decision["reduced"]
    for start, count in [(190_000, 10_000), (100_000, 2_000), (LATE - 5, 10)]:
        assert_matches(window(p, grown, start, count), after[:, start : start + count], RTOL)
    assert_matches(window(p, state, 180_000, 10_000), before[:, 180_000:190_000], RTOL)
    # Same bits as a fresh program that never saw the older state.
    fresh = program(nodes)
    assert np.array_equal(window(fresh, grown, 190_000, 10_000), window(p, grown, 190_000, 10_000))


def test_checkpoints_stay_valid_until_the_first_state_change() -> None:
    """A checkpoint fingerprints only the reductions at or before its step."""
    p = program([EXP, ROP, COS])
    curve = chain_curve(p)
    state = feed(p, {100: 1.0, 50_000: 1.0})
    window(p, state, 150_000, 1_000)
    grown, _ = p.observe(state, 120_000, {"loss": 1.0})
    old = torch_compose._Signature(curve, state)
    new = torch_compose._Signature(curve, grown)
    assert old.upto(120_000) == new.upto(120_000)
    assert old.upto(120_001) != new.upto(120_001)


def test_memo_is_bounded_by_bytes() -> None:
    memo = _Checkpoints(limit=64 * 1024)
    x = np.zeros(128)  # 1 KiB per entry
    for token in range(3):
        for block in range(200):
            memo.put((token, block, b""), x)
    assert memo.bytes <= memo.limit
    assert 0 < len(memo) < 600
    # The oldest went first; the index follows what is kept.
    assert memo.get((0, 0, b"")) is None
    assert memo.get((2, 199, b"")) is not None
    assert memo.blocks(0, 10**9) == []
    assert memo.blocks(2, 10**9)[0] == 199
    kept = sum(len(memo.blocks(t, 10**9)) for t in range(3))
    assert kept == len(memo)
    assert torch_compose._MEMO.bytes <= torch_compose._MEMO.limit


@pytest.mark.slow
def test_one_million_steps_with_a_plateau_child() -> None:
    """10^6 + 10^4 steps of torch; the window at 10^6 cold, then after a walk, at 1e-11."""
    n = 1_010_000
    reports = {100: 1.0, 400_000: 1.0, 800_000: 1.0}
    nodes = [EXP, ROP, COS]
    theirs = chain_torch(nodes, n, reports)
    p = program(nodes)
    state = feed(p, reports)
    cold = window(p, state, 1_000_000, 10_000)
    assert_matches(cold, theirs[:, 1_000_000:], RTOL)
    walker = program(nodes)
    state = feed(walker, reports)
    for start in range(950_000, 1_000_001, 10_000):
        warm = window(walker, state, start, 10_000)
        assert_matches(warm, theirs[:, start : start + 10_000], RTOL)
    assert np.array_equal(cold, warm)


# -- SequentialLR of MultiplicativeLR children ----------------------------------------------

MULT = [
    {"type": "MultiplicativeLR", "lr_lambda": "0.99999 if epoch % 3 != 0 else 1.00001"},
    {"type": "MultiplicativeLR", "lr_lambda": "0.999993"},
    {"type": "MultiplicativeLR", "lr_lambda": "1 - 1e-6 * (epoch % 5)"},
]
MILESTONES = [30_000, 70_000]


def sequential_torch(n: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(LRS)
        kids: list[Any] = [
            sched_mod.MultiplicativeLR(
                opt, eval(f"lambda epoch: {c['lr_lambda']}", {"__builtins__": {}})
            )
            for c in MULT
        ]
        seq = sched_mod.SequentialLR(opt, kids, milestones=MILESTONES)
        out = np.empty((len(LRS), n))
        for k in range(n):
            if k:
                seq.step()
            out[:, k] = [g["lr"] for g in opt.param_groups]
    return out


def test_sequential_multiplicative_segments_carry_their_end_value() -> None:
    """Each restarted segment starts from the memoised value at its milestone and resumes
    from its own checkpoints: windows in any order match torch, and equal a whole scan."""
    n = 120_000
    theirs = sequential_torch(n)
    schedule = {"type": "SequentialLR", "schedulers": MULT, "milestones": MILESTONES}
    groups = [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(LRS)]
    spec = ScheduleSpec.model_validate({"groups": groups, "schedule": schedule})
    p = Program(spec)
    for start, count in [(110_000, 10_000), (40_000, 3_000), (69_990, 20), (29_999, 2), (5, 9)]:
        assert_matches(window(p, None, start, count), theirs[:, start : start + count], RTOL)
    curve = p._parts[0].curve
    assert isinstance(curve, torch_compose._SequentialCurve)
    # The last segment's value at its milestone and its block edges are kept.
    last = torch_compose._MEMO.blocks(curve._tokens[2], 10**9)
    assert 0 in last and max(last) == (110_000 + 10_000 - 1 - 70_000) // curve._block
    whole = window(Program(spec), None, 0, n)
    assert np.array_equal(whole[:, 110_000:], window(p, None, 110_000, 10_000))
