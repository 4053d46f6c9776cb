"""Metric-driven nodes: torch's ReduceLROnPlateau, timm's, Keras's and optax's variants.

torch and timm are the oracles (both installed): random metric streams go to the real
``torch.optim.lr_scheduler.ReduceLROnPlateau`` / ``timm.scheduler.PlateauLRScheduler`` and
to our pure transition, and decisions, counters and learning rates must agree after every
report. Keras and optax are not installed: their tests check our transition against
(a) the per-evaluation decision procedures transcribed in the research notes (Appendix A of
shared/research/schedule-semantics.md, taken from Keras 3.16's callback and optax's
``contrib/_reduce_on_plateau.py``) and (b) the constant-metric vectors of its section 0.5.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.base import CompileContext, GroupBase, SpecError
from service.schedules.plateau import (
    KerasReduceLROnPlateau,
    OptaxReduceOnPlateau,
    PlateauCurve,
    ReduceLROnPlateau,
    TimmPlateauLRScheduler,
    keras_direction,
)
from tests.schedules.conftest import assert_matches, make_optimizer

PLATEAU_EXAMPLES = settings(max_examples=150, deadline=None)


def _ctx(lrs: list[float], **kw: Any) -> CompileContext:
    base = GroupBase(
        names=tuple(f"g{i}" for i in range(len(lrs))),
        lr=np.asarray(lrs, dtype=np.float64),
        momentum=np.full(len(lrs), np.nan),
    )
    return CompileContext(base=base, **kw)


class Driver:
    """Feeds reports to a compiled plateau curve the way Program does (pure transitions)."""

    def __init__(self, curve: PlateauCurve) -> None:
        self.curve = curve
        self.state: dict[str, dict[str, Any]] = {curve.path: curve.initial_state()}

    def report(self, step: int, value: float) -> dict[str, Any]:
        before = json.dumps(self.state)
        node, decision = self.curve.observe(self.state[self.curve.path], value, step, self.state)
        assert json.dumps(self.state) == before, "observe mutated its input state"
        json.dumps(node)  # the new state must be JSON-serialisable (no inf/nan objects)
        json.dumps(decision)
        self.state = {**self.state, self.curve.path: node}
        return decision

    def lr(self, t: int | list[int]) -> np.ndarray:
        return self.curve.lr(np.atleast_1d(np.asarray(t, dtype=np.float64)), self.state)


# ------------------------------------------------------------------------------------------
# strategies

# Streams with repeats and plateaus: values drawn from a few levels plus random floats, so
# that equal values (no improvement), tiny relative changes and real improvements all occur.
_levels = st.sampled_from([1.0, 0.5, 0.49995, 0.25, 2.0, -1.0, -0.99995, 0.0, 1e-3, 100.0])
_metric = st.one_of(_levels, st.floats(-10, 10, allow_nan=False), st.just(float("nan")))
streams = st.lists(_metric, min_size=1, max_size=60)


@st.composite
def torch_configs(draw: st.DrawFn) -> tuple[dict[str, Any], list[float]]:
    g = draw(st.integers(1, 4))
    lrs = draw(st.lists(st.sampled_from([1.0, 0.1, 3e-4, 0.05, 2.5]), min_size=g, max_size=g))
    min_lr: float | list[float]
    if draw(st.booleans()):
        min_lr = draw(st.lists(st.sampled_from([0.0, 1e-4, 0.01, 0.3]), min_size=g, max_size=g))
    else:
        min_lr = draw(st.sampled_from([0.0, 1e-3, 0.02]))
    spec = {
        "type": "ReduceLROnPlateau",
        "metric": "val_loss",
        "mode": draw(st.sampled_from(["min", "max"])),
        "factor": draw(st.sampled_from([0.1, 0.5, 0.9, 0.0, 0.3333])),
        "patience": draw(st.integers(0, 4)),
        "threshold": draw(st.sampled_from([0.0, 1e-4, 0.01, 0.5])),
        "threshold_mode": draw(st.sampled_from(["rel", "abs"])),
        "cooldown": draw(st.integers(0, 3)),
        "min_lr": min_lr,
        "eps": draw(st.sampled_from([0.0, 1e-8, 1e-3])),
    }
    return spec, lrs


def _torch_rop(spec: dict[str, Any], lrs: list[float]) -> tuple[Any, torch.optim.Optimizer]:
    opt = make_optimizer(lrs)
    kw = {k: v for k, v in spec.items() if k not in ("type", "metric")}
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw), opt


def _lrs(opt: torch.optim.Optimizer) -> np.ndarray:
    return np.array([float(g["lr"]) for g in opt.param_groups])


# ------------------------------------------------------------------------------------------
# torch ReduceLROnPlateau


@PLATEAU_EXAMPLES
@given(torch_configs(), streams, st.lists(st.integers(0, 5), min_size=60, max_size=60))
def test_rop_matches_torch_on_random_streams(
    config: tuple[dict[str, Any], list[float]], stream: list[float], gaps: list[int]
) -> None:
    spec, lrs = config
    sched, opt = _torch_rop(spec, lrs)
    driver = Driver(ReduceLROnPlateau.model_validate(spec).compile(_ctx(lrs)))
    assert_matches(driver.lr(0), _lrs(opt).reshape(-1, 1))
    step = -1
    for value, gap in zip(stream, gaps, strict=False):
        step += 1 + gap  # reports at arbitrary steps, not necessarily every step
        before = _lrs(opt)
        sched.step(value)
        after = _lrs(opt)
        decision = driver.report(step, value)
        node = driver.state[driver.curve.path]
        assert decision["reduced"] == bool(np.any(after != before)), (value, decision)
        assert node["num_bad_epochs"] == sched.num_bad_epochs
        assert node["cooldown_counter"] == sched.cooldown_counter
        assert node["last_epoch"] == sched.last_epoch
        torch_best = sched.best
        assert (node["best"] is None) == math.isinf(torch_best)
        if node["best"] is not None:
            assert node["best"] == torch_best
        # The decision applies from step + 1; the value at `step` is still the old one.
        assert_matches(driver.lr(step + 1)[:, 0], after, rtol=0, atol=0)
        assert_matches(driver.lr(step)[:, 0], before, rtol=0, atol=0)


def test_rop_vector_from_the_notes() -> None:
    """Constant metric, patience 2, factor .5: torch reduces at evaluations 4, 7, 10."""
    spec = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 2, "factor": 0.5}
    driver = Driver(ReduceLROnPlateau.model_validate(spec).compile(_ctx([1.0])))
    seen = []
    for s in range(10):
        driver.report(s, 1.0)
        seen.append(float(driver.lr(s + 1)[0, 0]))
    assert seen == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]


def test_rop_state_and_window_evaluation() -> None:
    """A window is evaluated from the reductions in the state, without replaying reports."""
    spec = {"type": "ReduceLROnPlateau", "metric": "loss", "patience": 0, "factor": 0.5}
    driver = Driver(ReduceLROnPlateau.model_validate(spec).compile(_ctx([1.0, 0.2])))
    driver.report(9, 1.0)  # first value: improvement
    d = driver.report(19, 1.0)  # no improvement, patience 0: reduce from step 20
    assert d["reduced"] and d["applies_from"] == 20
    node = driver.state["schedule"]
    assert node["reductions"] == [{"step": 20, "factor": [0.5, 0.5], "lr": [0.5, 0.1]}]
    values = driver.lr(list(range(25)))
    assert (values[:, :20] == np.array([[1.0], [0.2]])).all()
    assert (values[:, 20:] == np.array([[0.5], [0.1]])).all()
    assert_matches(driver.curve.multiplier(np.arange(25.0), driver.state)[:, 19:21], [[1, 0.5]] * 2)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_metric_counts_as_no_improvement(bad: float, mode: str) -> None:
    """NaN is what torch does; +-inf is our documented deviation (best stays finite)."""
    spec = {"type": "ReduceLROnPlateau", "metric": "m", "mode": mode, "patience": 1}
    driver = Driver(ReduceLROnPlateau.model_validate(spec).compile(_ctx([1.0])))
    driver.report(0, 1.0)
    driver.report(1, bad)
    node = driver.state["schedule"]
    assert node["best"] == 1.0 and node["num_bad_epochs"] == 1
    d = driver.report(2, bad)
    assert d["reduced"] and driver.lr(3)[0, 0] == pytest.approx(0.1)
    if math.isnan(bad):  # identical to torch
        sched, opt = _torch_rop({**spec}, [1.0])
        for v in (1.0, bad, bad):
            sched.step(v)
        assert float(opt.param_groups[0]["lr"]) == driver.lr(3)[0, 0]


def test_rop_refusals() -> None:
    with pytest.raises(ValidationError, match="metric"):
        ReduceLROnPlateau.model_validate({"type": "ReduceLROnPlateau"})
    with pytest.raises(ValidationError, match="less than 1"):
        ReduceLROnPlateau.model_validate({"type": "ReduceLROnPlateau", "metric": "m", "factor": 1})
    with pytest.raises(ValidationError):
        ReduceLROnPlateau.model_validate(
            {"type": "ReduceLROnPlateau", "metric": "m", "mode": "sideways"}
        )
    node = ReduceLROnPlateau.model_validate(
        {"type": "ReduceLROnPlateau", "metric": "m", "min_lr": [0.1, 0.2, 0.3]}
    )
    with pytest.raises(SpecError, match="3 entries but the run has 2"):
        node.compile(_ctx([1.0, 1.0]))


# ------------------------------------------------------------------------------------------
# timm PlateauLRScheduler (the real timm is the oracle)


def _timm_scheduler() -> Any:
    """timm's scheduler modules. timm's package ``__init__`` imports its models, which need
    torchvision; the scheduler modules need only torch, so without torchvision they are
    loaded from timm's own files under a bare package (the same code, nothing replaced)."""
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


@PLATEAU_EXAMPLES
@given(
    st.integers(1, 3),
    st.sampled_from(["min", "max"]),
    st.integers(0, 3),
    st.integers(0, 2),
    st.integers(0, 4),
    st.sampled_from([0.0, 0.01, 1e-3]),
    st.sampled_from([0.0, 0.1]),
    st.sampled_from([0.5, 0.1]),
    st.lists(st.one_of(_levels, st.none()), min_size=1, max_size=40),
)
def test_timm_plateau_matches_timm(
    groups: int,
    mode: str,
    patience: int,
    cooldown: int,
    warmup: int,
    init: float,
    lr_min: float,
    decay: float,
    stream: list[float | None],
) -> None:
    lrs = [1.0, 0.3, 0.02][:groups]
    opt = make_optimizer(lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = _timm_scheduler().PlateauLRScheduler(
            opt,
            decay_rate=decay,
            patience_t=patience,
            cooldown_t=cooldown,
            warmup_t=warmup,
            warmup_lr_init=init,
            lr_min=lr_min,
            mode=mode,
        )
    spec = {
        "type": "timm.PlateauLRScheduler",
        "metric": "top1",
        "decay_rate": decay,
        "patience_t": patience,
        "cooldown_t": cooldown,
        "warmup_t": warmup,
        "warmup_lr_init": init,
        "lr_min": lr_min,
        "mode": mode,
    }
    driver = Driver(TimmPlateauLRScheduler.model_validate(spec).compile(_ctx(lrs)))
    assert_matches(driver.lr(0)[:, 0], _lrs(opt), rtol=0, atol=0)
    # timm's train loop: after epoch s, sched.step(s + 1, metric). A report at our step s.
    for s, value in enumerate(stream):
        sched.step(s + 1, value)
        if value is not None:
            driver.report(s, value)
        assert_matches(driver.lr(s + 1)[:, 0], _lrs(opt), rtol=0, atol=0)
        node = driver.state["schedule"]
        assert node["last_epoch"] == sched.lr_scheduler.last_epoch
        assert node["num_bad_epochs"] == sched.lr_scheduler.num_bad_epochs


# ------------------------------------------------------------------------------------------
# Keras ReduceLROnPlateau (procedure from the notes; no Keras installed)


def keras_reference(
    stream: list[float],
    *,
    factor: float,
    patience: int,
    cooldown: int,
    min_lr: float,
    min_delta: float,
    mode: str,
    lr: float = 1.0,
) -> list[tuple[float, bool]]:
    """Keras 3.16 ``ReduceLROnPlateau.on_epoch_end`` transcribed from the research notes
    (Appendix A / section 5): ``(lr, reduce branch taken)`` after each evaluation. The lr
    lives in a float32 variable, as in a Keras optimizer."""
    lr = float(np.float32(lr))
    best: float | None = None
    wait = 0
    cooldown_counter = 0
    delta = abs(min_delta)
    out = []
    for current in stream:
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if mode == "min":
            improved = best is None or current + delta < best
        else:
            improved = best is None or current - delta > best
        triggered = False
        if improved:
            best = current
            wait = 0
        elif cooldown_counter == 0:
            wait += 1
            if wait >= patience and lr > float(np.float32(min_lr)):
                lr = float(np.float32(max(lr * factor, min_lr)))
                cooldown_counter = cooldown
                wait = 0
                triggered = True
        out.append((lr, triggered))
    return out


@pytest.mark.parametrize(
    ("patience", "cooldown", "expected"),
    [
        (2, 0, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]),
        (2, 2, [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]),
    ],
)
def test_keras_vectors_from_the_notes(patience: int, cooldown: int, expected: list[float]) -> None:
    """Section 0.5: constant metric, factor .5, min_delta 0 (the cooldown-1 quirk shows)."""
    spec = {
        "type": "keras.ReduceLROnPlateau",
        "monitor": "val_loss",
        "factor": 0.5,
        "patience": patience,
        "cooldown": cooldown,
        "min_delta": 0.0,
    }
    driver = Driver(KerasReduceLROnPlateau.model_validate(spec).compile(_ctx([1.0])))
    seen = []
    for s in range(len(expected)):
        driver.report(s, 1.0)
        seen.append(float(driver.lr(s + 1)[0, 0]))
    assert seen == expected


@PLATEAU_EXAMPLES
@given(
    st.sampled_from(["min", "max"]),
    st.sampled_from([0.1, 0.5, 0.9]),
    st.integers(0, 4),
    st.integers(0, 3),
    # 0.7 and 0.45 round *down* to float32: Keras's `lr > float32(min_lr)` then matters.
    st.sampled_from([0.0, 0.05, 0.3, 0.7, 0.45]),
    st.sampled_from([0.0, 1e-4, 0.1]),
    st.lists(st.one_of(_levels, st.floats(-5, 5)), min_size=1, max_size=50),
)
def test_keras_matches_its_procedure(
    mode: str,
    factor: float,
    patience: int,
    cooldown: int,
    min_lr: float,
    min_delta: float,
    stream: list[float],
) -> None:
    """Against Keras 3.16's decision procedure (research notes Appendix A), random streams."""
    spec = {
        "type": "keras.ReduceLROnPlateau",
        "monitor": "score",
        "mode": mode,
        "factor": factor,
        "patience": patience,
        "cooldown": cooldown,
        "min_lr": min_lr,
        "min_delta": min_delta,
    }
    expected = keras_reference(
        stream,
        factor=factor,
        patience=patience,
        cooldown=cooldown,
        min_lr=min_lr,
        min_delta=min_delta,
        mode=mode,
    )
    driver = Driver(KerasReduceLROnPlateau.model_validate(spec).compile(_ctx([1.0])))
    for s, value in enumerate(stream):
        decision = driver.report(2 * s, value)
        lr, triggered = expected[s]
        assert decision["triggered"] == triggered, (s, value, decision)
        # We serve float64; Keras rounds its lr variable to float32.
        assert driver.lr(2 * s + 1)[0, 0] == pytest.approx(lr, rel=1e-6)


def test_keras_auto_mode() -> None:
    assert keras_direction("val_loss") == "min"
    assert keras_direction("val_accuracy") == "max"
    assert keras_direction("acc") == "max"
    with pytest.raises(ValidationError, match="cannot tell whether 'val_bleu'"):
        KerasReduceLROnPlateau.model_validate(
            {"type": "keras.ReduceLROnPlateau", "monitor": "val_bleu"}
        )
    node = KerasReduceLROnPlateau.model_validate(
        {"type": "keras.ReduceLROnPlateau", "monitor": "val_accuracy", "patience": 0}
    )
    driver = Driver(node.compile(_ctx([1.0])))
    assert driver.curve.metric == "val_accuracy"
    driver.report(0, 0.5)
    assert not driver.report(1, 0.9)["reduced"]  # higher is better
    assert driver.report(2, 0.1)["reduced"]


# ------------------------------------------------------------------------------------------
# optax contrib.reduce_on_plateau (procedure from the notes; no optax installed)


def optax_reference(
    stream: list[float],
    *,
    factor: float,
    patience: int,
    rtol: float,
    atol: float,
    cooldown: int,
    accumulation_size: int,
    min_scale: float,
) -> list[float]:
    """optax's ``reduce_on_plateau`` update transcribed from its source as quoted in the
    research notes (Appendix A, section 4), in float64: scale after each value."""
    scale, best, plateau, cd, count, avg = 1.0, math.inf, 0, 0, 0, 0.0
    out = []
    for value in stream:
        new_count = count + 1
        avg = (count * avg + value) / new_count
        count = new_count
        if count == accumulation_size:
            improved = avg < (1 - rtol) * best - atol
            if improved:
                best = avg
            curr = 0 if improved else plateau + 1
            if cd > 0:
                plateau, cd = 0, cd - 1
            else:
                if curr == patience:
                    plateau, scale, cd = 0, max(scale * factor, min_scale), cooldown
                else:
                    plateau, scale, cd = curr, max(scale, min_scale), 0
            count, avg = 0, 0.0
        out.append(scale)
    return out


def test_optax_vectors_from_the_notes() -> None:
    """Section 0.5: constant metric, patience 2, factor .5 (cooldown 0 and 2)."""
    for cooldown, expected in [
        (0, [1, 1, 0.5, 0.5, 0.25, 0.25]),
        (2, [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125]),
    ]:
        spec = {
            "type": "optax.contrib.reduce_on_plateau",
            "metric": "loss",
            "factor": 0.5,
            "patience": 2,
            "cooldown": cooldown,
        }
        driver = Driver(OptaxReduceOnPlateau.model_validate(spec).compile(_ctx([2.0])))
        seen = []
        for s in range(len(expected)):
            driver.report(s, 3.0)
            seen.append(float(driver.lr(s + 1)[0, 0]) / 2.0)
        assert seen == expected


@PLATEAU_EXAMPLES
@given(
    st.sampled_from([0.1, 0.5, 0.9]),
    st.integers(0, 4),
    st.sampled_from([0.0, 1e-4, 0.1]),
    st.sampled_from([0.0, 0.01]),
    st.integers(0, 3),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.2]),
    st.lists(st.one_of(_levels, st.floats(-5, 5)), min_size=1, max_size=50),
)
def test_optax_matches_its_procedure(
    factor: float,
    patience: int,
    rtol: float,
    atol: float,
    cooldown: int,
    acc: int,
    min_scale: float,
    stream: list[float],
) -> None:
    """Against optax's update procedure (research notes), random streams and accumulation."""
    if rtol == 0 and atol == 0:
        atol = 1e-3
    spec = {
        "type": "optax.contrib.reduce_on_plateau",
        "metric": "loss",
        "factor": factor,
        "patience": patience,
        "rtol": rtol,
        "atol": atol,
        "cooldown": cooldown,
        "accumulation_size": acc,
        "min_scale": min_scale,
    }
    expected = optax_reference(
        stream,
        factor=factor,
        patience=patience,
        rtol=rtol,
        atol=atol,
        cooldown=cooldown,
        accumulation_size=acc,
        min_scale=min_scale,
    )
    driver = Driver(OptaxReduceOnPlateau.model_validate(spec).compile(_ctx([1.0, 0.5])))
    for s, value in enumerate(stream):
        driver.report(s, value)
        assert_matches(driver.lr(s + 1)[:, 0], np.array([1.0, 0.5]) * expected[s])


def test_optax_refusals() -> None:
    base = {"type": "optax.contrib.reduce_on_plateau", "metric": "loss"}
    with pytest.raises(ValidationError, match="at least one of rtol or atol"):
        OptaxReduceOnPlateau.model_validate({**base, "rtol": 0.0, "atol": 0.0})
    with pytest.raises(ValidationError):
        OptaxReduceOnPlateau.model_validate({**base, "factor": 0.0})
    with pytest.raises(ValidationError):
        OptaxReduceOnPlateau.model_validate({**base, "accumulation_size": 0})
    with pytest.raises(ValidationError):
        OptaxReduceOnPlateau.model_validate({**base, "rtol": 1.5})
