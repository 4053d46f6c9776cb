"""The LRRangeTest node and its suggestion rules, against the libraries themselves.

Oracles:

- torch-lr-finder (installed, ``torch_lr_finder.LRFinder``): a model whose "loss" is a fixed
  sequence is put through the real ``range_test``; our node, fed the same sequence report by
  report, must give the same rates (the ones the optimizer trained with, every group), the same
  smoothed losses, the same stop step, and ``steepest`` equal to the lr ``LRFinder.plot``
  suggests.
- fastai (not installed: it would pull torchvision): its ``valley`` and ``minimum`` rules and
  the span ``Learner.lr_find`` hands them, copied verbatim below from
  fastai/callback/schedule.py (fastai 2.x, ``valley``, ``minimum``, ``lr_find``), run on torch
  tensors as fastai runs them.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
import torch_lr_finder  # the oracle (a dev requirement: never skipped)
from pydantic import ValidationError

from service.schedules import Program, ScheduleSpec, SpecError
from service.schedules.range_test import (
    RangeTestCurve,
    minimum,
    should_stop,
    smooth_losses,
    steepest,
    suggestion_index,
    valley,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# --- fastai, verbatim from fastai/callback/schedule.py ------------------------------------
# (the lr_find span is made a function; the bodies are fastai's). fastai's own `tensor`
# (fastai/torch_core.py) makes float32 tensors of Python floats; the service applies the same
# rules to its float64 values, so `tensor` here keeps float64 (the rules, not the precision,
# are what is compared).


def tensor(x: Any) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def fastai_valley(lrs: list, losses: list, num_it: int):  # type: ignore[no-untyped-def,type-arg]
    "Suggests a learning rate from the longest valley and returns its index"
    n = len(losses)
    max_start, max_end = 0, 0

    # find the longest valley
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]

    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)

    return float(lrs[idx]), (float(lrs[idx]), losses[idx])


def fastai_minimum(lrs: list, losses: list, num_it: int):  # type: ignore[no-untyped-def,type-arg]
    "Suggests a learning rate one-tenth the minumum before divergance and returns its index"
    lr_min = lrs[losses.argmin()].item()
    loss_idx = losses[min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr_min))]
    return lr_min / 10, (lr_min, loss_idx)


def fastai_span(recorder_lrs: list, recorder_losses: list, num_it: int):  # type: ignore[no-untyped-def,type-arg]
    # Learner.lr_find, the lines before it calls the suggestion functions:
    # (fastai: tensor(self.recorder.lrs[num_it//10:-5]), tensor(self.recorder.losses[...]))
    lrs = tensor(recorder_lrs[num_it // 10 : -5])
    losses = tensor(recorder_losses[num_it // 10 : -5])
    nan_idxs = torch.nonzero(torch.isnan(losses.view(-1)))
    if len(nan_idxs) > 0:
        drop_idx = min(nan_idxs)
        lrs = lrs[:drop_idx]
        losses = losses[:drop_idx]
    return lrs, losses


# --- torch-lr-finder driven by a fixed loss sequence ---------------------------------------


class _Params(torch.nn.Module):
    """One float64 parameter per group (the "model" torch-lr-finder trains)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in range(groups)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p.sum() for p in self.ps), torch.zeros((), dtype=torch.float64)) * x.sum()


class _Losses(torch.nn.Module):
    """A criterion whose value at call ``k`` is ``losses[k]`` (float64: ``.item()`` exact), and
    which records every group's lr the optimizer trains with at that call."""

    def __init__(self, losses: list[float], opt: torch.optim.Optimizer) -> None:
        super().__init__()
        self.losses = losses
        self.opt = opt
        self.seen_lr: list[list[float]] = []

    def forward(self, out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        self.seen_lr.append([float(g["lr"]) for g in self.opt.param_groups])
        value = self.losses[len(self.seen_lr) - 1]
        return out.sum() * 0 + torch.tensor(value, dtype=torch.float64)


def run_finder(
    losses: list[float], start_lr: float | list[float], **kw: Any
) -> tuple[dict[str, list[float]], list[list[float]], float | None]:
    """torch-lr-finder's history, the rates each iteration trained with, and its suggestion."""
    groups = len(start_lr) if isinstance(start_lr, list) else 1
    model = _Params(groups)
    opt = torch.optim.SGD([{"params": [p]} for p in model.ps], lr=1.0)
    criterion = _Losses(losses, opt)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    finder = torch_lr_finder.LRFinder(model, opt, criterion, device="cpu")
    finder.range_test(loader, start_lr=start_lr, **kw)
    suggestion = None
    if len(finder.history["lr"]) >= 17:
        fig, ax = plt.subplots()
        _, suggestion = finder.plot(ax=ax, suggest_lr=True)
        plt.close(fig)
    return finder.history, criterion.seen_lr, suggestion


def run_ours(
    losses: list[float], schedule: dict[str, Any], groups: int = 1
) -> tuple[list[list[float]], list[float], int | None, Program, dict[str, Any]]:
    """Our node fed the same sequence: rates per step (every group), smoothed, stop step."""
    spec = ScheduleSpec.model_validate(
        {"groups": [{"name": f"g{i}", "lr": 1.0} for i in range(groups)], "schedule": schedule}
    )
    program = Program(spec)
    state: dict[str, Any] = program.initial_state()
    rates: list[list[float]] = []
    smoothed: list[float] = []
    stopped = None
    for step, loss in enumerate(losses):
        values = program.at(state, step)
        rates.append([values[f"g{i}"]["lr"] for i in range(groups)])
        state, decision = program.observe(state, step, {"loss": loss})
        node = decision["nodes"][0]
        smoothed.append(node["smoothed"] if node["smoothed"] is not None else math.nan)
        stopped = state["schedule"]["stopped_at"]
        if should_stop(program.metric_nodes, state, step):
            break
    return rates, smoothed, stopped, program, state


def _shape(n: int, seed: int, *, noise: float = 0.05, blow: float = 1.0) -> list[float]:
    """A range-test-like loss: flat, falling, then rising fast (with noise)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, n)
    loss = 2.0 - 1.5 / (1 + np.exp(-(x - 0.35) * 20)) + blow * np.exp((x - 0.8) * 25)
    return [float(v) for v in loss * (1 + noise * rng.standard_normal(n))]


CASES = [
    ("exp-diverges", _shape(100, 1), {"start_lr": 1e-7, "end_lr": 10, "num_iter": 100}),
    ("exp-no-divergence", _shape(80, 2, blow=0.0), {"start_lr": 1e-6, "end_lr": 1, "num_iter": 80}),
    (
        "linear-th3",
        _shape(60, 3),
        {"start_lr": 1e-4, "end_lr": 0.5, "num_iter": 60, "step_mode": "linear", "diverge_th": 3.0},
    ),
    (
        "no-smoothing",
        _shape(120, 4, noise=0.2),
        {"start_lr": 1e-5, "end_lr": 3, "num_iter": 120, "smooth_f": 0.0},
    ),
    (
        "heavy-noise",
        _shape(200, 5, noise=0.5),
        {"start_lr": 1e-8, "end_lr": 100, "num_iter": 200, "smooth_f": 0.3},
    ),
    ("short", _shape(12, 6), {"start_lr": 1e-3, "end_lr": 1, "num_iter": 12}),
]


@pytest.mark.parametrize(("losses", "params"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_same_rates_smoothing_stop_and_steepest_as_torch_lr_finder(
    losses: list[float], params: dict[str, Any]
) -> None:
    kw = {k: v for k, v in params.items() if k != "start_lr"}
    history, seen, suggested = run_finder(losses, params["start_lr"], **kw)
    rates, smoothed, stopped, _, _ = run_ours(losses, {"type": "LRRangeTest", **params})
    n = len(history["loss"])
    # Same stop step: torch-lr-finder records the diverging point, then breaks.
    assert len(smoothed) == n
    if n < params["num_iter"]:
        assert stopped == n - 1
    else:  # ran to the end: our stop step is the last one only if that one diverged
        assert stopped in (None, n - 1)
    # The same rates, bit for bit: those the optimizer trained with and those recorded.
    assert [r[0] for r in rates] == [s[0] for s in seen[:n]] == history["lr"]
    # The same smoothed losses, bit for bit (the same float operations in the same order).
    assert smoothed == history["loss"]
    # torch-lr-finder's suggestion (LRFinder.plot), or none below its 17-point minimum.
    assert steepest(history["lr"], smoothed) == suggested
    if n < 17:
        assert suggested is None


def test_stop_step_is_the_diverging_point_and_recorded() -> None:
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, 5.0, 50.0, 500.0, 5000.0]
    history, _, _ = run_finder(losses, 1e-3, end_lr=1, num_iter=9, smooth_f=0.5)
    _, smoothed, stopped, _, state = run_ours(
        losses,
        {"type": "LRRangeTest", "start_lr": 1e-3, "end_lr": 1, "num_iter": 9, "smooth_f": 0.5},
    )
    assert smoothed == history["loss"]
    assert stopped == len(history["loss"]) - 1 < len(losses) - 1
    assert state["schedule"]["best"] == min(history["loss"])
    # Reports after the stop change nothing.
    spec_program = run_ours(
        losses,
        {"type": "LRRangeTest", "start_lr": 1e-3, "end_lr": 1, "num_iter": 9, "smooth_f": 0.5},
    )[3]
    after, decision = spec_program.observe(state, stopped + 1, {"loss": 0.01})
    assert after == state and decision["nodes"][0]["ignored"] == "stopped"


def test_per_group_rates_match_torch_lr_finder() -> None:
    losses = _shape(40, 7, blow=0.0)
    starts = [1e-6, 1e-4, 3e-3]
    history, seen, _ = run_finder(losses, starts, end_lr=2.0, num_iter=40)
    rates, smoothed, _, _, _ = run_ours(
        losses, {"type": "LRRangeTest", "start_lr": starts, "end_lr": 2.0, "num_iter": 40}, groups=3
    )
    assert rates == seen[: len(rates)]
    assert smoothed == history["loss"]


def test_start_lr_defaults_to_group_lr_and_value_holds_after_the_end() -> None:
    spec = ScheduleSpec.model_validate(
        {
            "groups": [{"name": "a", "lr": 1e-5}, {"name": "b", "lr": 1e-3}],
            "schedule": {"type": "LRRangeTest", "end_lr": [1.0, 10.0], "num_iter": 11},
        }
    )
    program = Program(spec)
    values = program.evaluate({}, 0, 20)
    assert values["a"]["lr"][0] == 1e-5 and values["b"]["lr"][0] == 1e-3
    assert values["a"]["lr"][10] == pytest.approx(1.0, rel=1e-15)
    assert np.all(values["a"]["lr"][10:] == values["a"]["lr"][10])
    assert np.all(values["b"]["lr"][10:] == values["b"]["lr"][10])
    # The stop answer once the last step is reached, even without divergence.
    nodes = program.metric_nodes
    assert not should_stop(nodes, program.initial_state(), 9)
    assert should_stop(nodes, program.initial_state(), 10)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("num_iter", [100, 37, 300])
def test_valley_and_minimum_are_fastais_rules(seed: int, num_iter: int) -> None:
    losses = _shape(num_iter, 100 + seed, noise=0.1 * (seed % 4))
    rates, smoothed, _, _, _ = run_ours(
        losses, {"type": "LRRangeTest", "start_lr": 1e-7, "end_lr": 10, "num_iter": num_iter}
    )
    lrs = [r[0] for r in rates]
    flrs, flosses = fastai_span(lrs, smoothed, num_iter)
    want_valley = fastai_valley(flrs, flosses, num_iter)[0]
    want_minimum = fastai_minimum(flrs, flosses, num_iter)[0]
    assert valley(lrs, smoothed, num_iter) == want_valley
    assert minimum(lrs, smoothed, num_iter) == want_minimum
    index = suggestion_index(lrs, smoothed, num_iter)
    assert lrs[index["valley"]] == want_valley
    assert lrs[index["minimum"]] / 10 == want_minimum
    assert lrs[index["steepest"]] == steepest(lrs, smoothed)


def test_fastai_rules_on_edge_spans() -> None:
    # Non-decreasing (no valley: index 0), strictly decreasing (fastai's max_start is one before
    # the run), ties, a NaN cut, two points (fastai's index -1: the last point), and empty.
    lrs = [float(i + 1) for i in range(30)]
    for losses in (
        [1.0] * 30,
        [30.0 - i for i in range(30)],
        [float(i) for i in range(30)],
        [3.0, 2.0, 2.0, 1.0, 1.0, 0.5] * 5,
        [5.0, 4.0, 3.0, math.nan, 1.0] * 6,
    ):
        for num_it in (30, 10, 0):
            flrs, flosses = fastai_span(lrs, losses, num_it)
            if len(flrs) == 0:
                assert valley(lrs, losses, num_it) is None
                continue
            assert valley(lrs, losses, num_it) == fastai_valley(flrs, flosses, num_it)[0]
            assert minimum(lrs, losses, num_it) == fastai_minimum(flrs, flosses, num_it)[0]
    two = [float(x) for x in range(1, 8)]
    assert (
        valley(two, [2.0, 1.0, 0, 0, 0, 0, 0], 0)
        == fastai_valley(tensor(two[:2]), tensor([2.0, 1.0]), 0)[0]
    )
    assert valley([1.0] * 5, [1.0] * 5, 0) is None and minimum([1.0] * 5, [1.0] * 5, 0) is None
    assert steepest([1.0] * 16, [1.0] * 16) is None


def test_non_finite_loss_stops_and_keeps_state_finite() -> None:
    program = Program(
        ScheduleSpec.model_validate(
            {
                "groups": [{"name": "g", "lr": 1e-3}],
                "schedule": {"type": "LRRangeTest", "num_iter": 50},
            }
        )
    )
    state = program.initial_state()
    state, _ = program.observe(state, 0, {"loss": 2.0})
    state, decision = program.observe(state, 1, {"loss": math.nan})
    node = state["schedule"]
    assert node["stopped_at"] == 1 and node["smoothed"] == 2.0 and node["best"] == 2.0
    assert decision["nodes"][0]["stop"] is True
    assert smooth_losses([2.0, math.inf, 1.0], 0.05, 5.0)[1] == 1


@pytest.mark.parametrize(
    ("schedule", "where"),
    [
        ({"type": "LRRangeTest", "num_iter": 1}, "num_iter"),
        ({"type": "LRRangeTest", "num_iter": 10**6}, "num_iter"),
        ({"type": "LRRangeTest", "smooth_f": 1.0}, "smooth_f"),
        ({"type": "LRRangeTest", "diverge_th": 0.5}, "diverge_th"),
        ({"type": "LRRangeTest", "start_lr": 0.0}, "start_lr"),
        ({"type": "LRRangeTest", "end_lr": []}, "end_lr"),
        ({"type": "LRRangeTest", "step_mode": "cos"}, "step_mode"),
    ],
)
def test_bad_arguments_are_refused(schedule: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        ScheduleSpec.model_validate({"groups": [{"name": "g", "lr": 1e-3}], "schedule": schedule})
    assert where in str(info.value)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (
            {
                "groups": [{"name": "g", "lr": 1e-3}],
                "schedule": {
                    "type": "SequentialLR",
                    "schedulers": [{"type": "LRRangeTest"}, {"type": "ConstantLR"}],
                    "milestones": [5],
                },
            },
            "schedule",
        ),
        (
            {"groups": [{"name": "g", "lr": 0.0}], "schedule": {"type": "LRRangeTest"}},
            "start_lr",
        ),
        (
            {
                "groups": [{"name": "g", "lr": 1e-3}, {"name": "h", "lr": 1e-3}],
                "schedule": {"type": "LRRangeTest", "end_lr": [1.0, 2.0, 3.0]},
            },
            "end_lr",
        ),
    ],
)
def test_uncompilable_specs_name_the_field(body: dict[str, Any], loc: str) -> None:
    with pytest.raises(SpecError) as info:
        Program(ScheduleSpec.model_validate(body))
    assert loc in info.value.loc


def test_node_is_a_metric_curve_in_group_schedules() -> None:
    program = Program(
        ScheduleSpec.model_validate(
            {
                "groups": [{"name": "a", "lr": 0.1}, {"name": "b", "lr": 1e-4}],
                "schedule": {"type": "ConstantLR", "factor": 1.0, "total_iters": 0},
                "group_schedules": {"b": {"type": "LRRangeTest", "num_iter": 20, "end_lr": 1.0}},
            }
        )
    )
    nodes = [n for n in program.metric_nodes if isinstance(n, RangeTestCurve)]
    assert [n.path for n in nodes] == ["group_schedules.b"]
    assert program.metric_names == frozenset({"loss"})
    values = program.evaluate({}, 0, 20)
    assert np.all(values["a"]["lr"] == 0.1)
    assert values["b"]["lr"][19] == pytest.approx(1.0, rel=1e-15)
