"""Shared by the framework tests: the deterministic metric stream and the server's record.

Every test trains a real model in a real framework against a live server and compares the
rates applied at every step with (a) the server's own record of the run and (b) the same
training with the framework's (or torch's) own schedulers for the same spec.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import lrserve


def val_loss(i: int) -> float:
    """The validation loss of the ``i``-th evaluation: improves, then stalls every other time.

    With ``patience=0`` every odd evaluation after the second one is a plateau reduction,
    so a schedule fed this stream reduces several times in a short run.
    """
    return 1.0 - 0.05 * i + (0.08 if i % 2 else 0.0)


def server_lrs(url: str, run: str, count: int) -> dict[int, list[float]]:
    """The server's record of a run: ``{step: [lr of every group]}`` for ``0 .. count-1``."""
    with lrserve.Client(url) as client:
        w = client.get_lr_window(run, 0, count)
    assert w.values is not None
    cols = [g["lr"] for g in w.values.values()]
    return {s: [float(c[s]) for c in cols] for s in range(count)}


def reported_steps(url: str, run: str) -> list[int]:
    """The steps of the run's completed reports, from its event log."""
    with lrserve.Client(url) as client:
        events = client.get_events(run)["events"]
    return sorted(int(e["step"]) for e in events if e["type"] == "report_completed")


def assert_rates_equal(
    actual: Mapping[int, Sequence[float]],
    expected: Mapping[int, Sequence[float]],
    what: str,
    rel: float = 1e-12,
) -> None:
    """Same steps, and at every step the same rate in every group (to ``rel``)."""
    assert sorted(actual) == sorted(expected), f"{what}: steps differ"
    for s in sorted(actual):
        a, e = actual[s], expected[s]
        assert len(a) == len(e), f"{what}: step {s}: {a} vs {e}"
        for x, y in zip(a, e, strict=True):
            assert math.isclose(float(x), float(y), rel_tol=rel, abs_tol=1e-300), (
                f"{what}: step {s}: {list(a)} != {list(e)}"
            )


def reductions(rates: Mapping[int, Sequence[float]], group: int = 0) -> int:
    """How many times a group's rate dropped by more than a cosine step would (a reduction)."""
    steps = sorted(rates)
    return sum(1 for a, b in itertools.pairwise(steps) if rates[b][group] < 0.75 * rates[a][group])
