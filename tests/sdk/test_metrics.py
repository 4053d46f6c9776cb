"""Metric values in the SDK: what a report accepts, its wire form, and the rank aggregation.

The SDK may not import the server (it must work with only httpx installed), so chief mode
carries its own copy of the server's aggregation; these tests hold the two together on
generated inputs: ``None``, NaN, ±infinity, signed zeros, huge values, metric names that
only some ranks report, every mode.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any

import lrserve
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lrserve._metrics import aggregate, encode_metric, metric_number, metric_values

from tests.sdk.torch_support import server_aggregate

MODES = ("mean", "min", "max", "rank0")


def _bits(x: float | None) -> Any:
    """Equal for identical results: NaN equals NaN, -0.0 differs from 0.0."""
    if x is None:
        return None
    return "nan" if math.isnan(x) else struct.pack("<d", x)


def _assert_same(sdk: Mapping[str, Any], server: Mapping[str, Any], where: Any) -> None:
    assert list(sdk) == list(server), where
    assert {k: _bits(v) for k, v in sdk.items()} == {k: _bits(v) for k, v in server.items()}, (
        where,
        sdk,
        server,
    )
    assert all(v is None or type(v) is float for v in sdk.values()), sdk


VALUES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 1.7e308, -1.7e308, 5e-324]),
)
RANKS = st.lists(
    st.dictionaries(st.sampled_from(["loss", "acc", "val_loss", "x"]), VALUES, max_size=4),
    min_size=1,
    max_size=8,
)


@settings(max_examples=1500, deadline=None)
@given(ranks=RANKS, how=st.sampled_from(MODES))
@example(ranks=[{"loss": 1.0}, {"loss": math.nan}], how="mean")  # issue 7: the SDK said 1.0
@example(ranks=[{"loss": 1.0}, {"loss": math.nan}], how="min")
@example(ranks=[{"loss": 1.0}, {"loss": math.inf}], how="mean")
@example(ranks=[{"loss": 1.0}, {"loss": None}], how="mean")
@example(ranks=[{"loss": None}, {"loss": None}], how="max")
@example(ranks=[{"loss": 1.0}, {"acc": 0.5, "loss": 3.0}], how="mean")  # a name rank 0 lacks
@example(ranks=[{"loss": None}, {"loss": 2.0}], how="rank0")
@example(ranks=[{"loss": math.inf}, {"loss": -math.inf}], how="mean")
@example(ranks=[{"loss": 0.0}, {"loss": -0.0}], how="min")
def test_aggregate_is_the_servers(ranks: list[dict[str, float | None]], how: str) -> None:
    sdk = aggregate(ranks, how)
    try:
        server = server_aggregate(list(enumerate(ranks)), how)
    except OverflowError:
        # The server's math.fsum overflows on finite values whose sum is beyond a float
        # (a 500 there); the SDK gives their exact mean rather than raise into training.
        # Every other metric of the same report must still be the server's.
        assert how == "mean"
        for name, value in sdk.items():
            alone = [{name: r[name]} if name in r else {} for r in ranks]
            try:
                _assert_same({name: value}, server_aggregate(list(enumerate(alone)), how), name)
            except OverflowError:
                col = [r[name] for r in ranks if r.get(name) is not None]
                exact = sum(map(Fraction, col), Fraction(0)) / len(col)  # type: ignore[arg-type]
                assert value == float(exact)
        return
    _assert_same(sdk, server, (ranks, how))


def test_nan_on_one_rank_is_nan_in_every_mode_but_rank0() -> None:
    ranks = [{"loss": 1.0}, {"loss": math.nan}]
    for how in ("mean", "min", "max"):
        assert math.isnan(aggregate(ranks, how)["loss"])  # type: ignore[arg-type]
    assert aggregate(ranks, "rank0") == {"loss": 1.0}
    assert aggregate([{"loss": None}, {"loss": 2.0}], "mean") == {"loss": 2.0}
    assert aggregate([{"loss": None}, {"acc": 2.0}], "mean") == {"loss": None, "acc": 2.0}


def test_overflowing_mean_is_exact_not_an_error() -> None:
    assert aggregate([{"x": 1.7e308}, {"x": 1.7e308}], "mean") == {"x": 1.7e308}
    assert aggregate([{"x": 1.7e308}, {"x": 1.7e308}, {"x": -1.7e308}], "mean") == {
        "x": float(Fraction(1.7e308) / 3)
    }


# -- accepted values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (0.5, 0.5),
        (3, 3.0),
        (np.float32(0.25), 0.25),
        (np.float64(-2.5), -2.5),
        (np.int64(7), 7.0),
        (np.array(0.125), 0.125),
        (torch.tensor(0.75), 0.75),
        (torch.tensor([1.5], dtype=torch.float64), 1.5),
        (torch.tensor(2.0, requires_grad=True) * 2, 4.0),
        (torch.tensor(3, dtype=torch.int32), 3.0),
        (Decimal("0.5"), 0.5),
        (Fraction(1, 4), 0.25),
        ("NaN", math.nan),
        ("Infinity", math.inf),
        ("-Infinity", -math.inf),
        (torch.tensor(math.inf), math.inf),
        (np.float64("nan"), math.nan),
    ],
    ids=repr,
)
def test_metric_number_accepts_numbers_none_and_scalars(value: Any, expected: float | None) -> None:
    got = metric_number("loss", value)
    assert _bits(got) == _bits(expected)
    assert got is None or type(got) is float


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "nan",  # only the wire's exact spellings
        True,
        np.bool_(False),
        torch.tensor(True),
        object(),
        [1.0],
        {"v": 1.0},
        1j,
        torch.tensor([1.0, 2.0]),
        np.array([1.0, 2.0]),
        torch.zeros(0),
        10**400,
    ],
    ids=lambda v: type(v).__name__ + ":" + repr(v)[:20],
)
def test_other_values_raise_naming_the_metric(value: Any) -> None:
    with pytest.raises(lrserve.UsageError, match="metric 'val_loss'") as info:
        metric_number("val_loss", value)
    assert isinstance(info.value, ValueError)


def test_metric_values_and_the_wire_form() -> None:
    values = metric_values({"a": None, "b": np.float32(0.5), "c": torch.tensor(-math.inf)})
    assert values == {"a": None, "b": 0.5, "c": -math.inf}
    with pytest.raises(lrserve.UsageError, match="mapping"):
        metric_values([("a", 1.0)])  # type: ignore[arg-type]
    wire = {k: encode_metric(k, v) for k, v in [("n", math.nan), ("i", math.inf), ("m", -math.inf)]}
    assert wire == {"n": "NaN", "i": "Infinity", "m": "-Infinity"}
    assert encode_metric("z", None) is None and encode_metric("t", torch.tensor(0.5)) == 0.5
    json.dumps(wire, allow_nan=False)  # valid JSON: no NaN literals
