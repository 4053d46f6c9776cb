"""Keras 3 (torch backend): RemoteSchedule + LRServeCallback against Keras' own schedules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import lrserve.keras
import numpy as np

from tests.sdk.frameworks.support import (
    assert_rates_equal,
    reductions,
    reported_steps,
    server_lrs,
    val_loss,
)

EPOCHS = 6
BATCHES = 4  # per epoch
STEPS = EPOCHS * BATCHES
# Keras keeps the rate in a float32 variable; lrserve serves float64.
REL = 1e-6


class Record(keras.callbacks.Callback):
    """The rate every batch trains with, by optimizer step; and a deterministic val_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: dict[int, list[float]] = {}

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        opt = self.model.optimizer
        self.rates[int(opt.iterations.numpy())] = [float(opt.learning_rate)]

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # Replaces the model's val_loss (first in the list, so the callbacks after it see this).
        logs["val_loss"] = val_loss(epoch)


def fit(
    lr: Any, callbacks: list[Any], epochs: int = EPOCHS, model: Any = None, initial_epoch: int = 0
) -> Record:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCHES, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    if model is None:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9), loss="mse")
    rec = Record()
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=epochs,
        initial_epoch=initial_epoch,
        validation_data=(x, y),
        callbacks=[rec, *callbacks],
        verbose=0,
        shuffle=False,
    )
    rec.model_ = model
    return rec


def test_schedule_equals_keras_cosine_decay(live_server: Any) -> None:
    own = keras.optimizers.schedules.CosineDecay(
        0.01, decay_steps=16, alpha=0.1, warmup_target=0.1, warmup_steps=4
    )
    node = {k: v for k, v in own.get_config().items() if k != "name"}
    expected = fit(own, []).rates
    sched = lrserve.keras.RemoteSchedule(
        "keras-cos",
        live_server.url,
        {"schedule": {"type": "keras.CosineDecay", **node}},
        lr=0.01,
        poll_interval=0.2,
    )
    got = fit(sched, [lrserve.keras.LRServeCallback(sched, monitor="val_loss")]).rates
    sched.close()
    assert_rates_equal(got, expected, "lrserve vs Keras' CosineDecay", rel=REL)
    assert_rates_equal(got, server_lrs(live_server.url, "keras-cos", STEPS), "vs server", rel=REL)
    assert reported_steps(live_server.url, "keras-cos") == [
        BATCHES * (e + 1) - 1 for e in range(EPOCHS)
    ]


PLATEAU = {"type": "keras.ReduceLROnPlateau", "monitor": "val_loss", "factor": 0.5, "patience": 0}


def test_plateau_equals_keras_reduce_lr_on_plateau_and_resume(
    live_server: Any, tmp_path: Path
) -> None:
    expected = fit(
        0.1, [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0)]
    ).rates
    assert reductions(expected) >= 2, "Keras' own plateau must reduce in this run"
    spec = {"schedule": PLATEAU}
    sched = lrserve.keras.RemoteSchedule(
        "keras-pl", live_server.url, spec, lr=0.1, poll_interval=0.2
    )
    half = EPOCHS // 2
    first = fit(sched, [lrserve.keras.LRServeCallback(sched, monitor="val_loss")], epochs=half)
    path = tmp_path / "half.keras"
    first.model_.save(path)
    sched.close()
    # A new process would do this: load the model (the schedule reattaches to the run by id),
    # continue from the next epoch; optimizer.iterations comes back with the model.
    model = keras.models.load_model(path)
    again = model.optimizer._learning_rate
    assert isinstance(again, lrserve.keras.RemoteSchedule)
    second = fit(
        None,
        [lrserve.keras.LRServeCallback(again, monitor="val_loss")],
        epochs=EPOCHS,
        model=model,
        initial_epoch=half,
    )
    again.close()
    assert sorted(second.rates) == list(range(half * BATCHES, STEPS))
    got = {**first.rates, **second.rates}
    assert_rates_equal(got, expected, "lrserve vs Keras' ReduceLROnPlateau", rel=REL)
    assert_rates_equal(got, server_lrs(live_server.url, "keras-pl", STEPS), "vs server", rel=REL)
