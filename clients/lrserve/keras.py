"""Keras 3 integration: a ``LearningRateSchedule`` fed by an lrserve run, and a reporting callback.

>>> feed = lrserve.keras.RemoteSchedule("exp-42", spec=spec, lr=1e-3)   # doctest: +SKIP
>>> model.compile(optimizer=keras.optimizers.SGD(learning_rate=feed), loss="mse")  # doctest: +SKIP
>>> model.fit(x, y, validation_data=(vx, vy), epochs=10,                 # doctest: +SKIP
...           callbacks=[lrserve.keras.LRServeCallback(feed, monitor="val_loss")])

The optimizer asks the schedule for the rate of its step (``optimizer.iterations``) at every
update; the schedule answers from a prefetched window (:class:`lrserve._feed.RateFeed`), never
with a request per step. It reads the step as a Python integer, so it works where the
optimizer step runs eagerly: the torch backend (tested), and JAX or TensorFlow with
``jit_compile=False`` / ``run_eagerly=True``. See docs/frameworks.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

try:
    import keras
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    if exc.name is None or exc.name.split(".")[0] != "keras":
        raise
    raise ModuleNotFoundError(
        "lrserve.keras needs Keras 3, which is not installed here: pip install 'lrserve[keras]' "
        "(and a backend: torch, jax or tensorflow)",
        name="keras",
    ) from exc

from ._feed import RateFeed
from ._frameworks import metric_names, pick_metrics
from ._types import ReportResult

__all__ = ["LRServeCallback", "RemoteSchedule"]


def _as_int(step: Any) -> int:
    value = getattr(step, "value", step)  # a keras.Variable: its backend tensor
    if hasattr(value, "item"):
        return int(value.item())
    return int(keras.ops.convert_to_numpy(value))


@keras.saving.register_keras_serializable(package="lrserve")
class RemoteSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A Keras ``LearningRateSchedule`` whose value at step ``N`` is the run's value at ``N``.

    Arguments are those of :class:`lrserve._feed.RateFeed` (``run``, ``url``, ``spec``,
    ``lr``, ``group``, ...), or ``feed=`` an existing one. Saved with the model
    (``get_config``), it reattaches to the same run by id and URL when loaded, so a
    resumed ``fit`` (``optimizer.iterations`` restored) continues on the run's values.
    """

    def __init__(
        self,
        run: str | None = None,
        url: str | None = None,
        spec: Mapping[str, Any] | None = None,
        *,
        feed: RateFeed | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if feed is None:
            if run is None:
                raise TypeError("RemoteSchedule needs run= (or feed=)")
            feed = RateFeed(run, url, spec, **kwargs)
        self.feed = feed
        self._url = url

    def __call__(self, step: Any) -> float:
        return self.feed.lr(_as_int(step))

    def report(self, metrics: Mapping[str, Any], step: int) -> ReportResult | None:
        """Report ``metrics`` for ``step``; a decision applies from ``step + 1``."""
        return self.feed.report(metrics, step)

    def get_config(self) -> dict[str, Any]:
        # Only what reattaching needs: the run keeps the schedule and its state.
        return {"run": self.feed.run_id, "url": self._url or self.feed._client.url}

    def close(self) -> None:
        """Stop the background refresher (kept reports are delivered if possible)."""
        self.feed.close()


class LRServeCallback(keras.callbacks.Callback):
    """Report ``logs`` metrics to a :class:`RemoteSchedule` at the end of every epoch.

    The report is for the step the last batch trained with (``optimizer.iterations - 1``),
    so a decision applies from the next batch, as Keras' own ``ReduceLROnPlateau`` does.

    Args:
        schedule: the schedule of the model's optimizer.
        monitor: the metric name(s) in ``logs`` (``"val_loss"``); ``None``: every number.
    """

    def __init__(self, schedule: RemoteSchedule, monitor: str | Sequence[str] | None = None):
        super().__init__()
        self.schedule = schedule
        self.monitor = metric_names(monitor)
        #: The server's answer to the last report.
        self.last_result: ReportResult | None = None

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Report the epoch's metrics (after validation, which Keras runs before this)."""
        picked = pick_metrics(logs or {}, self.monitor)
        if not picked:
            return
        step = max(_as_int(self.model.optimizer.iterations) - 1, 0)
        self.last_result = self.schedule.report(picked, step)
