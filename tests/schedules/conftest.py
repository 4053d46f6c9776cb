"""torch as the oracle: helpers shared by every schedule test.

Import them directly (``from tests.schedules.conftest import run_torch, ...``) or through the
``torch_ref`` fixture. Nothing here reimplements schedule math: values always come from stepping
torch's own schedulers.

- ``make_optimizer(lrs, momentum=..., betas=...)``: a torch optimizer with one param group per
  base lr (SGD when momentum is given or nothing is, Adam when betas are given).
- ``build_torch(spec, opt)``: a torch scheduler from an lrserve spec dict (children are built
  before their parent, in list order, exactly as a user would write it). Extend
  ``TORCH_BUILDERS`` for node types whose torch construction is not ``cls(opt, **params)``.
- ``run_torch(opt, sched, n)`` / ``torch_values(spec, groups, n)``: step torch ``n - 1`` times
  after construction and collect lr and momentum (or beta1) per group, shape ``(G, n)``:
  column ``k`` holds the values after ``k`` ``step()`` calls (column 0 = after the constructor).
- ``assert_matches(ours, theirs, rtol=1e-12)``: relative comparison with an absolute floor of
  1e-300 (for values torch computes as exactly 0) and a message naming the first bad step.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Profiles: the default keeps the long torch comparisons to a few examples so the suite stays
# fast on a loaded machine; LRSERVE_HYPOTHESIS_PROFILE=ci (or =thorough) raises the counts.
# The default (the README's `pytest`, and CI) is derandomized: the same examples every run, so
# a CI run cannot fail on a draw nobody has seen; the ci/thorough profiles explore new ones.
settings.register_profile(
    "default",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = os.environ.get("LRSERVE_HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)
EXAMPLE_SCALE = {"ci": 4, "thorough": 20}.get(PROFILE, 1)


# What lr_lambda expressions may name, as plain Python: the tests evaluate the same
# string with Python (the oracle) and with the engine.
PY_NAMESPACE = {
    "__builtins__": {},
    "min": min,
    "max": max,
    "abs": abs,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "cos": math.cos,
    "sin": math.sin,
    "floor": math.floor,
    "ceil": math.ceil,
    "pi": math.pi,
    "e": math.e,
}


def examples(n: int) -> int:
    """``max_examples`` for a test that sets its own count: scaled up by the ci/thorough
    profiles (the default keeps the whole schedule suite well under a minute)."""
    return n * EXAMPLE_SCALE


sched_mod = torch.optim.lr_scheduler

RTOL = 1e-12
ATOL = 1e-300


def make_optimizer(
    lrs: Sequence[float],
    momentum: Sequence[float] | float | None = None,
    betas: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
    weight_decay: Sequence[float] | float | None = None,
) -> torch.optim.Optimizer:
    """An optimizer with ``len(lrs)`` param groups (one scalar parameter each)."""

    def per_group(value: Any, i: int) -> Any:
        return value[i] if isinstance(value, (list, tuple)) else value

    groups: list[dict[str, Any]] = []
    for i, lr in enumerate(lrs):
        g: dict[str, Any] = {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": float(lr)}
        if momentum is not None:
            g["momentum"] = float(per_group(momentum, i))
        if betas is not None:
            b = betas[i] if isinstance(betas[0], (list, tuple)) else betas
            g["betas"] = (float(b[0]), float(b[1]))
        if weight_decay is not None:
            g["weight_decay"] = float(per_group(weight_decay, i))
        groups.append(g)
    if betas is not None:
        return torch.optim.Adam(groups, lr=float(lrs[0]))
    return torch.optim.SGD(
        groups, lr=float(lrs[0]), momentum=0.0 if momentum is None else groups[0]["momentum"]
    )


def _momentum_of(group: Mapping[str, Any]) -> float:
    if "betas" in group:
        return float(group["betas"][0])
    return float(group.get("momentum", float("nan")))


def run_torch(
    opt: torch.optim.Optimizer,
    sched: Any,
    n: int,
    step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Values after 0, 1, ..., n-1 ``step()`` calls: ``(lr, momentum)``, each ``(G, n)``.

    ``step(k)`` replaces ``sched.step()`` for the k-th call (k = 1..n-1), e.g. to drive
    ``CosineAnnealingWarmRestarts.step(k / spe)``.
    """
    g = len(opt.param_groups)
    lr = np.empty((g, n))
    mom = np.empty((g, n))
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()" and the epoch deprecation warning.
        warnings.simplefilter("ignore", UserWarning)
        for k in range(n):
            if k > 0:
                if step is None:
                    sched.step()
                else:
                    step(k)
            for i, group in enumerate(opt.param_groups):
                lr[i, k] = float(group["lr"])
                mom[i, k] = _momentum_of(group)
    return lr, mom


def _build_default(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    params = {k: v for k, v in spec.items() if k != "type"}
    return getattr(sched_mod, spec["type"])(opt, **params)


def _build_sequential(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    children = [build_torch(c, opt) for c in spec["schedulers"]]
    return sched_mod.SequentialLR(opt, children, milestones=list(spec["milestones"]))


def _build_chained(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    children = [build_torch(c, opt) for c in spec["schedulers"]]
    return sched_mod.ChainedScheduler(children, optimizer=opt)


TORCH_BUILDERS: dict[str, Callable[[Mapping[str, Any], torch.optim.Optimizer], Any]] = {
    "SequentialLR": _build_sequential,
    "ChainedScheduler": _build_chained,
}
"""Node type -> torch constructor; types not listed use ``cls(opt, **params)``."""


def build_torch(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    """The torch scheduler for an lrserve spec dict (no Epochs wrapper: see torch_values)."""
    builder = TORCH_BUILDERS.get(spec["type"], _build_default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return builder(spec, opt)


def torch_values(
    spec: Mapping[str, Any],
    lrs: Sequence[float],
    n: int,
    momentum: Sequence[float] | float | None = None,
    betas: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """torch's values for ``spec`` over steps ``0..n-1`` for groups with base ``lrs``.

    A top-level ``{"type": "Epochs", ...}`` wrapper is driven the way its users drive torch:
    boundary mode steps the inner scheduler once per ``steps_per_epoch`` steps (Lightning's
    ``interval="epoch"``); fractional mode calls ``step(k / steps_per_epoch)`` (the
    CosineAnnealingWarmRestarts per-iteration recipe).
    """
    opt = make_optimizer(lrs, momentum=momentum, betas=betas)
    if spec["type"] != "Epochs":
        sched = build_torch(spec, opt)
        return run_torch(opt, sched, n)
    spe = int(spec["steps_per_epoch"])
    inner = build_torch(spec["schedule"], opt)
    if spec.get("fractional", False):
        return run_torch(opt, inner, n, step=lambda k: inner.step(k / spe))
    return run_torch(opt, inner, n, step=lambda k: inner.step() if k % spe == 0 else None)


def assert_matches(
    ours: np.ndarray,
    theirs: np.ndarray,
    rtol: float = RTOL,
    atol: float | np.ndarray = ATOL,
    what: str = "lr",
) -> None:
    """``|ours - theirs| <= rtol * |theirs| + atol`` everywhere, NaN matching NaN.

    ``atol`` may be an array broadcasting over the steps (a documented per-step noise bound).
    """
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != torch {theirs.shape}"
    both_nan = np.isnan(ours) & np.isnan(theirs)
    ok = both_nan | (np.abs(ours - theirs) <= rtol * np.abs(theirs) + atol)
    if not ok.all():
        bad = np.argwhere(~ok)
        idx = tuple(bad[0])
        rel = np.abs(ours[idx] - theirs[idx]) / max(abs(theirs[idx]), 1e-300)
        raise AssertionError(
            f"{what}: {len(bad)} value(s) differ from torch; first at (group, step)={idx}: "
            f"ours={ours[idx]!r} torch={theirs[idx]!r} (rel {rel:.3g}, rtol {rtol:g})"
        )


@pytest.fixture
def torch_ref() -> types.SimpleNamespace:
    """The helpers above as a fixture, for tests that prefer not to import conftest."""
    return types.SimpleNamespace(
        make_optimizer=make_optimizer,
        run_torch=run_torch,
        build_torch=build_torch,
        torch_values=torch_values,
        assert_matches=assert_matches,
        TORCH_BUILDERS=TORCH_BUILDERS,
    )
