"""timm schedulers against the installed timm (``step_update(N)``, t_in_epochs=False).

timm's package ``__init__`` imports its models, which need torchvision; the scheduler
modules need only torch, so without torchvision they are loaded from timm's own files.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.base import CompileContext, GroupBase, as_steps
from service.schedules.spec import schedule_adapter
from service.schedules.timm_nodes import timm_noise
from tests.schedules.conftest import assert_matches, make_optimizer


def _timm_scheduler() -> Any:
    try:
        return importlib.import_module("timm.scheduler")
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    pkg = types.ModuleType("timm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["timm"] = pkg
    return importlib.import_module("timm.scheduler")


ts = _timm_scheduler()
torch = pytest.importorskip("torch")

N = 10_000


def ours(spec: dict[str, Any], lrs: list[float], steps: list[int]) -> np.ndarray:
    node = schedule_adapter.validate_python(spec)
    names = tuple(f"g{i}" for i in range(len(lrs)))
    base = GroupBase(names=names, lr=np.array(lrs, float), momentum=np.full(len(lrs), np.nan))
    return node.compile(CompileContext(base=base)).lr(as_steps(steps), {})


def theirs(spec: dict[str, Any], lrs: list[float], steps: list[int]) -> np.ndarray:
    opt = make_optimizer(lrs)
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "noise_type")}
    sched = getattr(ts, spec["type"].removeprefix("timm."))(opt, t_in_epochs=False, **kwargs)
    if "noise_type" in spec:
        sched.noise_type = spec["noise_type"]  # only timm's base class takes it
    out = np.empty((len(lrs), len(steps)))
    for k, n in enumerate(steps):
        sched.step_update(n)
        out[:, k] = [g["lr"] for g in opt.param_groups]
    return out


def check(spec: dict[str, Any], lrs: list[float], atol_rel: float = 0.0) -> None:
    steps = [*range(N), 2**31 + 5, 2**53 - 1]
    ref = theirs(spec, lrs, steps)
    assert_matches(ours(spec, lrs, steps), ref, atol=atol_rel * float(np.abs(ref).max()) + 1e-300)


LRS = st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=3)


@st.composite
def common(draw: st.DrawFn) -> dict[str, Any]:
    """Warmup and noise arguments every timm scheduler takes."""
    kw: dict[str, Any] = {}
    if draw(st.booleans()):
        kw["warmup_t"] = draw(st.integers(1, 500))
        kw["warmup_lr_init"] = draw(st.floats(0, 1e-3))
        kw["warmup_prefix"] = draw(st.booleans())
    if draw(st.booleans()):
        lo = draw(st.integers(0, 3000))
        kw["noise_range_t"] = draw(st.sampled_from([lo, [lo, lo + draw(st.integers(0, 3000))]]))
        kw["noise_pct"] = draw(st.floats(0.05, 1.0))
        kw["noise_std"] = draw(st.floats(0.1, 2.0))
        kw["noise_seed"] = draw(st.integers(-(2**40), 2**40))
        kw["noise_type"] = draw(st.sampled_from(["normal", "uniform"]))
    return kw


@st.composite
def cycles(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "t_initial": draw(st.integers(1, 4000)),
        "lr_min": draw(st.floats(0, 1e-4)),
        "cycle_mul": draw(st.sampled_from([1.0, 2.0, 1.5, 3.0, 0.7])),
        "cycle_decay": draw(st.floats(0.1, 1.0)),
        "cycle_limit": draw(st.integers(0, 6)),
    }


@pytest.mark.slow
@given(lrs=LRS, kw=common(), cyc=cycles(), k=st.sampled_from([1.0, 0.5, 2.0]))
def test_cosine(lrs: list[float], kw: dict[str, Any], cyc: dict[str, Any], k: float) -> None:
    if cyc["cycle_mul"] < 1:
        # timm raises (math domain error) once cycles shrinking by cycle_mul < 1 run out.
        cyc["cycle_limit"] = min(cyc["cycle_limit"], 3)
        check_steps_within_domain({"type": "timm.CosineLRScheduler", **kw, **cyc}, lrs)
        return
    check({"type": "timm.CosineLRScheduler", **kw, **cyc, "k_decay": k}, lrs, 1e-14)


def check_steps_within_domain(spec: dict[str, Any], lrs: list[float]) -> None:
    horizon = spec["t_initial"] / (1 - spec["cycle_mul"])
    steps = [n for n in range(N) if n < horizon - 1]
    ref = theirs(spec, lrs, steps)
    assert_matches(ours(spec, lrs, steps), ref, atol=1e-14 * float(np.abs(ref).max()))


@pytest.mark.slow
@given(lrs=LRS, kw=common(), cyc=cycles(), lb=st.floats(-8, 0), ub=st.floats(0.5, 5))
def test_tanh(
    lrs: list[float], kw: dict[str, Any], cyc: dict[str, Any], lb: float, ub: float
) -> None:
    cyc["cycle_mul"] = max(cyc["cycle_mul"], 1.0)
    # numpy's tanh may differ from the C library's by an ulp; 1 - tanh magnifies that.
    check({"type": "timm.TanhLRScheduler", **kw, **cyc, "lb": lb, "ub": ub}, lrs, 1e-14)


@pytest.mark.slow
@given(lrs=LRS, kw=common(), cyc=cycles(), power=st.floats(0.2, 3), k=st.sampled_from([1.0, 2.0]))
def test_poly(
    lrs: list[float], kw: dict[str, Any], cyc: dict[str, Any], power: float, k: float
) -> None:
    cyc["cycle_mul"] = max(cyc["cycle_mul"], 1.0)
    spec = {"type": "timm.PolyLRScheduler", **kw, **cyc, "power": power, "k_decay": k}
    check(spec, lrs, 1e-14)


@given(lrs=LRS, kw=common(), decay_t=st.floats(0.5, 3000), rate=st.floats(0, 1))
def test_step(lrs: list[float], kw: dict[str, Any], decay_t: float, rate: float) -> None:
    check({"type": "timm.StepLRScheduler", **kw, "decay_t": decay_t, "decay_rate": rate}, lrs)


@given(
    lrs=LRS,
    kw=common(),
    decay_t=st.lists(st.integers(0, 12_000), max_size=6).map(sorted),
    rate=st.floats(0, 1),
)
def test_multistep(lrs: list[float], kw: dict[str, Any], decay_t: list[int], rate: float) -> None:
    spec = {"type": "timm.MultiStepLRScheduler", **kw, "decay_t": decay_t, "decay_rate": rate}
    check(spec, lrs)


def test_noise_matches_torch_generator() -> None:
    """The MT19937 + Box–Muller reproduction against torch for many seeds, both kinds."""
    seeds = np.arange(0, 3000, dtype=np.uint64) * np.uint64(1_000_003) & np.uint64(0xFFFFFFFF)
    for kind, pct, std in [("normal", 0.67, 1.0), ("normal", 0.02, 1.5), ("uniform", 0.3, 1.0)]:
        ours_ = timm_noise(seeds, kind, pct, std)
        ref = []
        for s in seeds.tolist():
            g = torch.Generator()
            g.manual_seed(s)
            if kind == "normal":
                while True:
                    n = torch.randn(1, generator=g).item() * std
                    if abs(n) < pct:
                        break
            else:
                n = 2 * (torch.rand(1, generator=g).item() - 0.5) * pct
            ref.append(n)
        np.testing.assert_array_equal(ours_, np.array(ref))


def test_research_vectors() -> None:
    def row(spec: dict[str, Any], n: int) -> list[float]:
        return [round(v, 4) for v in ours(spec, [1.0], list(range(n)))[0]]

    spec = {"type": "timm.CosineLRScheduler", "t_initial": 5, "warmup_t": 2, "warmup_lr_init": 0.1}
    assert row(spec, 6) == [0.1, 0.55, 0.6545, 0.3455, 0.0955, 0]
    assert row({**spec, "warmup_prefix": True}, 8) == [
        0.1,
        0.55,
        1,
        0.9045,
        0.6545,
        0.3455,
        0.0955,
        0,
    ]
    spec = {"type": "timm.MultiStepLRScheduler", "decay_t": [2, 4], "decay_rate": 0.5}
    assert row(spec, 5) == [1, 0.5, 0.5, 0.25, 0.25]
    assert row({"type": "timm.TanhLRScheduler", "t_initial": 5}, 6) == [
        1,
        1,
        0.9975,
        0.8808,
        0.1192,
        0,
    ]


def test_shared_lr_min_is_absolute() -> None:
    spec = {"type": "timm.CosineLRScheduler", "t_initial": 4, "lr_min": 0.01}
    values = ours(spec, [1.0, 0.1], [4, 100])
    assert np.all(values == 0.01)


def test_bad_arguments() -> None:
    for bad in [
        {"type": "timm.CosineLRScheduler", "t_initial": 0},
        {"type": "timm.CosineLRScheduler", "t_initial": 5, "lr_min": -1},
        {"type": "timm.TanhLRScheduler", "t_initial": 5, "lb": 3, "ub": 1},
        {"type": "timm.MultiStepLRScheduler", "decay_t": [5, 2]},
        {"type": "timm.StepLRScheduler", "decay_t": 0},
        {"type": "timm.StepLRScheduler", "decay_t": 3, "noise_range_t": [1, 2, 3]},
        {"type": "timm.StepLRScheduler", "decay_t": 3, "noise_range_t": 1, "noise_pct": 0},
        {"type": "timm.CosineLRScheduler", "t_initial": 5, "t_in_epochs": False},
    ]:
        with pytest.raises(ValidationError):
            schedule_adapter.validate_python(bad)
