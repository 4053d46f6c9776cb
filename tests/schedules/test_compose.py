"""SequentialLR, ChainedScheduler and the Epochs wrapper against torch itself, every step."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules import MAX_NESTING, Program, ScheduleSpec, SpecError
from tests.schedules.conftest import (
    assert_matches,
    examples,
    make_optimizer,
    run_torch,
    torch_values,
)

N = int(os.environ.get("LRSERVE_TORCH_STEPS", "10000"))

bases = st.lists(st.floats(1e-5, 10.0), min_size=1, max_size=3)
gamma = st.floats(0.5, 1.0)


def leaf(horizon: int) -> st.SearchStrategy[dict[str, Any]]:
    """A random time-driven torch scheduler with horizons up to ``horizon``.

    LinearLR / PolynomialLR get ``total_iters >= 1``: with 0, torch's closed form divides by
    zero when SequentialLR restarts them (ZeroDivisionError); standalone 0 is tested in
    test_torch_basic.
    """
    h = st.integers(0, horizon)
    pos = st.integers(1, max(1, horizon))
    return st.one_of(
        st.builds(lambda s, g: {"type": "StepLR", "step_size": s, "gamma": g}, pos, gamma),
        st.builds(
            lambda m, g: {"type": "MultiStepLR", "milestones": m, "gamma": g},
            st.lists(h, max_size=6),
            gamma,
        ),
        st.builds(
            lambda f, t: {"type": "ConstantLR", "factor": f, "total_iters": t},
            st.floats(0.01, 1.0),
            h,
        ),
        st.builds(
            lambda s, e, t: {
                "type": "LinearLR",
                "start_factor": s,
                "end_factor": e,
                "total_iters": t,
            },
            st.floats(0.01, 1.0),
            st.floats(0.0, 1.0),
            pos,
        ),
        st.builds(lambda g: {"type": "ExponentialLR", "gamma": g}, st.floats(0.999, 1.0)),
        st.builds(
            lambda t, p: {"type": "PolynomialLR", "total_iters": t, "power": p},
            pos,
            st.floats(0.0, 3.0),
        ),
        st.builds(lambda t: {"type": "CosineAnnealingLR", "T_max": t}, pos),
        # eta_min > 0 only with short periods: see cosine_noise in test_torch_basic.
        st.builds(
            lambda t, e: {"type": "CosineAnnealingLR", "T_max": t, "eta_min": e},
            st.integers(1, 40),
            st.floats(0.0, 1e-3),
        ),
        st.builds(
            lambda t, m, e: {
                "type": "CosineAnnealingWarmRestarts",
                "T_0": t,
                "T_mult": m,
                "eta_min": e,
            },
            pos,
            st.integers(1, 3),
            st.floats(0.0, 1e-3),
        ),
    )


def evaluate(schedule: dict[str, Any], lrs: list[float], start: int, count: int) -> np.ndarray:
    groups = [{"name": f"g{i}", "lr": lr} for i, lr in enumerate(lrs)]
    program = Program(ScheduleSpec.model_validate({"groups": groups, "schedule": schedule}))
    values = program.evaluate({}, start, count)
    return np.stack([values[f"g{i}"]["lr"] for i in range(len(lrs))])


def cosine_noise(node: Any) -> float:
    """Absolute floor for torch's own rounding noise in CosineAnnealingLR's recursion with
    ``eta_min > 0`` (see test_torch_basic.cosine_noise): ``8 eps eta_min (1 + (2 T_max)^2)``,
    the largest over the spec's CosineAnnealingLR nodes; 1e-300 when there are none."""
    floor = 1e-300
    if isinstance(node, dict):
        if node.get("type") == "CosineAnnealingLR":
            eta, t_max = node.get("eta_min", 0.0), node["T_max"]
            floor = max(floor, 8 * np.finfo(float).eps * eta * (1 + (2 * t_max) ** 2))
        for value in node.values():
            floor = max(floor, cosine_noise(value))
    elif isinstance(node, list):
        for value in node:
            floor = max(floor, cosine_noise(value))
    return floor


def check(schedule: dict[str, Any], lrs: list[float], n: int = N, rtol: float = 1e-12) -> None:
    theirs, _ = torch_values(schedule, lrs, n)
    atol = cosine_noise(schedule)
    ours = evaluate(schedule, lrs, 0, n)
    assert_matches(ours, theirs, rtol=rtol, atol=atol, what=str(schedule))
    start, count = (2 * n) // 3, n // 4
    window = evaluate(schedule, lrs, start, count)
    assert_matches(window, theirs[:, start : start + count], rtol=rtol, atol=atol, what="window")


@st.composite
def sequential(draw: st.DrawFn, n: int = N) -> dict[str, Any]:
    k = draw(st.integers(1, 4))
    milestones = sorted(draw(st.lists(st.integers(0, n), min_size=k - 1, max_size=k - 1)))
    children = [draw(leaf(n // k)) for _ in range(k)]
    return {"type": "SequentialLR", "schedulers": children, "milestones": milestones}


@settings(max_examples=examples(30))
@given(lrs=bases, schedule=sequential())
def test_sequential_lr(lrs: list[float], schedule: dict[str, Any]) -> None:
    check(schedule, lrs)


@settings(max_examples=examples(30))
@given(lrs=bases, children=st.lists(leaf(N), min_size=1, max_size=3))
def test_chained_scheduler(lrs: list[float], children: list[dict[str, Any]]) -> None:
    # A cosine whose eta_min is the group's base lr keeps the lr exactly at eta_min in torch
    # (its recursion multiplies lr - eta_min = 0); the engine composes the children's affine
    # maps, whose rounding there is absolute, not relative: the case below bounds it.
    assume(not any(c.get("eta_min") in lrs for c in children if c["type"] == "CosineAnnealingLR"))
    # torch steps a chain recursively, rounding once per child per step: its own values are
    # within k t eps / 2 of the exact ones at step t (ExponentialLR with gamma = 1 - 2**-53
    # reaches 1e-12 near step 9,000); the engine cannot be nearer to torch than that.
    rtol = 1e-12 + len(children) * N * float(np.finfo(float).eps) / 2
    check({"type": "ChainedScheduler", "schedulers": children}, lrs, rtol=rtol)


@pytest.mark.parametrize("periods", [(13, 13), (14, 18)])
def test_chained_cosines_held_at_their_floor_stay_within_float_noise(
    periods: tuple[int, int],
) -> None:
    """The degenerate chain (eta_min == base lr, so torch's lr never moves): 1e-11 relative
    over N steps, the composed maps' rounding (issue 12 tracks evaluating it exactly)."""
    lr = 0.0005100857046994728
    children = [{"type": "CosineAnnealingLR", "T_max": t, "eta_min": lr} for t in periods]
    check({"type": "ChainedScheduler", "schedulers": children}, [lr], rtol=1e-11)


@settings(max_examples=examples(15))
@given(
    lrs=bases,
    first=leaf(N // 2),
    inner=sequential(N // 2),
    last=st.one_of(st.none(), leaf(N)),
)
def test_sequential_inside_chained(
    lrs: list[float], first: dict[str, Any], inner: dict[str, Any], last: dict[str, Any] | None
) -> None:
    # torch's SequentialLR resets the lr to the base at construction and restarts children
    # absolutely at milestones, wiping what earlier chained siblings did.
    children = [first, inner] + ([last] if last is not None else [])
    check({"type": "ChainedScheduler", "schedulers": children}, lrs)


@settings(max_examples=examples(15))
@given(
    lrs=bases,
    first=leaf(N // 2),
    chained=st.lists(leaf(N), min_size=1, max_size=3),
    milestone=st.integers(1, N),
)
def test_chained_inside_sequential_after_the_first(
    lrs: list[float], first: dict[str, Any], chained: list[dict[str, Any]], milestone: int
) -> None:
    """torch raises NotImplementedError when a ChainedScheduler is restarted at a milestone
    (it has no closed form); lrserve restarts it fresh from the base in local time, i.e. the
    standalone ChainedScheduler's values shifted to the milestone."""
    inner = {"type": "ChainedScheduler", "schedulers": chained}
    schedule = {"type": "SequentialLR", "schedulers": [first, inner], "milestones": [milestone]}
    opt = make_optimizer(lrs)
    with pytest.raises(NotImplementedError):
        from tests.schedules.conftest import build_torch

        sched = build_torch(schedule, opt)
        run_torch(opt, sched, milestone + 1)
    ours = evaluate(schedule, lrs, 0, N)
    standalone, _ = torch_values(inner, lrs, N - milestone)
    head, _ = torch_values(first, lrs, milestone)
    atol = cosine_noise(schedule)
    assert_matches(ours[:, :milestone], head, atol=atol)
    assert_matches(ours[:, milestone:], standalone, atol=atol)


def test_nested_sequential_uses_local_time() -> None:
    """Deliberate difference: torch's outer SequentialLR does not rewind an inner SequentialLR's
    own step counter (recursive_undo only rewinds leaves), so the inner one runs one step
    ahead. lrserve gives every child its local time."""
    inner = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "ConstantLR", "factor": 0.1, "total_iters": 2},
            {"type": "ExponentialLR", "gamma": 0.5},
        ],
        "milestones": [2],
    }
    outer = {
        "type": "SequentialLR",
        "schedulers": [inner, {"type": "ConstantLR", "factor": 0.5, "total_iters": 100}],
        "milestones": [5],
    }
    torch_lr, _ = torch_values(outer, [1.0], 8)
    np.testing.assert_allclose(torch_lr[0], [0.1, 1, 0.5, 0.25, 0.125, 0.5, 0.5, 0.5])
    ours = evaluate(outer, [1.0], 0, 8)[0]
    np.testing.assert_allclose(ours, [0.1, 0.1, 1, 0.5, 0.25, 0.5, 0.5, 0.5])


def test_chained_first_in_sequential_starts_fresh() -> None:
    """Deliberate difference: as SequentialLR's first child, torch steps a ChainedScheduler's
    children a second time at t = 0 (non-initial step after recursive_undo), so e.g. an
    ExponentialLR child is one step ahead. lrserve uses the standalone ChainedScheduler."""
    chained = {"type": "ChainedScheduler", "schedulers": [{"type": "ExponentialLR", "gamma": 0.5}]}
    outer = {
        "type": "SequentialLR",
        "schedulers": [chained, {"type": "ExponentialLR", "gamma": 0.5}],
        "milestones": [3],
    }
    torch_lr, _ = torch_values(outer, [1.0], 6)
    np.testing.assert_allclose(torch_lr[0], [0.5, 0.25, 0.125, 1, 0.5, 0.25])
    np.testing.assert_allclose(evaluate(outer, [1.0], 0, 6)[0], [1, 0.5, 0.25, 1, 0.5, 0.25])


@settings(max_examples=examples(20))
@given(lrs=bases, spe=st.integers(1, 500), inner=st.one_of(leaf(N // 10), sequential(N // 10)))
def test_epochs_boundary(lrs: list[float], spe: int, inner: dict[str, Any]) -> None:
    check({"type": "Epochs", "steps_per_epoch": spe, "schedule": inner}, lrs)


@settings(max_examples=examples(10))
@given(lrs=bases, spe=st.integers(1, 50), children=st.lists(leaf(N // 20), min_size=1, max_size=3))
def test_epochs_boundary_chained(
    lrs: list[float], spe: int, children: list[dict[str, Any]]
) -> None:
    inner = {"type": "ChainedScheduler", "schedulers": children}
    check({"type": "Epochs", "steps_per_epoch": spe, "schedule": inner}, lrs)


@settings(max_examples=examples(20))
@given(
    lrs=bases,
    spe=st.integers(1, 1000),
    t0=st.integers(1, 30),
    t_mult=st.integers(1, 3),
    eta_min=st.floats(0.0, 1e-3),
)
def test_epochs_fractional_warm_restarts(
    lrs: list[float], spe: int, t0: int, t_mult: int, eta_min: float
) -> None:
    """torch's documented per-iteration use: ``scheduler.step(k / steps_per_epoch)``."""
    inner = {"type": "CosineAnnealingWarmRestarts", "T_0": t0, "T_mult": t_mult}
    inner["eta_min"] = eta_min
    check({"type": "Epochs", "steps_per_epoch": spe, "fractional": True, "schedule": inner}, lrs)


@pytest.mark.slow
def test_warmup_cosine_past_one_million_steps() -> None:
    """The common warmup + cosine over 1.1M steps, every step, at 1e-11."""
    schedule = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.001, "total_iters": 20_000},
            {"type": "CosineAnnealingLR", "T_max": 1_080_000, "eta_min": 1e-7},
        ],
        "milestones": [20_000],
    }
    check(schedule, [3e-4, 1e-3], n=1_100_000, rtol=1e-11)


@pytest.mark.slow
def test_chained_scan_past_one_million_steps() -> None:
    """A recursive ChainedScheduler (cosine with eta_min, so no closed-form product) scanned
    over 1.1M steps; a far window reuses the scan's checkpoints and agrees."""
    schedule = {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "ExponentialLR", "gamma": 0.999999},
            {"type": "CosineAnnealingLR", "T_max": 2000, "eta_min": 1e-5},
        ],
    }
    check(schedule, [0.1], n=1_100_000, rtol=1e-11)


def test_chained_fast_path_equals_scan() -> None:
    """The closed-form product (all children multiplicative) and the scan agree."""
    from service.schedules.base import CompileContext, GroupBase
    from service.schedules.torch_compose import ChainedScheduler

    node = ChainedScheduler.model_validate(
        {
            "type": "ChainedScheduler",
            "schedulers": [
                {"type": "StepLR", "step_size": 7, "gamma": 0.9},
                {"type": "CosineAnnealingLR", "T_max": 5000},
                {"type": "LinearLR", "start_factor": 0.1, "total_iters": 300},
            ],
        }
    )
    base = GroupBase(("a", "b"), np.asarray([0.1, 2.0]), np.asarray([np.nan, np.nan]))
    curve = node.compile(CompileContext(base=base))
    t = np.arange(5001, dtype=np.float64)
    a, b = curve.chain_map(t, {})
    from service.schedules.base import scan_affine

    scanned = scan_affine(a, b, base.lr)
    assert curve.mult_horizon() == 5001
    assert_matches(curve.lr(t, {}), scanned)


# -- momentum -------------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [False, True])
def test_momentum_across_segments(betas: bool) -> None:
    """torch leaves momentum alone while a non-cycling child runs: before OneCycleLR's segment
    it holds what OneCycleLR's constructor wrote, after it the last cycled value.

    The lr is compared on OneCycleLR's own segment only: torch's OneCycleLR constructor
    overwrites every group's ``initial_lr`` (with max_lr / div_factor), which changes the
    base of the other children (what SequentialLR resets to, and the base of children built
    after it). lrserve gives every child the group's own base (documented difference).
    """
    schedule = {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": 50},
            {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 200},
            {"type": "ExponentialLR", "gamma": 0.99},
        ],
        "milestones": [100, 250],
    }
    lrs = [0.1, 0.2]
    kw: dict[str, Any] = {"betas": (0.9, 0.999)} if betas else {"momentum": 0.9}
    theirs_lr, theirs_mom = torch_values(schedule, lrs, 400, **kw)
    group: dict[str, Any] = {"betas": [0.9, 0.999]} if betas else {"momentum": 0.9}
    spec = {
        "groups": [{"name": f"g{i}", "lr": lr, **group} for i, lr in enumerate(lrs)],
        "schedule": schedule,
    }
    program = Program(ScheduleSpec.model_validate(spec))
    values = program.evaluate({}, 0, 400)
    field = "beta1" if betas else "momentum"
    assert program.fields["g0"] == ("lr", field)
    ours_lr = np.stack([values[f"g{i}"]["lr"] for i in range(2)])
    assert_matches(ours_lr[:, 100:250], theirs_lr[:, 100:250])
    ours_mom = np.stack([values[f"g{i}"][field] for i in range(2)])
    assert_matches(ours_mom, theirs_mom, what=field)


def test_momentum_in_chained_last_cycler_wins() -> None:
    schedule = {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 300},
            {"type": "ExponentialLR", "gamma": 0.995},
        ],
    }
    theirs_lr, theirs_mom = torch_values(schedule, [0.1], 300, momentum=0.9)
    spec = {"groups": [{"name": "g", "lr": 0.1, "momentum": 0.9}], "schedule": schedule}
    values = Program(ScheduleSpec.model_validate(spec)).evaluate({}, 0, 300)
    assert_matches(values["g"]["lr"], theirs_lr[0])
    assert_matches(values["g"]["momentum"], theirs_mom[0], what="momentum")


# -- validation -----------------------------------------------------------------------------


def _spec(schedule: Any) -> dict[str, Any]:
    return {"groups": [{"name": "g", "lr": 0.1}], "schedule": schedule}


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        (
            {"type": "SequentialLR", "schedulers": [{"type": "ExponentialLR", "gamma": 0.5}]}
            | {"milestones": [3]},
            "exactly one entry fewer",
        ),
        (
            {
                "type": "SequentialLR",
                "schedulers": [{"type": "ExponentialLR", "gamma": 0.5}] * 3,
                "milestones": [5, 3],
            },
            "sorted",
        ),
        ({"type": "SequentialLR", "schedulers": [], "milestones": []}, "at least 1"),
        ({"type": "ChainedScheduler", "schedulers": []}, "at least 1"),
        (
            {
                "type": "Epochs",
                "steps_per_epoch": 0,
                "schedule": {"type": "StepLR", "step_size": 1},
            },
            "greater than or equal to 1",
        ),
    ],
)
def test_composite_validation(schedule: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        ScheduleSpec.model_validate(_spec(schedule))
    assert words in str(info.value)


def test_nesting_is_bounded() -> None:
    node: dict[str, Any] = {"type": "ExponentialLR", "gamma": 0.5}
    for _ in range(MAX_NESTING):
        node = {"type": "ChainedScheduler", "schedulers": [node]}
    Program(ScheduleSpec.model_validate(_spec(node)))  # exactly at the bound: fine
    deeper = {"type": "ChainedScheduler", "schedulers": [node]}
    with pytest.raises(ValidationError, match="nest deeper"):
        ScheduleSpec.model_validate(_spec(deeper))
    # Absurd depth is refused before pydantic recurses into it.
    for _ in range(5000):
        deeper = {"type": "ChainedScheduler", "schedulers": [deeper]}
    with pytest.raises(ValidationError, match="nest deeper"):
        ScheduleSpec.model_validate(_spec(deeper))


def test_metric_nodes_refused_inside_epochs() -> None:
    schedule = {
        "type": "Epochs",
        "steps_per_epoch": 10,
        "schedule": {"type": "ReduceLROnPlateau", "metric": "val_loss"},
    }
    with pytest.raises(SpecError) as info:
        Program(ScheduleSpec.model_validate(_spec(schedule)))
    assert info.value.loc == ("schedule", "schedule")
    assert "cannot be inside Epochs" in info.value.msg


def test_fractional_chained_refused() -> None:
    schedule = {
        "type": "Epochs",
        "steps_per_epoch": 10,
        "fractional": True,
        "schedule": {
            "type": "ChainedScheduler",
            "schedulers": [{"type": "StepLR", "step_size": 2}],
        },
    }
    with pytest.raises(SpecError) as info:
        Program(ScheduleSpec.model_validate(_spec(schedule)))
    assert info.value.loc == ("schedule", "fractional")


def test_torch_checks_sequential_milestones_too() -> None:
    opt = make_optimizer([0.1])
    child = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    with pytest.raises(ValueError, match="number of milestones"):
        torch.optim.lr_scheduler.SequentialLR(opt, [child], milestones=[3])
