"""optax on JAX (CPU): RemoteSchedule in inject_hyperparams under jit, reports from the loop."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import lrserve.optax
import numpy as np
import optax
import torch

from tests.sdk.frameworks.support import (
    assert_rates_equal,
    reductions,
    reported_steps,
    server_lrs,
    val_loss,
)

STEPS = 40
REPORT_EVERY = 4
REL = 1e-6  # optax hands the rate over as float32


def loss_fn(params: Any, x: jax.Array) -> jax.Array:
    return jnp.mean((x @ params["w"] + params["b"] - x.sum(1, keepdims=True)) ** 2)


def train(
    schedule: Any,
    start: int = 0,
    stop: int = STEPS,
    state: Any = None,
    report: Any = None,
) -> tuple[dict[int, list[float]], Any]:
    """A jitted SGD loop; returns the rate each update used (by step) and (params, opt state)."""
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(loss_fn)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if state is None:
        params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
        state = (params, tx.init(params))
    params, opt_state = state
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), dtype=jnp.float32)
    rates: dict[int, list[float]] = {}
    for s in range(start, stop):
        params, opt_state = step(params, opt_state, x)
        # inject_hyperparams keeps the value this update used.
        rates[s] = [float(opt_state.hyperparams["learning_rate"])]
        if report is not None and (s + 1) % REPORT_EVERY == 0:
            report({"val_loss": jnp.asarray(val_loss(s // REPORT_EVERY))}, s)
    return rates, (params, opt_state)


def test_schedule_equals_optax_warmup_cosine(live_server: Any) -> None:
    args = {
        "init_value": 0.0,
        "peak_value": 0.1,
        "warmup_steps": 5,
        "decay_steps": 30,
        "end_value": 1e-3,
    }
    expected, _ = train(optax.warmup_cosine_decay_schedule(**args))
    spec = {"schedule": {"type": "optax.warmup_cosine_decay_schedule", **args}}
    with lrserve.optax.RemoteSchedule(
        "optax-cos", live_server.url, spec, lr=0.1, window=16, poll_interval=0.2
    ) as sched:
        got, _ = train(sched)
    # optax computes its cosine in float32 (about 1e-6 off at small values); lrserve in float64.
    assert_rates_equal(got, expected, "lrserve vs optax's schedule", rel=1e-5)
    assert_rates_equal(got, server_lrs(live_server.url, "optax-cos", STEPS), "vs server", rel=REL)


def torch_plateau_rates() -> dict[int, list[float]]:
    """torch's ReduceLROnPlateau fed the same reports, after the step they are for."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    rates = {}
    for s in range(STEPS):
        rates[s] = [float(opt.param_groups[0]["lr"])]
        opt.step()
        if (s + 1) % REPORT_EVERY == 0:
            plateau.step(float(np.float32(val_loss(s // REPORT_EVERY))))
    return rates


def test_reports_from_a_jax_loop_and_resume(live_server: Any, tmp_path: Path) -> None:
    expected = torch_plateau_rates()
    assert reductions(expected) >= 2, "torch's plateau must reduce in this run"
    spec = {
        "schedule": {
            "type": "ReduceLROnPlateau",
            "metric": "val_loss",
            "factor": 0.5,
            "patience": 0,
        }
    }
    half = STEPS // 2
    with lrserve.optax.RemoteSchedule(
        "optax-pl", live_server.url, spec, lr=0.1, poll_interval=0.2
    ) as sched:
        first, state = train(sched, 0, half, report=sched.report)
    ckpt = tmp_path / "state.pkl"
    ckpt.write_bytes(pickle.dumps(jax.device_get(state)))
    # Resume: a new schedule attached to the run (no spec), the optimizer state from disk;
    # its count carries the step.
    with lrserve.optax.RemoteSchedule("optax-pl", live_server.url) as again:
        second, _ = train(
            again, half, STEPS, state=pickle.loads(ckpt.read_bytes()), report=again.report
        )
    got = {**first, **second}
    assert_rates_equal(got, expected, "lrserve under optax vs torch's ReduceLROnPlateau", rel=REL)
    assert_rates_equal(got, server_lrs(live_server.url, "optax-pl", STEPS), "vs server", rel=REL)
    assert reported_steps(live_server.url, "optax-pl") == list(
        range(REPORT_EVERY - 1, STEPS, REPORT_EVERY)
    )
