"""optax / JAX integration: a schedule for ``optax.inject_hyperparams`` fed by an lrserve run.

>>> sched = lrserve.optax.RemoteSchedule("exp-42", spec=spec, lr=1e-3)        # doctest: +SKIP
>>> tx = optax.inject_hyperparams(optax.adamw)(learning_rate=sched)          # doctest: +SKIP
>>> ...                                     # a jitted train step: tx.update(grads, state, params)
>>> sched.report({"val_loss": float(loss)}, step=step)                       # doctest: +SKIP

Calling the schedule with optax's ``count`` returns the run's value at that step. Inside
``jax.jit`` the step is a tracer, so the value is read on the host through
``jax.pure_callback`` from the prefetched window (no request per step; the window is
refreshed in the background, see :class:`lrserve._feed.RateFeed`). Report the metrics of
step ``N`` (the step whose update was just applied; ``int(state.count) - 1`` after the
update) and a decision applies from ``N + 1``. See docs/frameworks.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import jax
    import jax.numpy as jnp
    import numpy as np
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    if exc.name is None or exc.name.split(".")[0] not in ("jax", "jaxlib", "numpy"):
        raise
    raise ModuleNotFoundError(
        "lrserve.optax needs JAX (and optax to use it with), which is not installed here: "
        "pip install 'lrserve[jax]'",
        name=exc.name,
    ) from exc

from ._feed import RateFeed
from ._types import ReportResult

__all__ = ["RemoteSchedule"]


class RemoteSchedule:
    """An optax schedule (``count -> learning rate``) whose values come from an lrserve run.

    Arguments are those of :class:`lrserve._feed.RateFeed` (``run``, ``url``, ``spec``,
    ``lr``, ``group``, ...), or ``feed=`` an existing one. ``dtype`` is the dtype of the
    value handed to optax (default float32, optax's own).
    """

    def __init__(
        self,
        run: str | None = None,
        url: str | None = None,
        spec: Mapping[str, Any] | None = None,
        *,
        feed: RateFeed | None = None,
        dtype: Any = jnp.float32,
        **kwargs: Any,
    ) -> None:
        if feed is None:
            if run is None:
                raise TypeError("RemoteSchedule needs run= (or feed=)")
            feed = RateFeed(run, url, spec, **kwargs)
        self.feed = feed
        self.dtype = np.dtype(dtype)
        self._shape = jax.ShapeDtypeStruct((), self.dtype)

    def _host(self, count: Any) -> np.ndarray:
        return np.asarray(self.feed.lr(int(count)), dtype=self.dtype)

    def __call__(self, count: Any) -> Any:
        """The value at step ``count`` (a Python int, an array, or a tracer under ``jit``)."""
        if isinstance(count, int):
            return jnp.asarray(self._host(count))
        # Read on the host: under jit the step is only known when the step runs.
        return jax.pure_callback(self._host, self._shape, count)

    def report(self, metrics: Mapping[str, Any], step: int) -> ReportResult | None:
        """Report ``metrics`` (numbers or one-element arrays) for ``step``.

        A decision applies from ``step + 1``: the next update's ``count`` reads it.
        """
        return self.feed.report({k: _scalar(v) for k, v in metrics.items()}, int(step))

    def close(self) -> None:
        """Stop the background refresher (kept reports are delivered if possible)."""
        self.feed.close()

    def __enter__(self) -> RemoteSchedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scalar(value: Any) -> Any:
    # jax arrays are not numbers to lrserve's metric check; one-element ones become floats.
    if isinstance(value, jax.Array):
        return float(np.asarray(value).reshape(()))
    return value
