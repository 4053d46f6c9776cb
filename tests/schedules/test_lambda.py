"""LambdaLR and MultiplicativeLR against torch's own schedulers.

torch is given real Python lambdas built by the test from the *same* expression strings
(``eval`` of the string with the math functions in scope is fine in a test); the engine
parses them with its own safe evaluator. Values must agree to 1e-12 relative over 10,000+
steps, for one expression or a per-group list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.schedules.base import CompileContext, GroupBase, SpecError
from service.schedules.spec import schedule_adapter
from service.schedules.torch_lambda import MULTIPLICATIVE_EXACT_STEPS
from tests.schedules.conftest import PY_NAMESPACE, TORCH_BUILDERS, assert_matches, torch_values


def python_lambda(source: str) -> Callable[[int], float]:
    return eval(f"lambda epoch: {source}", PY_NAMESPACE)  # a test building torch's oracle


def _build_lambda(spec: Mapping[str, Any], opt: torch.optim.Optimizer) -> Any:
    fns: Any = spec["lr_lambda"]
    fns = [python_lambda(s) for s in fns] if isinstance(fns, list) else python_lambda(fns)
    return getattr(torch.optim.lr_scheduler, spec["type"])(opt, fns)


TORCH_BUILDERS.setdefault("LambdaLR", _build_lambda)
TORCH_BUILDERS.setdefault("MultiplicativeLR", _build_lambda)

N_STEPS = 10_001


def ours(spec: dict[str, Any], lrs: list[float], t: np.ndarray) -> np.ndarray:
    base = GroupBase(
        names=tuple(f"g{i}" for i in range(len(lrs))),
        lr=np.asarray(lrs, dtype=np.float64),
        momentum=np.full(len(lrs), np.nan),
    )
    curve = schedule_adapter.validate_python(spec).compile(CompileContext(base=base))
    return curve.lr(np.asarray(t, dtype=np.float64), {})


_a = st.sampled_from(["0.999", "0.95", "0.5", "0.99995", "1.0001"])
_n = st.integers(1, 5000).map(str)
LAMBDA_TEMPLATES = st.one_of(
    _a.map(lambda a: f"{a} ** epoch"),
    st.tuples(_n, _n).map(lambda p: f"max(0.01, 1 - epoch / ({p[0]} + {p[1]}))"),
    _n.map(lambda w: f"1 / sqrt(max(epoch, {w}) / {w})"),
    st.tuples(_n, _n).map(
        lambda p: (
            f"(epoch + 1) / {p[0]} if epoch < {p[0]} "
            f"else 0.5 * (1 + cos(pi * (epoch - {p[0]}) / {p[1]}))"
        )
    ),
    st.tuples(_a, _n).map(lambda p: f"{p[0]} ** floor(epoch / {p[1]})"),
    st.tuples(_n, _n).map(lambda p: f"exp(-epoch / {p[0]}) + epoch % {p[1]} / 1e5"),
)
MULT_TEMPLATES = st.one_of(
    _a,
    _n.map(lambda c: f"1 - 0.5 / (epoch + {c})"),
    st.tuples(_a, _n).map(lambda p: f"{p[0]} if epoch % {p[1]} != 0 else 1.001"),
    _n.map(lambda k: f"min(1.0001, 0.9995 + epoch / ({k} * 1e6))"),
)
_lrs = st.lists(st.sampled_from([1.0, 0.1, 3e-4, 2.5]), min_size=1, max_size=3)


@pytest.mark.slow
@given(st.data(), _lrs, st.sampled_from(["LambdaLR", "MultiplicativeLR"]))
def test_matches_torch_over_10000_steps(data: st.DataObject, lrs: list[float], kind: str) -> None:
    templates = LAMBDA_TEMPLATES if kind == "LambdaLR" else MULT_TEMPLATES
    if data.draw(st.booleans(), label="per_group"):
        expr: Any = [data.draw(templates) for _ in lrs]
    else:
        expr = data.draw(templates)
    spec = {"type": kind, "lr_lambda": expr}
    theirs, _ = torch_values(spec, lrs, N_STEPS)
    t = np.arange(N_STEPS)
    assert_matches(ours(spec, lrs, t), theirs)
    # Any window, in any order, gives the same values (MultiplicativeLR's cache included).
    window = np.array([9_999, 3, 5_000, 0, 10_000, 4_999])
    assert_matches(ours(spec, lrs, window), theirs[:, window])


def test_notes_vectors() -> None:
    t = np.arange(4)
    assert_matches(
        ours({"type": "LambdaLR", "lr_lambda": "0.5 ** epoch"}, [1.0], t), [[1, 0.5, 0.25, 0.125]]
    )
    assert_matches(
        ours({"type": "MultiplicativeLR", "lr_lambda": "0.5"}, [1.0], t), [[1, 0.5, 0.25, 0.125]]
    )


def test_multiplicative_far_steps_use_checkpoints_consistently() -> None:
    spec = {"type": "MultiplicativeLR", "lr_lambda": "0.9999999 if epoch % 2 == 0 else 1.00000005"}
    far = np.array([300_000.0, 200_001.0, 1.0])
    lr_far = ours(spec, [1.0], far)
    lr = 1.0
    expected = {}
    for k in range(1, 300_001):
        lr *= 0.9999999 if k % 2 == 0 else 1.00000005
        if k in (1, 200_001, 300_000):
            expected[k] = lr
    assert_matches(lr_far, [[expected[300_000], expected[200_001], expected[1]]], rtol=0)


def test_multiplicative_constant_beyond_exact_range() -> None:
    spec = {"type": "MultiplicativeLR", "lr_lambda": "0.5"}
    t = np.array([MULTIPLICATIVE_EXACT_STEPS + 10.0])
    # 0.5 ** large underflows to exactly 0 either way: what matters is that it is cheap
    # and finite (no 2**26-step scan beyond the bound).
    assert ours(spec, [1.0], t)[0, 0] == 0.0


def test_per_group_list_must_match_groups() -> None:
    node = schedule_adapter.validate_python({"type": "LambdaLR", "lr_lambda": ["1", "0.5"]})
    base = GroupBase(names=("a",), lr=np.ones(1), momentum=np.full(1, np.nan))
    with pytest.raises(SpecError, match="2 expressions but the run has 1"):
        node.compile(CompileContext(base=base))


def test_multiplicative_first_evaluated_at_epoch_one() -> None:
    """torch never calls MultiplicativeLR's lambda at epoch 0, so 1/epoch is fine there."""
    spec = {"type": "MultiplicativeLR", "lr_lambda": "1 / epoch"}
    theirs, _ = torch_values(spec, [1.0], 6)
    assert_matches(ours(spec, [1.0], np.arange(6)), theirs)
