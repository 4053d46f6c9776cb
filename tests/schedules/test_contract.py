"""The composition contract, for every registered node type.

One small valid example per type (``EXAMPLES``; a registered type without one fails
``test_every_type_has_an_example``), run standalone and inside every composite: SequentialLR
(as the child after a milestone, and as the first child), ChainedScheduler, optax's
join_schedules and the epoch wrapper. Groups have momentum (SGD-style) and betas (Adam-style,
field ``beta1``) and ``param_schedules`` schedules two extra fields, so every output field is
checked: during the node's segment a composite must give the standalone node's values in the
node's local time (lr by each composite's restart rule, momentum/beta1 exactly the node's
cycle where it cycles them), outside it the filler's values or the held momentum, and the
extra fields untouched. Every composite's windows must equal the same slice of a full
evaluation (count 1 included, windows crossing the milestone, with and without observed
metric reports). Combinations the engine refuses must be refused with ``SpecError``.

The expectations are derived from the standalone engine (and, for the restart rule of
torch's recursive nodes, the rule written out in ``RESTART_FACTOR``); torch itself is the
oracle of the per-node test files.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

from service.schedules import NODE_TYPES, Program, ScheduleSpec, SpecError
from service.schedules.expr import parse
from tests.schedules.conftest import assert_matches

N = 120
"""Steps evaluated per check."""
M = 40
"""The milestone / boundary at which the node under test starts (or stops)."""
SPE = 3
"""steps_per_epoch of the epoch-wrapper variant."""
RTOL = 1e-12

GROUPS: list[dict[str, Any]] = [
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    {"name": "adam", "lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.05, "eps": 1e-8},
    {"name": "sgd2", "lr": 0.5, "momentum": 0.8, "weight_decay": 2e-4},
]
PARAM_SCHEDULES: dict[str, dict[str, Any]] = {
    "weight_decay": {"type": "CosineAnnealingLR", "T_max": 50},
    "eps": {"type": "ExponentialLR", "gamma": 0.99},
}
MOMENTUM_FIELD = {"sgd": "momentum", "adam": "beta1", "sgd2": "momentum"}
METRIC = "val_loss"

FILLER: dict[str, Any] = {"type": "LinearLR", "start_factor": 0.25, "total_iters": 20}
"""The other child of the SequentialLR / join variants (time-driven, no momentum)."""
IDENTITY: dict[str, Any] = {"type": "MultiplicativeLR", "lr_lambda": "1.0"}
"""A ChainedScheduler sibling that leaves the lr as it is, in torch too."""

_warm = {"num_warmup_steps": 10, "num_training_steps": 100}
_timm_warm = {"warmup_t": 5, "warmup_lr_init": 1e-5}
_sgdr_seg = {"init_value": 0.0, "warmup_steps": 5, "decay_steps": 30, "end_value": 1e-4}

EXAMPLES: dict[str, dict[str, Any]] = {
    # torch
    "StepLR": {"type": "StepLR", "step_size": 7, "gamma": 0.5},
    "MultiStepLR": {"type": "MultiStepLR", "milestones": [5, 20, 50], "gamma": 0.5},
    "ConstantLR": {"type": "ConstantLR", "factor": 0.5, "total_iters": 10},
    "LinearLR": {"type": "LinearLR", "start_factor": 0.1, "total_iters": 15},
    "ExponentialLR": {"type": "ExponentialLR", "gamma": 0.97},
    "PolynomialLR": {"type": "PolynomialLR", "total_iters": 30, "power": 2.0},
    "CosineAnnealingLR": {"type": "CosineAnnealingLR", "T_max": 25, "eta_min": 1e-4},
    "CosineAnnealingWarmRestarts": {
        "type": "CosineAnnealingWarmRestarts",
        "T_0": 10,
        "T_mult": 2,
        "eta_min": 1e-5,
    },
    "LambdaLR": {"type": "LambdaLR", "lr_lambda": ["0.95 ** epoch", "1 / (1 + epoch)", "1.0"]},
    "MultiplicativeLR": {
        "type": "MultiplicativeLR",
        "lr_lambda": "0.99999 + 0.000001 * cos(epoch)",
    },
    "CyclicLR": {
        "type": "CyclicLR",
        "base_lr": 1e-3,
        "max_lr": [0.1, 0.01, 0.2],
        "step_size_up": 8,
        "mode": "triangular2",
    },
    "OneCycleLR": {"type": "OneCycleLR", "max_lr": [0.5, 0.01, 1.0], "total_steps": 60},
    "SWALR": {"type": "SWALR", "swa_lr": [0.01, 1e-3, 0.05], "anneal_epochs": 12},
    # metric-driven
    "ReduceLROnPlateau": {"type": "ReduceLROnPlateau", "metric": METRIC, "patience": 3},
    "timm.PlateauLRScheduler": {
        "type": "timm.PlateauLRScheduler",
        "metric": METRIC,
        "mode": "min",
        "patience_t": 3,
        **_timm_warm,
    },
    "keras.ReduceLROnPlateau": {"type": "keras.ReduceLROnPlateau", "patience": 3, "factor": 0.5},
    "optax.contrib.reduce_on_plateau": {
        "type": "optax.contrib.reduce_on_plateau",
        "metric": METRIC,
        "patience": 3,
        "factor": 0.5,
    },
    # the range test (standalone only: it refuses every composition)
    "LRRangeTest": {
        "type": "LRRangeTest",
        "start_lr": 1e-5,
        "end_lr": [1.0, 0.1, 2.0],
        "num_iter": 50,
        "metric": METRIC,
    },
    # composites (simple children: their own contracts are what is under test)
    "SequentialLR": {
        "type": "SequentialLR",
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.2, "total_iters": 10},
            {"type": "ExponentialLR", "gamma": 0.95},
        ],
        "milestones": [10],
    },
    "ChainedScheduler": {
        "type": "ChainedScheduler",
        "schedulers": [
            {"type": "ConstantLR", "factor": 0.5, "total_iters": 8},
            {"type": "ExponentialLR", "gamma": 0.98},
        ],
    },
    "Epochs": {
        "type": "Epochs",
        "steps_per_epoch": 4,
        "schedule": {"type": "StepLR", "step_size": 3, "gamma": 0.5},
    },
    # transformers
    "transformers.get_constant_schedule": {"type": "transformers.get_constant_schedule"},
    "transformers.get_constant_schedule_with_warmup": {
        "type": "transformers.get_constant_schedule_with_warmup",
        "num_warmup_steps": 10,
    },
    "transformers.get_linear_schedule_with_warmup": {
        "type": "transformers.get_linear_schedule_with_warmup",
        **_warm,
    },
    "transformers.get_cosine_schedule_with_warmup": {
        "type": "transformers.get_cosine_schedule_with_warmup",
        **_warm,
    },
    "transformers.get_cosine_with_hard_restarts_schedule_with_warmup": {
        "type": "transformers.get_cosine_with_hard_restarts_schedule_with_warmup",
        **_warm,
        "num_cycles": 3,
    },
    "transformers.get_polynomial_decay_schedule_with_warmup": {
        "type": "transformers.get_polynomial_decay_schedule_with_warmup",
        **_warm,
        "power": 2.0,
    },
    "transformers.get_inverse_sqrt_schedule": {
        "type": "transformers.get_inverse_sqrt_schedule",
        "num_warmup_steps": 10,
    },
    "transformers.get_cosine_with_min_lr_schedule_with_warmup": {
        "type": "transformers.get_cosine_with_min_lr_schedule_with_warmup",
        **_warm,
        "min_lr_rate": 0.1,
    },
    "transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate": {
        "type": "transformers.get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
        **_warm,
        "min_lr_rate": 0.1,
        "warmup_lr_rate": 0.05,
    },
    "transformers.get_wsd_schedule": {
        "type": "transformers.get_wsd_schedule",
        "num_warmup_steps": 10,
        "num_decay_steps": 30,
        "num_training_steps": 100,
        "min_lr_ratio": 0.1,
    },
    # timm
    "timm.CosineLRScheduler": {
        "type": "timm.CosineLRScheduler",
        "t_initial": 30,
        "lr_min": 1e-5,
        "cycle_limit": 3,
        "cycle_decay": 0.5,
        **_timm_warm,
    },
    "timm.TanhLRScheduler": {"type": "timm.TanhLRScheduler", "t_initial": 50, **_timm_warm},
    "timm.StepLRScheduler": {
        "type": "timm.StepLRScheduler",
        "decay_t": 10.0,
        "decay_rate": 0.5,
        **_timm_warm,
    },
    "timm.MultiStepLRScheduler": {
        "type": "timm.MultiStepLRScheduler",
        "decay_t": [10, 30, 70],
        "decay_rate": 0.5,
    },
    "timm.PolyLRScheduler": {
        "type": "timm.PolyLRScheduler",
        "t_initial": 60,
        "power": 0.5,
        "noise_range_t": [20, 50],
        "noise_pct": 0.1,
    },
    # optax
    "optax.constant_schedule": {"type": "optax.constant_schedule"},
    "optax.polynomial_schedule": {
        "type": "optax.polynomial_schedule",
        "end_value": 1e-4,
        "power": 2.0,
        "transition_steps": 50,
        "transition_begin": 5,
    },
    "optax.linear_schedule": {
        "type": "optax.linear_schedule",
        "end_value": [0.0, 1e-4, 0.01],
        "transition_steps": 60,
    },
    "optax.piecewise_constant_schedule": {
        "type": "optax.piecewise_constant_schedule",
        "boundaries_and_scales": {"10": 0.5, "30": 0.1},
    },
    "optax.piecewise_interpolate_schedule": {
        "type": "optax.piecewise_interpolate_schedule",
        "interpolate_type": "cosine",
        "boundaries_and_scales": {"10": 0.5, "50": 0.1},
    },
    "optax.exponential_decay": {
        "type": "optax.exponential_decay",
        "transition_steps": 10,
        "decay_rate": 0.5,
        "staircase": True,
    },
    "optax.cosine_decay_schedule": {
        "type": "optax.cosine_decay_schedule",
        "decay_steps": 60,
        "alpha": 0.1,
    },
    "optax.cosine_onecycle_schedule": {
        "type": "optax.cosine_onecycle_schedule",
        "transition_steps": 60,
    },
    "optax.linear_onecycle_schedule": {
        "type": "optax.linear_onecycle_schedule",
        "transition_steps": 60,
    },
    "optax.warmup_constant_schedule": {
        "type": "optax.warmup_constant_schedule",
        "init_value": 0.0,
        "warmup_steps": 10,
    },
    "optax.warmup_cosine_decay_schedule": {
        "type": "optax.warmup_cosine_decay_schedule",
        "init_value": 0.0,
        "warmup_steps": 10,
        "decay_steps": 60,
        "end_value": 1e-4,
    },
    "optax.warmup_exponential_decay_schedule": {
        "type": "optax.warmup_exponential_decay_schedule",
        "init_value": 0.0,
        "warmup_steps": 10,
        "transition_steps": 10,
        "decay_rate": 0.5,
    },
    "optax.sgdr_schedule": {
        "type": "optax.sgdr_schedule",
        "cosine_kwargs": [_sgdr_seg, {**_sgdr_seg, "decay_steps": 50}],
    },
    "optax.join_schedules": {
        "type": "optax.join_schedules",
        "schedules": [
            {
                "type": "optax.linear_schedule",
                "init_value": 0.0,
                "end_value": 0.1,
                "transition_steps": 15,
            },
            {"type": "optax.exponential_decay", "transition_steps": 5, "decay_rate": 0.7},
        ],
        "boundaries": [15],
    },
    # Keras
    "keras.ExponentialDecay": {
        "type": "keras.ExponentialDecay",
        "decay_steps": 10,
        "decay_rate": 0.5,
    },
    "keras.PiecewiseConstantDecay": {
        "type": "keras.PiecewiseConstantDecay",
        "boundaries": [10, 30],
        "values": [[0.1, 0.01, 0.5], 0.05, 0.01],
    },
    "keras.PolynomialDecay": {"type": "keras.PolynomialDecay", "decay_steps": 25, "cycle": True},
    "keras.InverseTimeDecay": {
        "type": "keras.InverseTimeDecay",
        "decay_steps": 10,
        "decay_rate": 0.5,
    },
    "keras.CosineDecay": {
        "type": "keras.CosineDecay",
        "initial_learning_rate": 0.0,
        "decay_steps": 60,
        "warmup_target": [0.1, 0.003, 0.5],
        "warmup_steps": 10,
    },
    "keras.CosineDecayRestarts": {"type": "keras.CosineDecayRestarts", "first_decay_steps": 20},
}
"""One small valid example per registered type, sized so that N = 120 steps show its shape."""


def _lambda_at_zero(node: Mapping[str, Any]) -> np.ndarray:
    source = node["lr_lambda"]
    sources = source if isinstance(source, list) else [source] * len(GROUPS)
    return np.asarray([float(parse(s)(epoch=np.zeros(1))[0]) for s in sources])


RESTART_FACTOR: dict[str, Callable[[Mapping[str, Any]], np.ndarray | float]] = {
    "MultiplicativeLR": _lambda_at_zero,
    "SWALR": lambda node: 1.0,
}
"""torch's recursive nodes whose SequentialLR restart keeps the lr the previous child left
(``_update_lr(0)`` without a closed form): after the milestone they behave as the standalone
node started from ``previous lr * factor``. Every other node restarts in its local time."""


# --- helpers ---------------------------------------------------------------------------------


def spec(schedule: Mapping[str, Any], lrs: list[float] | None = None) -> dict[str, Any]:
    groups = copy.deepcopy(GROUPS)
    if lrs is not None:
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = float(lr)
    return {"groups": groups, "schedule": schedule, "param_schedules": PARAM_SCHEDULES}


def compile_program(schedule: Mapping[str, Any], lrs: list[float] | None = None) -> Program:
    return Program(ScheduleSpec.model_validate(spec(schedule, lrs)))


def metric_stream(n: int) -> list[float]:
    """A loss that improves, then plateaus (so every plateau variant reduces a few times)."""
    return [max(1.0 - 0.04 * s, 0.5) for s in range(n)]


def observed_state(program: Program, n: int = N) -> dict[str, Any]:
    state = program.initial_state()
    for step, value in enumerate(metric_stream(n)):
        state, _ = program.observe(state, step, {METRIC: value})
    return state


Values = dict[str, dict[str, np.ndarray]]


def evaluate(program: Program, state: Mapping[str, Any] | None = None, n: int = N) -> Values:
    return program.evaluate(state or {}, 0, n)


@functools.cache
def _standalone(node_json: str, lrs: tuple[float, ...] | None) -> Values:
    values = evaluate(compile_program(json.loads(node_json), None if lrs is None else list(lrs)))
    for fields in values.values():
        for array in fields.values():
            array.setflags(write=False)  # shared by the cached callers
    return values


def standalone(node: Mapping[str, Any], lrs: list[float] | None = None) -> Values:
    """The node alone over [0, N) (memoised: every variant compares with it)."""
    return _standalone(json.dumps(node, sort_keys=True), None if lrs is None else tuple(lrs))


def is_metric(kind: str) -> bool:
    return bool(compile_program(EXAMPLES[kind]).metric_names)


def cycles_momentum(kind: str) -> bool:
    values = standalone(EXAMPLES[kind])
    return any(
        not np.all(values[g["name"]][MOMENTUM_FIELD[g["name"]]] == _base_momentum(g))
        for g in GROUPS
    )


def _base_momentum(group: Mapping[str, Any]) -> float:
    return float(group["momentum"] if "momentum" in group else group["betas"][0])


# --- the variants ----------------------------------------------------------------------------

VARIANTS = (
    "standalone",
    "sequential-after",
    "sequential-first",
    "chained",
    "chained-after-identity",
    "chained-before-identity",
    "join-after",
    "join-first",
    "epochs",
)


def build(variant: str, node: dict[str, Any]) -> dict[str, Any]:
    if variant == "standalone":
        return node
    if variant == "sequential-after":
        return {"type": "SequentialLR", "schedulers": [FILLER, node], "milestones": [M]}
    if variant == "sequential-first":
        return {"type": "SequentialLR", "schedulers": [node, FILLER], "milestones": [M]}
    if variant == "chained":
        return {"type": "ChainedScheduler", "schedulers": [node]}
    if variant == "chained-after-identity":
        return {"type": "ChainedScheduler", "schedulers": [IDENTITY, node]}
    if variant == "chained-before-identity":
        return {"type": "ChainedScheduler", "schedulers": [node, IDENTITY]}
    if variant == "join-after":
        return {"type": "optax.join_schedules", "schedules": [FILLER, node], "boundaries": [M]}
    if variant == "join-first":
        return {"type": "optax.join_schedules", "schedules": [node, FILLER], "boundaries": [M]}
    if variant == "epochs":
        return {"type": "Epochs", "steps_per_epoch": SPE, "schedule": node}
    raise AssertionError(variant)


def refusal(variant: str, kind: str) -> str | None:
    """Why the engine refuses ``kind`` in ``variant`` (a SpecError is asserted), or None."""
    if variant == "epochs" and is_metric(kind):
        return "metric-driven nodes react to reports at steps: refused inside Epochs"
    if kind == "LRRangeTest" and variant != "standalone":
        return "a range test is a run's whole schedule (or a group's): refused in compositions"
    return None


def expected(variant: str, kind: str) -> Values:
    """What the composite must give over steps [0, N), from standalone evaluations."""
    node = EXAMPLES[kind]
    alone = standalone(node)
    filler = standalone(FILLER)
    t = np.arange(N)
    if variant in ("standalone", "chained", "chained-after-identity", "chained-before-identity"):
        return alone
    if variant == "epochs":
        return {
            g: {f: v[t // SPE] if f in ("lr", MOMENTUM_FIELD[g]) else v for f, v in fields.items()}
            for g, fields in alone.items()
        }
    cyc = cycles_momentum(kind)
    out: Values = {g: {} for g in alone}
    for g in GROUPS:
        name = g["name"]
        mom = MOMENTUM_FIELD[name]
        lr_node, lr_fill, m_node = alone[name]["lr"], filler[name]["lr"], alone[name][mom]
        base_m = np.full(N, _base_momentum(g))
        if variant in ("sequential-after", "join-after"):
            node_lr = lr_node
            if variant == "sequential-after" and kind in RESTART_FACTOR:
                node_lr = _restarted(kind, [filler[h["name"]]["lr"][M - 1] for h in GROUPS])[name][
                    "lr"
                ]
            out[name]["lr"] = np.where(t < M, lr_fill, node_lr[np.maximum(t - M, 0)])
            if cyc:
                # Before the node runs: SequentialLR holds what the node's constructor wrote
                # (its step 0, torch builds every child first); join: the group's own value.
                lead = m_node[0] if variant == "sequential-after" else base_m
                out[name][mom] = np.where(t < M, lead, m_node[np.maximum(t - M, 0)])
            else:
                out[name][mom] = base_m
        else:  # the node first, then the filler in its own time; momentum held from M - 1
            out[name]["lr"] = np.where(t < M, lr_node, lr_fill[np.maximum(t - M, 0)])
            out[name][mom] = np.where(t < M, m_node, m_node[M - 1]) if cyc else base_m
        for extra in alone[name]:
            if extra not in ("lr", mom):
                out[name][extra] = alone[name][extra]
    return out


def _restarted(kind: str, previous: list[float]) -> Values:
    factor = np.broadcast_to(RESTART_FACTOR[kind](EXAMPLES[kind]), (len(GROUPS),))
    return standalone(EXAMPLES[kind], [float(x) for x in np.asarray(previous) * factor])


CASES = [(kind, variant) for kind in EXAMPLES for variant in VARIANTS]


def _case(kind: str, variant: str) -> Any:
    return pytest.param(kind, variant, id=f"{kind}-{variant}")


# --- the tests -------------------------------------------------------------------------------


def test_every_type_has_an_example() -> None:
    missing = sorted(set(NODE_TYPES) - set(EXAMPLES))
    assert not missing, f"add a valid example to EXAMPLES for the new node type(s) {missing}"
    unknown = sorted(set(EXAMPLES) - set(NODE_TYPES))
    assert not unknown, f"EXAMPLES names unregistered type(s) {unknown}"
    for kind, node in EXAMPLES.items():
        assert node["type"] == kind
        compile_program(node)  # valid for these groups


def _compile_or_refused(kind: str, variant: str) -> Program | None:
    schedule = build(variant, EXAMPLES[kind])
    reason = refusal(variant, kind)
    if reason is not None:
        with pytest.raises(SpecError):
            compile_program(schedule)
        return None
    return compile_program(schedule)


@pytest.mark.parametrize(("kind", "variant"), [_case(k, v) for k, v in CASES])
def test_lr_and_extras_survive(kind: str, variant: str) -> None:
    program = _compile_or_refused(kind, variant)
    if program is None:
        return
    got, want = evaluate(program), expected(variant, kind)
    for name, fields in want.items():
        assert set(got[name]) == set(fields), f"{name}: fields {set(got[name])} != {set(fields)}"
        for field, values in fields.items():
            if field in ("momentum", "beta1"):
                continue
            assert_matches(got[name][field], values, rtol=RTOL, what=f"{name}.{field}")


@pytest.mark.parametrize(("kind", "variant"), [_case(k, v) for k, v in CASES])
def test_momentum_survives(kind: str, variant: str) -> None:
    program = _compile_or_refused(kind, variant)
    if program is None:
        return
    got, want = evaluate(program), expected(variant, kind)
    for name, field in MOMENTUM_FIELD.items():
        assert_matches(got[name][field], want[name][field], rtol=RTOL, what=f"{name}.{field}")


WINDOWS = [(0, 1), (1, 1), (M - 1, 1), (M, 1), (M + 1, 1), (N - 1, 1), (M - 2, 5), (7, 50),
           (M, N - M), (0, N), (33, 1), (90, 30)]  # fmt: skip


@pytest.mark.parametrize(("kind", "variant"), [_case(k, v) for k, v in CASES])
def test_windows_equal_slices_of_a_full_evaluation(kind: str, variant: str) -> None:
    program = _compile_or_refused(kind, variant)
    if program is None:
        return
    states: list[dict[str, Any]] = [{}]
    if program.metric_names:
        states.append(observed_state(program))
    # A freshly compiled program answers the windows first (no memo from a full evaluation
    # to lean on), then the program that has already evaluated everything.
    fresh = compile_program(build(variant, EXAMPLES[kind]))
    for state in states:
        windows = {w: fresh.evaluate(state, *w) for w in WINDOWS}
        full = evaluate(program, state)
        for (start, count), window in [
            *windows.items(),
            *((w, program.evaluate(state, *w)) for w in WINDOWS),
        ]:
            for name, fields in full.items():
                for field, values in fields.items():
                    assert_matches(
                        window[name][field],
                        values[start : start + count],
                        rtol=RTOL,
                        what=f"{name}.{field} window ({start}, {count}) state={bool(state)}",
                    )
