"""Safe arithmetic expressions for ``lr_lambda`` (and CyclicLR's ``scale_fn``).

A spec names a learning-rate factor as a string such as ``"0.95 ** epoch"`` or
``"min(1, (epoch + 1) / 500)"``. The string is parsed once with :mod:`ast` and only an
allow-list of node types is copied into our own small tree of numpy closures; nothing is
ever handed to ``eval``/``exec``/``compile``, no attribute, subscript, call of an arbitrary
name, lambda or comprehension can get through, and the tree is evaluated vectorised over
a whole array of steps at once.

Grammar (a subset of Python's expression syntax, so that the same string is also a valid
Python expression - the tests use that to build torch's lambdas):

- numbers (``1``, ``0.5``, ``1e-3``), the constants ``pi`` and ``e``, and the variables the
  caller allows (``epoch`` for ``lr_lambda``, ``x`` for ``scale_fn``);
- ``+ - * / // % **`` and unary ``+ -``;
- calls of ``min max`` (two or more arguments) and ``abs sqrt exp log cos sin floor ceil``
  (one argument);
- ``a if cond else b`` where ``cond`` is a comparison (``<  <=  >  >=  ==  !=``, chains allowed).

Arithmetic is IEEE float64 (numpy), not Python's: a division by zero or a ``log(0)`` gives
``inf``/``nan`` instead of raising, and ``**`` never builds an arbitrarily large integer, so no
expression can hang the server. Where the value is first used (``epoch = 0``) it must be
finite and not negative, otherwise :func:`parse` refuses it.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Env = Mapping[str, Array]
_Eval = Callable[[Env], Array]

MAX_LENGTH = 1000
"""Longest expression string accepted (characters)."""
MAX_NODES = 200
"""Most syntax-tree nodes an expression may have."""
MAX_DEPTH = 32
"""Deepest nesting of operations an expression may have."""
MAX_CONST_EXPONENT = 10_000.0
"""Largest magnitude of a constant exponent (``x ** 1e9`` can only over- or underflow)."""

CONSTANTS: Mapping[str, float] = {"pi": math.pi, "e": math.e}

_UNARY_FUNCS: Mapping[str, Callable[[Array], Array]] = {
    "abs": np.abs,
    "sqrt": np.sqrt,
    "exp": np.exp,
    "log": np.log,
    "cos": np.cos,
    "sin": np.sin,
    "floor": np.floor,
    "ceil": np.ceil,
}
_NARY_FUNCS: Mapping[str, Callable[[Array, Array], Array]] = {
    "min": np.minimum,
    "max": np.maximum,
}
FUNCTIONS: frozenset[str] = frozenset(_UNARY_FUNCS) | frozenset(_NARY_FUNCS)

_BINOPS: Mapping[type[ast.operator], Callable[[Array, Array], Array]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.FloorDiv: np.floor_divide,
    ast.Mod: np.mod,
    ast.Pow: np.power,
}
_CMPOPS: Mapping[type[ast.cmpop], Callable[[Array, Array], npt.NDArray[np.bool_]]] = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
_OP_SYMBOLS: Mapping[type[ast.AST], str] = {
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Invert: "~",
    ast.Not: "not",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}
# Friendlier names for the constructs people (or attackers) most often try.
_NODE_NAMES: Mapping[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.NamedExpr: "assignment expressions",
    ast.BoolOp: "'and'/'or'",
    ast.JoinedStr: "f-strings",
    ast.Starred: "starred arguments",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slices",
}


class ExprError(ValueError):
    """An expression that is not in the allowed grammar, or unusable at its first step."""


@dataclass(frozen=True)
class Expr:
    """A parsed expression: call it with a float64 array per variable."""

    source: str
    variables: tuple[str, ...]
    _fn: _Eval
    constant: bool
    """True when no variable occurs in the expression."""
    size: int = 1
    """Operations one evaluation performs per element (its syntax-tree nodes): the work
    model's weight of the expression (see :mod:`service.schedules.cost`)."""

    def __call__(self, **values: npt.ArrayLike) -> Array:
        """Evaluate elementwise; the result has the broadcast shape of the arguments."""
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise TypeError(f"missing value for {missing}")
        env = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
        shape = np.broadcast_shapes(*(a.shape for a in env.values())) if env else ()
        with np.errstate(all="ignore"):
            out = self._fn(env)
        return np.broadcast_to(np.asarray(out, dtype=np.float64), shape).copy()


class _Builder:
    def __init__(self, variables: tuple[str, ...]) -> None:
        self.variables = variables
        self.nodes = 0

    def fail(self, node: ast.AST, msg: str) -> ExprError:
        col = getattr(node, "col_offset", None)
        where = f" (at column {col + 1})" if col is not None else ""
        return ExprError(msg + where)

    def build(self, node: ast.AST, depth: int) -> tuple[_Eval, float | None]:
        """Our tree for ``node``; the second item is its value when it is a constant."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ExprError(f"expression is too large (more than {MAX_NODES} elements)")
        if depth > MAX_DEPTH:
            raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels")
        fn, const = self._build(node, depth + 1)
        if const is not None:
            if not math.isfinite(const):
                raise self.fail(node, "a constant part of the expression overflows to inf/nan")
            value = const
            return (lambda env: np.float64(value)), const  # type: ignore[return-value]
        return fn, None

    def _build(self, node: ast.AST, depth: int) -> tuple[_Eval, float | None]:
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.fail(node, f"only numbers are allowed, not {type(v).__name__} {v!r}")
            try:
                f = float(v)
            except OverflowError:
                raise self.fail(node, "number is too large") from None
            return (lambda env: np.float64(f)), f  # type: ignore[return-value]
        if isinstance(node, ast.Name):
            if node.id in self.variables:
                name = node.id
                return (lambda env: env[name]), None
            if node.id in CONSTANTS:
                c = CONSTANTS[node.id]
                return (lambda env: np.float64(c)), c  # type: ignore[return-value]
            if node.id in FUNCTIONS:
                raise self.fail(node, f"function {node.id!r} must be called, e.g. {node.id}(...)")
            allowed = ", ".join([*self.variables, *CONSTANTS])
            raise self.fail(node, f"unknown name {node.id!r}; allowed names are {allowed}")
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.UAdd, ast.USub)):
                raise self.fail(
                    node, f"operator {_OP_SYMBOLS.get(type(node.op), '?')!r} is not allowed"
                )
            operand, oc = self.build(node.operand, depth)
            if isinstance(node.op, ast.USub):
                return (lambda env: np.negative(operand(env))), (None if oc is None else -oc)
            return operand, oc
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                sym = _OP_SYMBOLS.get(type(node.op), type(node.op).__name__)
                raise self.fail(node, f"operator {sym!r} is not allowed")
            left, lc = self.build(node.left, depth)
            right, rc = self.build(node.right, depth)
            if isinstance(node.op, ast.Pow) and rc is not None and abs(rc) > MAX_CONST_EXPONENT:
                raise self.fail(
                    node,
                    f"exponent {rc:g} is too large (at most {MAX_CONST_EXPONENT:g} in magnitude)",
                )
            if lc is not None and rc is not None:
                with np.errstate(all="ignore"):
                    folded = float(op(np.asarray(lc), np.asarray(rc)))
                return left, folded  # replaced by a constant in build()
            return (lambda env: op(left(env), right(env))), None
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        if isinstance(node, ast.IfExp):
            test = self._condition(node.test, depth)
            body, _ = self.build(node.body, depth)
            orelse, _ = self.build(node.orelse, depth)
            return (lambda env: np.where(test(env), body(env), orelse(env))), None
        if isinstance(node, ast.Compare):
            raise self.fail(
                node, "a comparison is only allowed as the condition of 'a if cond else b'"
            )
        what = _NODE_NAMES.get(type(node), f"{type(node).__name__} expressions")
        raise self.fail(node, f"not allowed in an expression: {what}")

    def _call(self, node: ast.Call, depth: int) -> tuple[_Eval, float | None]:
        if not isinstance(node.func, ast.Name):
            what = "method calls" if isinstance(node.func, ast.Attribute) else "this kind of call"
            raise self.fail(node, f"{what} are not allowed; only {sorted(FUNCTIONS)} may be called")
        name = node.func.id
        if name not in FUNCTIONS:
            raise self.fail(
                node, f"function {name!r} is not allowed; use one of {sorted(FUNCTIONS)}"
            )
        if node.keywords:
            raise self.fail(node, f"{name}() takes no keyword arguments")
        args = [self.build(a, depth) for a in node.args]
        fns = [f for f, _ in args]
        consts = [c for _, c in args]
        if name in _UNARY_FUNCS:
            if len(args) != 1:
                raise self.fail(node, f"{name}() takes exactly one argument ({len(args)} given)")
            ufn = _UNARY_FUNCS[name]
            arg = fns[0]
            fn: _Eval = lambda env: ufn(arg(env))  # noqa: E731
        else:
            if len(args) < 2:
                raise self.fail(node, f"{name}() takes at least two arguments ({len(args)} given)")
            nfn = _NARY_FUNCS[name]

            def fn(env: Env) -> Array:
                acc = fns[0](env)
                for f in fns[1:]:
                    acc = nfn(acc, f(env))
                return acc

        if all(c is not None for c in consts):
            with np.errstate(all="ignore"):
                return fn, float(fn({}))
        return fn, None

    def _condition(self, node: ast.AST, depth: int) -> Callable[[Env], npt.NDArray[np.bool_]]:
        if not isinstance(node, ast.Compare):
            raise self.fail(node, "the condition of 'a if cond else b' must be a comparison")
        self.nodes += 1
        ops = []
        for op in node.ops:
            cmp = _CMPOPS.get(type(op))
            if cmp is None:
                raise self.fail(
                    node, f"comparison {_OP_SYMBOLS.get(type(op), '?')!r} is not allowed"
                )
            ops.append(cmp)
        operands = [self.build(x, depth)[0] for x in [node.left, *node.comparators]]

        def test(env: Env) -> npt.NDArray[np.bool_]:
            values = [f(env) for f in operands]
            result = ops[0](values[0], values[1])
            for i in range(1, len(ops)):
                result = np.logical_and(result, ops[i](values[i], values[i + 1]))
            return np.asarray(result)

        return test


def parse(
    source: str,
    variables: tuple[str, ...] = ("epoch",),
    *,
    check_at: Mapping[str, float] | None = None,
    what: str = "the factor",
) -> Expr:
    """Parse ``source`` into an :class:`Expr` over ``variables``.

    ``check_at`` (default: every variable 0) is the point where the expression is first
    evaluated; it must be finite and not negative there. Raises :class:`ExprError` with a
    message meant for the person who wrote the spec.
    """
    if not isinstance(source, str):
        raise ExprError("expression must be a string")
    if len(source) > MAX_LENGTH:
        raise ExprError(f"expression is too long ({len(source)} characters, at most {MAX_LENGTH})")
    if not source.strip():
        raise ExprError("expression is empty")
    if "\x00" in source:
        raise ExprError("expression contains a NUL character")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"not a valid expression: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels") from None
    builder = _Builder(tuple(variables))
    fn, _ = builder.build(tree.body, 0)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    expr = Expr(
        source=source,
        variables=tuple(variables),
        _fn=fn,
        constant=not (names & set(variables)),
        size=max(1, builder.nodes),
    )
    point = dict.fromkeys(variables, 0.0) if check_at is None else dict(check_at)
    first = float(expr(**point))
    where = ", ".join(f"{k} = {v:g}" for k, v in point.items())
    if not math.isfinite(first):
        raise ExprError(f"{what} is not finite at {where} (got {first})")
    if first < 0:
        raise ExprError(f"{what} is negative at {where} (got {first:g})")
    return expr
