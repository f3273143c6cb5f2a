"""A small, safe expression language for feature filters and derived features.

Text is parsed with ``ast.parse(text, mode="eval")`` and the tree is walked against a
whitelist into a tiny private node set; nothing ever reaches ``eval``, ``compile`` or
``exec``. Two dialects share the walker:

* **filter** (boolean): ``== != < <= > >=`` (chained), ``in`` / ``not in`` a list or tuple of
  constants, ``and``, ``or``, ``not``, parentheses, field names, string / number / boolean
  literals, ``null`` (or ``None``), and ``+ - * /`` on numbers.
  Example: ``surface == 'explore' and dwell_ms > 0``.
* **derived** (numeric): numbers, names of window values, ``+ - * /``, unary minus and the
  functions ``min(a, b, ...)``, ``max(a, b, ...)``, ``log1p(x)``, ``sqrt(x)``.
  Example: ``(item_clicks_1d + 1) / (item_impressions_1d + 20)``.

Semantics, identical for one row (``evaluate_row``) and for columns (``evaluate_columns``):

* null is ``None`` in a row or an object column, code ``-1`` in a dictionary-encoded string
  column, and NaN in a float column.
* Every comparison (including ``in`` and ``not in``) with a null operand, or between a string
  and a number, is false. ``x == null`` and ``x != null`` test for null.
* ``and``, ``or`` and ``not`` are ordinary two-valued logic on those results.
* Arithmetic is float64. A null or string operand, or a division by zero, gives null (NaN).
* A derived value that is not a finite number (division by zero, ``log1p`` of a value
  ``<= -1``, ``sqrt`` of a negative, a missing input) is replaced by ``default`` when given.
"""

from __future__ import annotations

import ast
import math
import numbers
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

import numpy as np

from features.errors import FilterSyntaxError

Dialect = Literal["filter", "derived"]

MAX_LENGTH = 1_000
"""Longest expression text accepted, in characters."""
MAX_DEPTH = 32
"""Deepest syntax tree accepted (each operator, operand and parenthesised call is a level)."""

DERIVED_FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "log1p": (1, 1),
    "max": (2, None),
    "min": (2, None),
    "sqrt": (1, 1),
}
"""Functions callable in derived expressions: name -> (fewest, most) arguments."""

_NAMED_CONSTANTS: dict[str, Any] = {"null": None, "true": True, "false": False}
_CMP_OPS: dict[type, str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_ARITH_OPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_OTHER_BINOPS: dict[type, tuple[str, str]] = {
    ast.Mod: ("%", "use + - * /"),
    ast.FloorDiv: ("//", "use /"),
    ast.Pow: ("**", "use * or sqrt()"),
    ast.LShift: ("<<", "use + - * /"),
    ast.RShift: (">>", "use + - * /"),
    ast.BitOr: ("|", "use 'or'"),
    ast.BitXor: ("^", "use + - * /"),
    ast.BitAnd: ("&", "use 'and'"),
    ast.MatMult: ("@", "use + - * /"),
}
_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_SINGLE_EQUALS = re.compile(r"(?<![=!<>:])=(?!=)")
_STRING_TYPES = {"string", "enum"}
_NUMERIC_TYPES = {"long", "int", "double", "float", "boolean"}


class DictEncodedColumn(Protocol):
    """A dictionary-encoded string column: ``dictionary[codes[i]]`` is row ``i``; ``-1`` is null."""

    codes: np.ndarray
    dictionary: np.ndarray


Column = Union[np.ndarray, DictEncodedColumn]  # noqa: UP007 - Protocol in a runtime alias


# --------------------------------------------------------------------------------------------
# Private node set: the only things an expression can be made of.


@dataclass(frozen=True, slots=True)
class _Const:
    value: Any


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Arith:
    op: str
    left: _Node
    right: _Node
    text: str


@dataclass(frozen=True, slots=True)
class _Neg:
    operand: _Node
    text: str


@dataclass(frozen=True, slots=True)
class _Call:
    func: str
    args: tuple[_Node, ...]
    text: str


@dataclass(frozen=True, slots=True)
class _Cmp:
    op: str
    left: _Node
    right: _Node
    text: str


@dataclass(frozen=True, slots=True)
class _IsNull:
    operand: _Node
    negate: bool


@dataclass(frozen=True, slots=True)
class _In:
    operand: _Node
    values: tuple[Any, ...]
    negate: bool
    text: str


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: Literal["and", "or"]
    operands: tuple[_Node, ...]


_Node = _Const | _Field | _Arith | _Neg | _Call | _Cmp | _IsNull | _In | _Not | _BoolOp


# --------------------------------------------------------------------------------------------
# Parsing: ast -> whitelisted nodes.


class _Builder:
    """Walk one parsed expression and build nodes, rejecting everything not whitelisted."""

    def __init__(self, text: str, dialect: Dialect):
        self.text = text
        self.lines = text.splitlines() or [""]
        self.dialect = dialect
        self.fields: set[str] = set()

    # -- error helpers

    def where(self, node: ast.AST) -> str:
        line = getattr(node, "lineno", 1)
        col_bytes = getattr(node, "col_offset", 0)
        src_line = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        col = len(src_line.encode("utf-8")[:col_bytes].decode("utf-8", errors="replace"))
        snippet = ast.get_source_segment(self.text, node) or ""
        if len(snippet) > 40:
            snippet = snippet[:37] + "..."
        loc = f"col {col}" if line == 1 else f"line {line}, col {col}"
        return f"(at {loc}: {snippet!r})"

    def fail(self, reason: str, node: ast.AST) -> FilterSyntaxError:
        return FilterSyntaxError(f"{reason} {self.where(node)}")

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ""

    @property
    def in_what(self) -> str:
        return "in filters" if self.dialect == "filter" else "in derived expressions"

    # -- conditions (filter dialect)

    def condition(self, node: ast.expr) -> _Node:
        if isinstance(node, ast.BoolOp):
            op: Literal["and", "or"] = "and" if isinstance(node.op, ast.And) else "or"
            return _BoolOp(op, tuple(self.condition(v) for v in node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return _Not(self.condition(node.operand))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        built = self.value(node)  # rejects forbidden constructs with their own message
        if isinstance(built, _Const) and isinstance(built.value, bool):
            return built
        raise self.fail(
            "a filter condition must be a comparison such as dwell_ms > 0 or "
            "action == 'click', or a combination of comparisons with and/or/not",
            node,
        )

    def compare(self, node: ast.Compare) -> _Node:
        if self.dialect == "derived":
            raise self.fail(
                "comparisons are not allowed in derived expressions; a derived feature is a number",
                node,
            )
        operands = [node.left, *node.comparators]
        parts: list[_Node] = []
        text = self.segment(node)
        for i, op_node in enumerate(node.ops):
            left_ast, right_ast = operands[i], operands[i + 1]
            if isinstance(op_node, (ast.In, ast.NotIn)):
                left = self.value(left_ast)
                values = self.constant_list(right_ast)
                parts.append(_In(left, values, isinstance(op_node, ast.NotIn), text))
                continue
            if isinstance(op_node, (ast.Is, ast.IsNot)):
                raise self.fail(
                    "'is' is not allowed; use == or != (x == null tests for null)", node
                )
            op = _CMP_OPS[type(op_node)]
            left, right = self.value(left_ast), self.value(right_ast)
            left_null = isinstance(left, _Const) and left.value is None
            right_null = isinstance(right, _Const) and right.value is None
            if left_null or right_null:
                if op not in ("==", "!="):
                    raise self.fail(f"null can only be compared with == or !=, not {op}", node)
                other = left if right_null else right
                parts.append(_IsNull(other, negate=(op == "!=")))
                continue
            parts.append(_Cmp(op, left, right, text))
        return parts[0] if len(parts) == 1 else _BoolOp("and", tuple(parts))

    def constant_list(self, node: ast.expr) -> tuple[Any, ...]:
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            self.value(node)  # a forbidden construct gets its own message first
            raise self.fail(
                "the right side of 'in' / 'not in' must be a list of constants such as "
                "['click', 'like']",
                node,
            )
        values = []
        for elt in node.elts:
            built = self.value(elt)
            if not isinstance(built, _Const):
                raise self.fail("an 'in' list may only hold constants", elt)
            if built.value is None:
                raise self.fail("null is not allowed in an 'in' list; use x == null", elt)
            values.append(built.value)
        return tuple(values)

    # -- values (both dialects)

    def value(self, node: ast.expr) -> _Node:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, (ast.Compare, ast.BoolOp)):
            if self.dialect == "derived":
                if isinstance(node, ast.Compare):
                    return self.compare(node)  # raises with the derived message
                raise self.fail(
                    "'and' / 'or' are not allowed in derived expressions; a derived feature "
                    "is a number",
                    node,
                )
            raise self.fail("a condition cannot be used as a value", node)
        raise self.fail(self.forbidden(node), node)

    def forbidden(self, node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return "attribute access is not allowed"
        if isinstance(node, (ast.Subscript, ast.Slice)):
            return "subscripts are not allowed"
        if isinstance(node, ast.Lambda):
            return "lambdas are not allowed"
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return "comprehensions are not allowed"
        if isinstance(node, (ast.JoinedStr, ast.FormattedValue)):
            return "f-strings are not allowed"
        if isinstance(node, ast.NamedExpr):
            return "assignment expressions (:=) are not allowed"
        if isinstance(node, ast.Starred):
            return "starred expressions (*x) are not allowed"
        if isinstance(node, ast.IfExp):
            return "conditional expressions (a if c else b) are not allowed"
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
            if self.dialect == "filter":
                return "list literals are only allowed on the right of 'in' or 'not in'"
            return "list literals are not allowed in derived expressions"
        return f"{type(node).__name__} expressions are not allowed"

    def constant(self, node: ast.Constant) -> _Const:
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise self.fail("integer literals must fit in 64 bits", node)
        if self.dialect == "derived":
            if isinstance(v, bool) or v is None or not isinstance(v, (int, float)):
                raise self.fail(
                    f"derived expressions work on numbers only; {type(v).__name__} literals "
                    "are not allowed",
                    node,
                )
            return _Const(v)
        if v is None or isinstance(v, (str, bool, int, float)):
            return _Const(v)
        raise self.fail(f"{type(v).__name__} literals are not allowed", node)

    def name(self, node: ast.Name) -> _Node:
        ident = node.id
        if ident in _NAMED_CONSTANTS:
            if self.dialect == "derived":
                raise self.fail(
                    f"derived expressions work on numbers only; {ident!r} is not allowed", node
                )
            return _Const(_NAMED_CONSTANTS[ident])
        if ident.startswith("_"):
            raise self.fail("names starting with '_' are not allowed", node)
        if self.dialect == "derived" and ident in DERIVED_FUNCTIONS:
            raise self.fail(f"{ident!r} is a function; call it like {ident}(x)", node)
        self.fields.add(ident)
        return _Field(ident)

    def binop(self, node: ast.BinOp) -> _Node:
        op_type = type(node.op)
        if op_type not in _ARITH_OPS:
            symbol, fix = _OTHER_BINOPS.get(op_type, (op_type.__name__, "use + - * /"))
            raise self.fail(f"operator {symbol!r} is not allowed; {fix}", node)
        left, right = self.numeric(node.left), self.numeric(node.right)
        return _Arith(_ARITH_OPS[op_type], left, right, self.segment(node))

    def unary(self, node: ast.UnaryOp) -> _Node:
        if isinstance(node.op, ast.Not):
            if self.dialect == "derived":
                raise self.fail("'not' is not allowed in derived expressions", node)
            raise self.fail("'not' applies to conditions and cannot be used as a value", node)
        if isinstance(node.op, ast.Invert):
            raise self.fail("operator '~' is not allowed; use 'not' or unary minus", node)
        operand = self.numeric(node.operand)
        if isinstance(node.op, ast.UAdd):
            return operand
        if isinstance(operand, _Const):  # fold negative literals: -5 is a constant
            return _Const(-operand.value)
        return _Neg(operand, self.segment(node))

    def numeric(self, node: ast.expr) -> _Node:
        built = self.value(node)
        if isinstance(built, _Const) and (built.value is None or isinstance(built.value, str)):
            what = "null" if built.value is None else f"the string {built.value!r}"
            raise self.fail(f"arithmetic needs numbers, got {what}", node)
        return built

    def call(self, node: ast.Call) -> _Node:
        if self.dialect == "filter":
            raise self.fail("function calls are not allowed in filters", node)
        allowed = ", ".join(sorted(DERIVED_FUNCTIONS))
        if not isinstance(node.func, ast.Name):
            if isinstance(node.func, ast.Attribute):
                raise self.fail("attribute access is not allowed", node.func)
            raise self.fail(f"only the functions {allowed} can be called", node)
        fname = node.func.id
        if fname not in DERIVED_FUNCTIONS:
            raise self.fail(f"unknown function {fname!r}; allowed: {allowed}", node)
        if node.keywords:
            raise self.fail(f"{fname}() takes no keyword arguments", node)
        lo, hi = DERIVED_FUNCTIONS[fname]
        n = len(node.args)
        if n < lo or (hi is not None and n > hi):
            want = str(lo) if lo == hi else f"at least {lo}"
            raise self.fail(f"{fname}() takes {want} argument(s), got {n}", node)
        args = tuple(self.numeric(a) for a in node.args)
        return _Call(fname, args, self.segment(node))


def _check_size(text: str) -> None:
    if len(text) > MAX_LENGTH:
        raise FilterSyntaxError(
            f"expression is {len(text)} characters long; the limit is {MAX_LENGTH}: "
            "split it or simplify it"
        )


def _check_depth(tree: ast.AST) -> None:
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FilterSyntaxError(
                f"expression is nested too deeply (more than {MAX_DEPTH} levels); simplify it"
            )
        for child in ast.iter_child_nodes(node):
            if not isinstance(
                child, (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
            ):
                stack.append((child, depth + 1))


def _parse(text: Any, dialect: Dialect) -> CompiledExpr:
    kind = "filter" if dialect == "filter" else "derived expression"
    if not isinstance(text, str):
        raise FilterSyntaxError(f"a {kind} must be a string, got {type(text).__name__} {text!r}")
    _check_size(text)
    stripped = text.strip()
    if not stripped:
        raise FilterSyntaxError(f"the {kind} is empty")
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        line = f"line {exc.lineno}, " if exc.lineno and exc.lineno > 1 else ""
        detail = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        hint = "; use == to compare" if _SINGLE_EQUALS.search(stripped) else ""
        raise FilterSyntaxError(f"invalid syntax at {line}col {col}{detail}{hint}") from exc
    except (RecursionError, MemoryError, ValueError) as exc:
        raise FilterSyntaxError(
            f"expression is nested too deeply (more than {MAX_DEPTH} levels); simplify it"
        ) from exc
    _check_depth(tree)
    builder = _Builder(stripped, dialect)
    body = tree.body
    root = builder.condition(body) if dialect == "filter" else builder.value(body)
    return CompiledExpr(
        source=text,
        dialect=dialect,
        fields=frozenset(builder.fields),
        root=root,
        row_fn=_row_fn(root),
    )


def parse_filter(text: str) -> CompiledExpr:
    """Parse a boolean filter such as ``surface == 'explore' and dwell_ms > 0``.

    Raises:
        FilterSyntaxError: the text is not a valid filter; the message names the construct
            and its column, e.g. ``function calls are not allowed in filters (at col 0:
            'len(user_id)')``.
    """
    return _parse(text, "filter")


def parse_derived(text: str) -> CompiledExpr:
    """Parse a numeric derived expression such as ``(clicks_1d + 1) / (impressions_1d + 20)``.

    Raises:
        FilterSyntaxError: the text is not a valid derived expression.
    """
    return _parse(text, "derived")


# --------------------------------------------------------------------------------------------
# Scalar semantics, shared by the row evaluator and the dictionary path of the column one.


def _is_null(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, numbers.Real) and not isinstance(v, (int, bool, np.integer)):
        return math.isnan(v)
    return False


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, str)


def _compare(op: str, a: Any, b: Any) -> bool:
    if _is_null(a) or _is_null(b):
        return False
    a_str, b_str = isinstance(a, str), isinstance(b, str)
    if a_str != b_str:
        return False
    if not a_str and not (_is_number(a) and _is_number(b)):
        return False
    return bool(_PY_OPS[op](a, b))


def _in_list(a: Any, values: tuple[Any, ...], negate: bool) -> bool:
    if _is_null(a):
        return False
    found = any(_compare("==", a, v) for v in values)
    return not found if negate else found


def _num(v: Any) -> float:
    t = type(v)
    if t is float:
        return v
    if t is int or t is bool:
        return float(v)
    if v is None or isinstance(v, str) or not isinstance(v, numbers.Real):
        return math.nan
    return float(v)


def _arith(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or math.isnan(b):
        return math.nan
    try:
        return a / b
    except OverflowError:
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _call(func: str, args: Sequence[float]) -> float:
    if func in ("min", "max"):
        if any(math.isnan(x) for x in args):
            return math.nan
        return min(args) if func == "min" else max(args)
    (x,) = args
    if func == "log1p":
        return float(np.log1p(x)) if x > -1 else math.nan
    return math.sqrt(x) if x >= 0 else math.nan  # sqrt


# --------------------------------------------------------------------------------------------
# Row evaluation: nodes compiled once into closures.


def _row_fn(node: _Node) -> Callable[[Mapping[str, Any]], Any]:
    if isinstance(node, _Const):
        value = node.value
        return lambda row: value
    if isinstance(node, _Field):
        name = node.name

        def get(row: Mapping[str, Any]) -> Any:
            try:
                return row[name]
            except KeyError:
                raise KeyError(
                    f"field {name!r} used by the expression is missing from the row"
                ) from None

        return get
    if isinstance(node, _Arith):
        lf, rf, op = _row_fn(node.left), _row_fn(node.right), node.op
        return lambda row: _arith(op, _num(lf(row)), _num(rf(row)))
    if isinstance(node, _Neg):
        f = _row_fn(node.operand)
        return lambda row: -_num(f(row))
    if isinstance(node, _Call):
        fs, func = [_row_fn(a) for a in node.args], node.func
        return lambda row: _call(func, [_num(f(row)) for f in fs])
    if isinstance(node, _Cmp):
        lf, rf, op = _row_fn(node.left), _row_fn(node.right), node.op
        return lambda row: _compare(op, lf(row), rf(row))
    if isinstance(node, _IsNull):
        f, negate = _row_fn(node.operand), node.negate
        return lambda row: _is_null(f(row)) != negate
    if isinstance(node, _In):
        f, values, negate = _row_fn(node.operand), node.values, node.negate
        return lambda row: _in_list(f(row), values, negate)
    if isinstance(node, _Not):
        f = _row_fn(node.operand)
        return lambda row: not f(row)
    if isinstance(node, _BoolOp):
        fs = [_row_fn(o) for o in node.operands]
        if node.op == "and":
            return lambda row: all(f(row) for f in fs)
        return lambda row: any(f(row) for f in fs)
    raise TypeError(f"unknown node {node!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Column evaluation.


@dataclass(frozen=True, slots=True)
class _Scalar:
    value: Any


@dataclass(frozen=True, slots=True)
class _Strs:
    codes: np.ndarray
    dictionary: np.ndarray


_Vec = _Scalar | _Strs | np.ndarray


def _lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Index a per-dictionary-entry result by codes; code -1 (null) maps to False."""
    return np.append(table.astype(bool), False)[codes]


def _encode_strings(values: np.ndarray) -> _Strs:
    lookup: dict[str, int] = {}
    codes = np.fromiter(
        (-1 if v is None else lookup.setdefault(v, len(lookup)) for v in values),
        dtype=np.int32,
        count=len(values),
    )
    dictionary = np.empty(len(lookup), dtype=object)
    dictionary[:] = list(lookup)
    return _Strs(codes, dictionary)


def _load_column(name: str, col: Any, n: int) -> _Vec:
    if hasattr(col, "codes") and hasattr(col, "dictionary"):
        codes = np.asarray(col.codes)
        dictionary = np.asarray(col.dictionary, dtype=object)
        if len(codes) != n:
            raise ValueError(f"column {name!r} has {len(codes)} rows, expected {n}")
        if not all(isinstance(s, str) for s in dictionary):
            raise TypeError(f"the dictionary of column {name!r} must hold strings only")
        return _Strs(codes, dictionary)
    arr = np.asarray(col)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"column {name!r} has shape {arr.shape}, expected ({n},)")
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind in "US":
        return _encode_strings(arr.astype(object))
    if arr.dtype.kind == "O":
        non_null = [v for v in arr if v is not None]
        if all(isinstance(v, str) for v in non_null):
            return _encode_strings(arr)
        if all(_is_number(v) for v in non_null):
            return np.array([math.nan if v is None else float(v) for v in arr], dtype=float)
        raise TypeError(f"object column {name!r} must hold only strings or only numbers")
    raise TypeError(f"column {name!r} has unsupported dtype {arr.dtype}")


class _ColumnEval:
    """Evaluate nodes over ``n`` rows of columns; each column is loaded once."""

    def __init__(self, cols: Mapping[str, Column], n: int):
        self.cols = cols
        self.n = n
        self.loaded: dict[str, _Vec] = {}

    def field(self, name: str) -> _Vec:
        if name not in self.loaded:
            if name not in self.cols:
                raise KeyError(f"field {name!r} used by the expression has no column")
            self.loaded[name] = _load_column(name, self.cols[name], self.n)
        return self.loaded[name]

    def floats(self, v: _Vec) -> float | np.ndarray:
        if isinstance(v, _Scalar):
            return _num(v.value)
        if isinstance(v, _Strs):
            return np.full(self.n, math.nan)
        return v.astype(np.float64, copy=False)

    def value(self, node: _Node) -> _Vec:
        if isinstance(node, _Const):
            return _Scalar(node.value)
        if isinstance(node, _Field):
            return self.field(node.name)
        if isinstance(node, _Arith):
            a, b = self.floats(self.value(node.left)), self.floats(self.value(node.right))
            if isinstance(a, float) and isinstance(b, float):
                return _Scalar(_arith(node.op, a, b))
            with np.errstate(all="ignore"):
                if node.op == "+":
                    out = np.add(a, b)
                elif node.op == "-":
                    out = np.subtract(a, b)
                elif node.op == "*":
                    out = np.multiply(a, b)
                else:
                    bad = np.equal(b, 0) | np.isnan(b)
                    out = np.where(bad, math.nan, np.divide(a, np.where(bad, 1.0, b)))
            return np.broadcast_to(np.asarray(out, dtype=np.float64), (self.n,))
        if isinstance(node, _Neg):
            a = self.floats(self.value(node.operand))
            return _Scalar(-a) if isinstance(a, float) else np.negative(a)
        if isinstance(node, _Call):
            args = [self.floats(self.value(x)) for x in node.args]
            if all(isinstance(x, float) for x in args):
                return _Scalar(_call(node.func, args))
            with np.errstate(all="ignore"):
                if node.func in ("min", "max"):
                    reduce = np.minimum if node.func == "min" else np.maximum
                    out = args[0]
                    for x in args[1:]:
                        out = reduce(out, x)
                elif node.func == "log1p":
                    x = args[0]
                    ok = np.greater(x, -1)
                    out = np.where(ok, np.log1p(np.where(ok, x, 0.0)), math.nan)
                else:
                    x = args[0]
                    out = np.where(np.greater_equal(x, 0), np.sqrt(np.abs(x)), math.nan)
            return np.broadcast_to(np.asarray(out, dtype=np.float64), (self.n,))
        raise TypeError(f"not a value node: {node!r}")  # pragma: no cover

    def condition(self, node: _Node) -> np.ndarray:
        n = self.n
        if isinstance(node, _Const):
            return np.full(n, bool(node.value))
        if isinstance(node, _BoolOp):
            parts = [self.condition(o) for o in node.operands]
            out = parts[0].copy()
            for p in parts[1:]:
                if node.op == "and":
                    out &= p
                else:
                    out |= p
            return out
        if isinstance(node, _Not):
            return ~self.condition(node.operand)
        if isinstance(node, _IsNull):
            v = self.value(node.operand)
            if isinstance(v, _Scalar):
                nulls = np.full(n, _is_null(v.value))
            elif isinstance(v, _Strs):
                nulls = v.codes < 0
            elif v.dtype.kind == "f":
                nulls = np.isnan(v)
            else:
                nulls = np.zeros(n, dtype=bool)
            return ~nulls if node.negate else nulls
        if isinstance(node, _In):
            return self.in_list(self.value(node.operand), node.values, node.negate)
        if isinstance(node, _Cmp):
            return self.compare(node.op, self.value(node.left), self.value(node.right))
        raise TypeError(f"not a condition node: {node!r}")  # pragma: no cover

    def in_list(self, v: _Vec, values: tuple[Any, ...], negate: bool) -> np.ndarray:
        n = self.n
        if isinstance(v, _Scalar):
            return np.full(n, _in_list(v.value, values, negate))
        if isinstance(v, _Strs):
            table = np.fromiter(
                (_in_list(s, values, negate) for s in v.dictionary), bool, len(v.dictionary)
            )
            return _lookup(table, v.codes)
        nums = [float(x) for x in values if _is_number(x)]
        found = np.isin(v, np.asarray(nums, dtype=np.float64)) if nums else np.zeros(n, bool)
        if not negate:
            return found
        out = ~found
        if v.dtype.kind == "f":
            out &= ~np.isnan(v)
        return out

    def compare(self, op: str, a: _Vec, b: _Vec) -> np.ndarray:
        n = self.n
        if isinstance(a, _Scalar) and isinstance(b, _Scalar):
            return np.full(n, _compare(op, a.value, b.value))
        if isinstance(a, _Scalar):
            a, b, op = b, a, _FLIP[op]
        if isinstance(a, _Strs):
            if isinstance(b, _Scalar):
                table = np.fromiter(
                    (_compare(op, s, b.value) for s in a.dictionary), bool, len(a.dictionary)
                )
                return _lookup(table, a.codes)
            if isinstance(b, _Strs):
                universe = sorted(set(a.dictionary) | set(b.dictionary))
                rank = {s: i for i, s in enumerate(universe)}
                ra = np.append(np.array([rank[s] for s in a.dictionary], np.int64), -1)[a.codes]
                rb = np.append(np.array([rank[s] for s in b.dictionary], np.int64), -1)[b.codes]
                return _PY_OPS[op](ra, rb) & (a.codes >= 0) & (b.codes >= 0)
            return np.zeros(n, dtype=bool)  # string vs number
        # a is a numeric array
        if isinstance(b, _Strs):
            return np.zeros(n, dtype=bool)
        if isinstance(b, _Scalar):
            if not _is_number(b.value) or _is_null(b.value):
                return np.zeros(n, dtype=bool)
            out = np.asarray(_PY_OPS[op](a, b.value), dtype=bool)
        else:
            out = np.asarray(_PY_OPS[op](a, b), dtype=bool)
            if op == "!=" and b.dtype.kind == "f":
                out = out & ~np.isnan(b)
        if op == "!=" and a.dtype.kind == "f":
            out = out & ~np.isnan(a)
        return np.broadcast_to(out, (n,)).copy()


# --------------------------------------------------------------------------------------------
# The compiled expression.


@dataclass(frozen=True, eq=False)
class CompiledExpr:
    """A parsed, whitelisted expression, ready to evaluate on one row or on columns.

    Attributes:
        source: the text it was parsed from.
        dialect: ``"filter"`` (boolean) or ``"derived"`` (numeric).
        fields: the names it references (event fields or window values).
    """

    source: str
    dialect: Dialect
    fields: frozenset[str]
    root: _Node = field(repr=False)
    row_fn: Callable[[Mapping[str, Any]], Any] = field(repr=False)

    def evaluate_row(self, row: Mapping[str, Any], *, default: float | None = None) -> Any:
        """Evaluate on one row: a ``bool`` for a filter, a ``float`` for a derived expression.

        Args:
            row: field name -> value; ``None`` (or NaN) is null.
            default: derived only: returned instead of a non-finite result.

        Raises:
            KeyError: a referenced field is missing from ``row``.
        """
        result = self.row_fn(row)
        if self.dialect == "filter":
            return bool(result)
        result = _num(result)
        if default is not None and not math.isfinite(result):
            return float(default)
        return result

    def evaluate_columns(
        self, cols: Mapping[str, Column], n: int, *, default: float | None = None
    ) -> np.ndarray:
        """Evaluate on ``n`` rows at once; agrees with ``evaluate_row`` row by row.

        Args:
            cols: field name -> a numeric ndarray (NaN is null), an object ndarray of strings
                (``None`` is null), or a dictionary-encoded column (``codes``, ``dictionary``;
                code -1 is null).
            n: number of rows.
            default: derived only: replaces non-finite results.

        Returns:
            A bool array (filter) or a float64 array (derived) of length ``n``.

        Raises:
            KeyError: a referenced field has no column.
        """
        ev = _ColumnEval(cols, n)
        if self.dialect == "filter":
            return ev.condition(self.root)
        out = ev.floats(ev.value(self.root))
        out = np.array(np.broadcast_to(np.asarray(out, dtype=np.float64), (n,)))
        if default is not None:
            out[~np.isfinite(out)] = float(default)
        return out


# --------------------------------------------------------------------------------------------
# Static checks against field types.


def check_fields(expr: CompiledExpr, available: Mapping[str, str]) -> list[str]:
    """Return the names ``expr`` references that are not in ``available``, sorted."""
    return sorted(expr.fields - set(available))


def _walk(node: _Node) -> Iterator[_Node]:
    yield node
    children: tuple[_Node, ...] = ()
    if isinstance(node, (_Arith, _Cmp)):
        children = (node.left, node.right)
    elif isinstance(node, (_Neg, _IsNull, _In, _Not)):
        children = (node.operand,)
    elif isinstance(node, _Call):
        children = node.args
    elif isinstance(node, _BoolOp):
        children = node.operands
    for child in children:
        yield from _walk(child)


def check_types(
    expr: CompiledExpr,
    available: Mapping[str, str],
    *,
    enums: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Return type problems of ``expr`` against field types, one message each.

    Args:
        available: field name -> simple type (``string``, ``long``, ``enum``, ``string?``...).
        enums: enum field name -> allowed symbols, to catch typos such as ``'clik'``.

    Unknown names are left to ``check_fields``.
    """
    enums = enums or {}

    def kind(node: _Node) -> str | None:
        if isinstance(node, _Const):
            if node.value is None:
                return "null"
            return "str" if isinstance(node.value, str) else "num"
        if isinstance(node, _Field):
            t = available.get(node.name)
            if t is None:
                return None
            t = t.rstrip("?")
            if t in _STRING_TYPES:
                return "str"
            if t in _NUMERIC_TYPES:
                return "num"
            return "other"
        return "num"

    problems: list[str] = []

    def enum_problem(f: _Node, value: Any) -> None:
        if isinstance(f, _Field) and f.name in enums and isinstance(value, str):
            symbols = list(enums[f.name])
            if value not in symbols:
                problems.append(
                    f"{value!r} is not a value of enum field {f.name!r}; "
                    f"values: {', '.join(symbols)}"
                )

    for node in _walk(expr.root):
        if isinstance(node, _Field) and kind(node) == "other":
            problems.append(
                f"field {node.name!r} is {available[node.name]} and cannot be used in an "
                "expression; use a scalar field"
            )
        elif isinstance(node, (_Arith, _Neg, _Call)):
            operands = (
                (node.left, node.right)
                if isinstance(node, _Arith)
                else (node.operand,)
                if isinstance(node, _Neg)
                else node.args
            )
            for o in operands:
                if kind(o) == "str":
                    name = o.name if isinstance(o, _Field) else o
                    problems.append(
                        f"field {name!r} is a string; arithmetic needs numbers (in {node.text!r})"
                    )
        elif isinstance(node, _Cmp):
            ka, kb = kind(node.left), kind(node.right)
            if {ka, kb} == {"str", "num"}:
                problems.append(
                    f"{node.text!r} compares a string with a number, so it is always false"
                )
            if isinstance(node.right, _Const):
                enum_problem(node.left, node.right.value)
            if isinstance(node.left, _Const):
                enum_problem(node.right, node.left.value)
        elif isinstance(node, _In):
            k = kind(node.operand)
            for v in node.values:
                kv = "str" if isinstance(v, str) else "num"
                if k in ("str", "num") and kv != k:
                    problems.append(
                        f"{node.text!r} tests a {'string' if k == 'str' else 'number'} "
                        f"against {v!r}, which never matches"
                    )
                enum_problem(node.operand, v)
    return list(dict.fromkeys(problems))
