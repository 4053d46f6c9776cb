"""Safe lr_lambda expressions: what is accepted, what is refused and why, and that values
agree with Python evaluating the same string (the grammar is a subset of Python's)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schedules.expr import MAX_LENGTH, ExprError, parse
from service.schedules.torch_lambda import LambdaLR
from tests.schedules.conftest import PY_NAMESPACE


def python_value(source: str, epoch: int) -> float:
    """The test's oracle: Python itself evaluating the string (fine in a test)."""
    return float(eval(source, PY_NAMESPACE, {"epoch": epoch}))


GOOD = [
    "0.95 ** epoch",
    "1",
    "min(1.0, (epoch + 1) / 500)",
    "max(0.1, 1 - epoch / 1000, 0.05)",
    "0.5 * (1 + cos(pi * epoch / 100))",
    "epoch / 10 if epoch < 10 else 0.99 ** (epoch - 10)",
    "1 if 0 <= epoch < 5 else 0.1",
    "floor(epoch / 30) + 1",
    "ceil(epoch / 7) % 3 + 1",
    "epoch // 30 * 0.1 + 1",
    "sqrt(epoch + 1)",
    "exp(-epoch / 50)",
    "log(epoch + e)",
    "abs(sin(epoch / 10))",
    "-(-epoch) ** 2 / 1e4 + 1",
    "1 / sqrt(max(epoch, 1))",
]


@pytest.mark.parametrize("source", GOOD)
def test_values_agree_with_python(source: str) -> None:
    expr = parse(source)
    epochs = np.arange(0, 2000, dtype=np.float64)
    ours = expr(epoch=epochs)
    theirs = np.array([python_value(source, int(k)) for k in epochs])
    np.testing.assert_allclose(ours, theirs, rtol=1e-14, atol=0)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.one_of(
            st.just("epoch"),
            st.integers(0, 9).map(str),
            st.sampled_from(["0.5", "1.25", "pi", "e"]),
        ),
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(
                lambda p: f"({p[0]} {p[1]} {p[2]})"
            ),
            st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(
                lambda p: f"{p[0]}({p[1]}, {p[2]})"
            ),
            inner.map(lambda x: f"abs({x})"),
            inner.map(lambda x: f"floor({x})"),
        ),
        max_leaves=12,
    )
)
def test_random_expressions_agree_with_python(source: str) -> None:
    try:
        expr = parse(source)
    except ExprError as exc:
        assert "negative" in str(exc)  # the only reason a grammar-built string is refused
        return
    for k in (0, 1, 7, 100, 12345):
        assert expr(epoch=np.array([float(k)]))[0] == pytest.approx(
            python_value(source, k), rel=1e-13, abs=1e-300
        )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("__import__('os').system('true')", "method calls are not allowed"),
        ("__import__", "unknown name '__import__'"),
        ("epoch.__class__", "attribute access"),
        ("(1).__class__.__bases__", "attribute access"),
        ("().__class__", "not allowed in an expression"),
        ("lambda: 1", "lambdas"),
        ("[x for x in range(3)]", "comprehensions"),
        ("sum(x for x in [1])", "function 'sum' is not allowed"),
        ("open('/etc/passwd')", "function 'open' is not allowed"),
        ("eval('1')", "function 'eval' is not allowed"),
        ("exec", "unknown name 'exec'"),
        ("globals()", "function 'globals' is not allowed"),
        ("epoch[0]", "subscripts"),
        ("(y := 1)", "assignment expressions"),
        ("f'{epoch}'", "f-strings"),
        ("'a' * 10", "only numbers are allowed"),
        ("b'x'", "only numbers are allowed"),
        ("1j", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("epoch and 1", "'and'/'or'"),
        ("not epoch", "operator 'not' is not allowed"),
        ("~epoch", "operator '~' is not allowed"),
        ("epoch << 2", "operator '<<' is not allowed"),
        ("epoch @ epoch", "operator '@' is not allowed"),
        ("epoch < 2", "only allowed as the condition"),
        ("1 if epoch else 2", "must be a comparison"),
        ("1 if epoch in (1, 2) else 2", "comparison 'in' is not allowed"),
        ("min(*[1, 2])", "starred"),
        ("min(1, key=abs)", "no keyword arguments"),
        ("sqrt(1, 2)", "exactly one argument"),
        ("max(epoch)", "at least two arguments"),
        ("sqrt", "must be called"),
        ("math.sqrt(epoch)", "method calls are not allowed"),
        ("x", "unknown name 'x'"),
        ("2 ** 10 ** 10", "exponent 1e+10 is too large"),
        ("9 ** 9 ** 9 ** 9", "too large"),
        ("epoch ** 1e100", "too large"),
        ("10 ** 400", "overflows"),
        ("1e999", "overflows"),
        ("1" + "0" * 400, "number is too large"),
        ("1 / epoch", "not finite at epoch = 0"),
        ("log(epoch)", "not finite at epoch = 0"),
        ("0 * log(epoch - 1)", "not finite at epoch = 0"),
        ("epoch - 1", "negative at epoch = 0"),
        ("", "empty"),
        ("1; import os", "not a valid expression"),
        ("import os", "not a valid expression"),
        ("1 +", "not a valid expression"),
        ("(" * 250 + "1" + ")" * 250, "too many nested parentheses"),
        ("-" * 500 + "1", "nests deeper than"),
        ("+".join(["epoch"] * 150), "nests deeper than"),
        ("max(" + ",".join(["1"] * 210) + ")", "too large (more than 200 elements)"),
        ("1 + " * 300 + "1", "too long"),
        ("epoch" * 1000, "too long"),
        ("1\x00", "NUL"),
    ],
)
def test_refused_with_a_clear_message(source: str, message: str) -> None:
    with pytest.raises(ExprError, match=None) as info:
        parse(source)
    assert message in str(info.value), str(info.value)


def test_deep_nesting_is_refused_without_recursion() -> None:
    # Far beyond Python's own recursion limit if anything walked it recursively.
    for source in ("(" * 400 + "1" + ")" * 400, "abs(" * 240 + "1" + ")" * 240):
        with pytest.raises(ExprError):
            parse(source[:MAX_LENGTH])


def test_spec_reports_expression_errors_as_validation_errors() -> None:
    with pytest.raises(ValidationError, match="function '__import__' is not allowed"):
        LambdaLR.model_validate({"type": "LambdaLR", "lr_lambda": "__import__('os')"})
    with pytest.raises(ValidationError, match="entry 1: unknown name 'os'"):
        LambdaLR.model_validate({"type": "LambdaLR", "lr_lambda": ["epoch", "os"]})
    with pytest.raises(ValidationError):
        LambdaLR.model_validate({"type": "LambdaLR", "lr_lambda": 0.5})


def test_huge_values_do_not_hang() -> None:
    expr = parse("epoch ** epoch ** 2")  # 0 ** 0 = 1 at epoch 0; overflows later
    values = expr(epoch=np.arange(0, 1_000_000, dtype=np.float64))
    assert values[0] == 1 and np.isinf(values[-1])


def test_scale_fn_variable() -> None:
    expr = parse("1 / (2.0 ** (x - 1))", ("x",), check_at={"x": 1.0})
    assert list(expr(x=np.array([1.0, 2.0, 3.0]))) == [1.0, 0.5, 0.25]
    with pytest.raises(ExprError, match="unknown name 'epoch'"):
        parse("epoch", ("x",))
