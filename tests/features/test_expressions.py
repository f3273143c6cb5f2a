"""The safe expression language: what it rejects, what it means, and row == column evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.errors import FeatureSpecError, FilterSyntaxError
from features.expressions import (
    MAX_DEPTH,
    MAX_LENGTH,
    CompiledExpr,
    check_fields,
    check_types,
    parse_derived,
    parse_filter,
)


@dataclass
class DictCol:
    """A dictionary-encoded string column as the fast path gives it (code -1 = null)."""

    codes: np.ndarray
    dictionary: np.ndarray


def dict_encode(values: list[str | None], extra: tuple[str, ...] = ()) -> DictCol:
    dictionary = list(dict.fromkeys([*extra, *(v for v in values if v is not None)]))
    index = {s: i for i, s in enumerate(dictionary)}
    codes = np.array([-1 if v is None else index[v] for v in values], dtype=np.int32)
    return DictCol(codes, np.array(dictionary, dtype=object))


def obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ------------------------------------------------------------------------------------------
# Rejections: each construct gets its own message, with the column and the snippet.


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "len(user_id) > 3",
            "function calls are not allowed in filters (at col 0: 'len(user_id)')",
        ),
        (
            "__import__('os')",
            "function calls are not allowed in filters (at col 0: \"__import__('os')\")",
        ),
        ("().__class__ == 1", "attribute access is not allowed (at col 0: '().__class__')"),
        ("x.y == 1", "attribute access is not allowed (at col 0: 'x.y')"),
        ("a == x.__class__", "attribute access is not allowed (at col 5: 'x.__class__')"),
        ("f(x)", "function calls are not allowed in filters (at col 0: 'f(x)')"),
        ("(lambda: 1) == 1", "lambdas are not allowed (at col 1: 'lambda: 1')"),
        ("[a for a in b] == 1", "comprehensions are not allowed (at col 0: '[a for a in b]')"),
        ("x in (a for a in b)", "comprehensions are not allowed"),
        ("f'{x}' == 'a'", "f-strings are not allowed (at col 0:"),
        ("(y := 1) == 1", "assignment expressions (:=) are not allowed (at col 1: 'y := 1')"),
        ("x[0] == 1", "subscripts are not allowed (at col 0: 'x[0]')"),
        ("x == (1 if y else 2)", "conditional expressions (a if c else b) are not allowed"),
        ("x == [1, 2]", "list literals are only allowed on the right of 'in' or 'not in'"),
        ("x in [*y]", "starred expressions (*x) are not allowed"),
        ("x in y", "the right side of 'in' / 'not in' must be a list of constants"),
        ("x in 'abc'", "the right side of 'in' / 'not in' must be a list of constants"),
        ("x in [y]", "an 'in' list may only hold constants (at col 6: 'y')"),
        ("x in ['a', null]", "null is not allowed in an 'in' list; use x == null"),
        ("x ** 2 > 1", "operator '**' is not allowed; use * or sqrt() (at col 0: 'x ** 2')"),
        ("x % 2 == 0", "operator '%' is not allowed; use + - * /"),
        ("x == 1 & y == 2", "operator '&' is not allowed; use 'and'"),
        ("~x == 1", "operator '~' is not allowed"),
        ("x is None", "'is' is not allowed; use == or != (x == null tests for null)"),
        ("x < null", "null can only be compared with == or !=, not <"),
        ("x", "a filter condition must be a comparison such as dwell_ms > 0"),
        ("'explore'", "a filter condition must be a comparison"),
        ("x + 1", "a filter condition must be a comparison"),
        ("(a == 1) == (b == 2)", "a condition cannot be used as a value (at col 1: 'a == 1')"),
        ("x + 'a' > 1", "arithmetic needs numbers, got the string 'a'"),
        ("b'x' == x", "bytes literals are not allowed"),
        ("_secret == 1", "names starting with '_' are not allowed (at col 0: '_secret')"),
        ("{'a': 1} == x", "list literals are only allowed on the right"),
        ("action = 'click'", "invalid syntax at col 7; use == to compare"),
        ("x ==", "invalid syntax at col"),
        ("", "the filter is empty"),
    ],
)
def test_filter_rejects_with_message(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text)
    assert message in str(info.value)


def test_filter_error_is_a_feature_spec_error() -> None:
    with pytest.raises(FeatureSpecError):
        parse_filter("len(x) > 0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("exp(x)", "unknown function 'exp'; allowed: log1p, max, min, sqrt (at col 0: 'exp(x)')"),
        ("__import__('os')", "unknown function '__import__'; allowed: log1p, max, min, sqrt"),
        ("math.log(x)", "attribute access is not allowed (at col 0: 'math.log')"),
        ("min(x)", "min() takes at least 2 argument(s), got 1"),
        ("sqrt(x, y)", "sqrt() takes 1 argument(s), got 2"),
        ("min(a, b, key=c)", "min() takes no keyword arguments"),
        (
            "x > 1",
            "comparisons are not allowed in derived expressions; a derived feature is a number",
        ),
        ("x and y", "'and' / 'or' are not allowed in derived expressions"),
        ("'a' + x", "derived expressions work on numbers only; str literals are not allowed"),
        ("x + null", "derived expressions work on numbers only; 'null' is not allowed"),
        ("x + true", "derived expressions work on numbers only; 'true' is not allowed"),
        ("x + sqrt", "'sqrt' is a function; call it like sqrt(x)"),
        ("(lambda: 1)()", "only the functions log1p, max, min, sqrt can be called"),
        ("x[1]", "subscripts are not allowed"),
        ("[x, y]", "list literals are not allowed in derived expressions"),
    ],
)
def test_derived_rejects_with_message(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_derived(text)
    assert message in str(info.value)


def test_non_string_is_rejected() -> None:
    with pytest.raises(FilterSyntaxError, match="a filter must be a string, got int 5"):
        parse_filter(5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Hostile inputs: size and depth are bounded before anything else happens.


def test_long_expression_is_rejected() -> None:
    text = " or ".join(["x == 1"] * 200)
    assert len(text) > MAX_LENGTH
    with pytest.raises(FilterSyntaxError, match=rf"characters long; the limit is {MAX_LENGTH}"):
        parse_filter(text)


def test_huge_expression_is_rejected_without_parsing() -> None:
    with pytest.raises(FilterSyntaxError, match="the limit is 1000"):
        parse_filter("-" * 1_000_000 + "1 == 1")


@pytest.mark.parametrize(
    "text",
    [
        "-" * 60 + "x == 1",
        "not " * 40 + "x == 1",
        "(" * 100 + "x == 1" + ")" * 100 + " and " + "x + (" * 40 + "1" + ")" * 40 + " > 0",
        "x == " + "(1 + " * 40 + "1" + ")" * 40,
    ],
)
def test_deeply_nested_expression_is_rejected(text: str) -> None:
    with pytest.raises(
        FilterSyntaxError, match=f"nested too deeply \\(more than {MAX_DEPTH} levels\\)"
    ):
        parse_filter(text)


def test_deep_parentheses_alone_are_fine() -> None:
    # parentheses add no tree levels
    assert parse_filter("(" * 50 + "x == 1" + ")" * 50).evaluate_row({"x": 1}) is True


def test_deeply_nested_derived_is_rejected() -> None:
    with pytest.raises(FilterSyntaxError, match="nested too deeply"):
        parse_derived("min(" * 40 + "x" + ", 1)" * 40)


# ------------------------------------------------------------------------------------------
# Meaning.


ROW = {
    "action": "click",
    "surface": "explore",
    "dwell_ms": 1200,
    "position": 3,
    "score": 0.5,
    "request_id": None,
    "ratio": math.nan,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("action == 'click'", True),
        ("action != 'click'", False),
        ("action in ['click', 'like']", True),
        ("action not in ('click', 'like')", False),
        ("surface == 'explore' and dwell_ms > 0", True),
        ("surface == 'follow' or dwell_ms >= 1200", True),
        ("not (dwell_ms > 1000)", False),
        ("0 < position <= 3", True),
        ("0 < position < 3", False),
        ("dwell_ms / 1000 > 1.1", True),
        ("dwell_ms * 2 - 400 == 2000", True),
        ("-position == -3", True),
        ("dwell_ms / 0 > 0", False),  # division by zero is null
        ("dwell_ms / 0 == null", True),
        ("request_id == null", True),
        ("request_id != null", False),
        ("request_id == 'r1'", False),  # comparisons with null are false ...
        ("request_id != 'r1'", False),  # ... both ways
        ("not (request_id == 'r1')", True),
        ("request_id in ['r1']", False),
        ("request_id not in ['r1']", False),
        ("ratio == ratio", False),  # NaN is null
        ("ratio != 1", False),
        ("ratio == null", True),
        ("action == 1", False),  # string vs number
        ("action != 1", False),
        ("action < 1", False),
        ("position in ['3']", False),
        ("position in [3.0, 4]", True),
        ("true", True),
        ("false or action == 'click'", True),
        ("True and not False", True),
        ("null == null", True),
        ("'a' < 'b'", True),
    ],
)
def test_filter_semantics(text: str, expected: bool) -> None:
    expr = parse_filter(text)
    assert expr.evaluate_row(ROW) is expected
    cols = {
        "action": dict_encode([ROW["action"]]),
        "surface": obj([ROW["surface"]]),
        "dwell_ms": np.array([ROW["dwell_ms"]]),
        "position": np.array([ROW["position"]], dtype=np.int32),
        "score": np.array([ROW["score"]]),
        "request_id": dict_encode([None]),
        "ratio": np.array([ROW["ratio"]]),
    }
    got = expr.evaluate_columns({k: v for k, v in cols.items() if k in expr.fields}, 1)
    assert got.dtype == bool
    assert got.tolist() == [expected]


def test_fields_and_source() -> None:
    expr = parse_filter("surface == 'explore' and dwell_ms > position")
    assert isinstance(expr, CompiledExpr)
    assert expr.fields == frozenset({"surface", "dwell_ms", "position"})
    assert expr.source == "surface == 'explore' and dwell_ms > position"
    assert parse_filter("x == null and y == true").fields == frozenset({"x", "y"})


def test_missing_field_is_a_key_error() -> None:
    expr = parse_filter("dwell_ms > 0")
    with pytest.raises(KeyError, match="field 'dwell_ms' used by the expression is missing"):
        expr.evaluate_row({})
    with pytest.raises(KeyError, match="field 'dwell_ms' used by the expression has no column"):
        expr.evaluate_columns({}, 3)


def test_dictionary_column_compares_on_dictionary_then_codes() -> None:
    col = DictCol(
        codes=np.array([0, 1, -1, 2, 0], dtype=np.int32),
        dictionary=np.array(["click", "like", "hide"], dtype=object),
    )
    cols = {"action": col}
    assert parse_filter("action == 'click'").evaluate_columns(cols, 5).tolist() == [
        True,
        False,
        False,
        False,
        True,
    ]
    assert parse_filter("action != 'click'").evaluate_columns(cols, 5).tolist() == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert parse_filter("action in ['like', 'hide']").evaluate_columns(cols, 5).tolist() == [
        False,
        True,
        False,
        True,
        False,
    ]
    assert parse_filter("action == null").evaluate_columns(cols, 5).tolist() == [
        False,
        False,
        True,
        False,
        False,
    ]


def test_two_string_columns_with_different_dictionaries() -> None:
    a = DictCol(np.array([0, 1, -1, 0], np.int32), np.array(["x", "y"], dtype=object))
    b = DictCol(np.array([1, 1, 0, -1], np.int32), np.array(["y", "x"], dtype=object))
    got = parse_filter("a == b").evaluate_columns({"a": a, "b": b}, 4).tolist()
    assert got == [True, False, False, False]
    got = parse_filter("a < b").evaluate_columns({"a": a, "b": b}, 4).tolist()
    assert got == [False, False, False, False]
    got = parse_filter("a > b").evaluate_columns({"a": a, "b": b}, 4).tolist()
    assert got == [False, True, False, False]


def test_derived_values_and_default() -> None:
    ctr = parse_derived("(item_clicks_1d + 1) / (item_impressions_1d + 20)")
    assert ctr.fields == frozenset({"item_clicks_1d", "item_impressions_1d"})
    assert ctr.evaluate_row({"item_clicks_1d": 4, "item_impressions_1d": 80}) == pytest.approx(0.05)
    # division by zero -> the default, NaN-safe
    zero = {"item_clicks_1d": 4, "item_impressions_1d": -20}
    assert math.isnan(ctr.evaluate_row(zero))
    assert ctr.evaluate_row(zero, default=0.0) == 0.0
    assert ctr.evaluate_row({"item_clicks_1d": None, "item_impressions_1d": 1}, default=-1) == -1
    got = ctr.evaluate_columns(
        {"item_clicks_1d": np.array([4, 4, 1]), "item_impressions_1d": np.array([80, -20, np.nan])},
        3,
        default=0.0,
    )
    assert got.dtype == np.float64
    assert got.tolist() == pytest.approx([0.05, 0.0, 0.0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("min(a, b)", 2.0),
        ("max(a, b, 10)", 10.0),
        ("log1p(a - 3)", None),  # log1p(-1) is not finite
        ("log1p(a)", math.log1p(2.0)),
        ("sqrt(b)", math.sqrt(8.0)),
        ("sqrt(-b)", None),
        ("-a + +b", 6.0),
        ("a / (b - 8)", None),
        ("7", 7.0),
    ],
)
def test_derived_functions(text: str, expected: float | None) -> None:
    expr = parse_derived(text)
    row = {"a": 2, "b": 8.0}
    got = expr.evaluate_row(row)
    vec = expr.evaluate_columns({"a": np.array([2]), "b": np.array([8.0])}, 1)
    if expected is None:
        assert math.isnan(got) and math.isnan(vec[0])
        assert expr.evaluate_row(row, default=-1.0) == -1.0
    else:
        assert got == pytest.approx(expected)
        assert vec[0] == pytest.approx(expected)


def test_check_fields_lists_unknown_names() -> None:
    expr = parse_filter("surfce == 'explore' and dwell_ms > 0 and foo == 1")
    assert check_fields(expr, {"surface": "string", "dwell_ms": "long"}) == ["foo", "surfce"]
    assert check_fields(parse_filter("dwell_ms > 0"), {"dwell_ms": "long"}) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("surface == 1", "'surface == 1' compares a string with a number, so it is always false"),
        (
            "surface + 1 > 2",
            "field 'surface' is a string; arithmetic needs numbers (in 'surface + 1')",
        ),
        ("dwell_ms in ['a']", "tests a number against 'a', which never matches"),
        ("action == 'clik'", "'clik' is not a value of enum field 'action'; values: click, like"),
        ("action in ['click', 'lik']", "'lik' is not a value of enum field 'action'"),
        ("scores == 1", "field 'scores' is map and cannot be used in an expression"),
    ],
)
def test_check_types(text: str, problem: str) -> None:
    types = {"surface": "string", "dwell_ms": "long", "action": "enum", "scores": "map"}
    problems = check_types(parse_filter(text), types, enums={"action": ("click", "like")})
    assert any(problem in p for p in problems), problems


def test_check_types_accepts_good_filters() -> None:
    types = {"surface": "string", "dwell_ms": "long", "action": "enum", "request_id": "string?"}
    text = "surface == 'explore' and dwell_ms / 1000 > 2 and action in ['click'] and request_id != null"
    assert check_types(parse_filter(text), types, enums={"action": ("click",)}) == []


# ------------------------------------------------------------------------------------------
# Property: the column evaluator agrees with the row evaluator on random rows and filters.

ALPHABET = ["", "a", "b", "ab", "B", "é", "explore"]
str_lit = st.sampled_from(ALPHABET).map(repr)
num_lit = st.one_of(
    st.integers(-5, 5).map(str), st.sampled_from(["0.5", "-1.5", "2.0", "1e3", "0", "0.0"])
)
num_expr = st.recursive(
    st.one_of(st.sampled_from(["i1", "f1", "i2"]), num_lit),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        inner.map(lambda e: f"-({e})"),
    ),
    max_leaves=4,
)
str_expr = st.one_of(st.sampled_from(["s1", "s2", "s3"]), str_lit)
operand = st.one_of(num_expr, str_expr)
cmp_op = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
comparison = st.one_of(
    st.tuples(operand, cmp_op, operand).map(" ".join),
    st.tuples(operand, cmp_op, operand, cmp_op, operand).map(" ".join),
    st.tuples(
        operand,
        st.sampled_from(["in", "not in"]),
        st.lists(st.one_of(str_lit, num_lit), max_size=3).map(lambda xs: f"[{', '.join(xs)}]"),
    ).map(" ".join),
    st.tuples(operand, st.sampled_from(["== null", "!= null"])).map(" ".join),
    st.sampled_from(["true", "false"]),
)
condition = st.recursive(
    comparison,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        inner.map(lambda c: f"not ({c})"),
    ),
    max_leaves=5,
)

maybe_str = st.one_of(st.none(), st.sampled_from(ALPHABET))
row_strategy = st.fixed_dictionaries(
    {
        "s1": maybe_str,
        "s2": maybe_str,
        "s3": st.sampled_from(ALPHABET),
        "i1": st.integers(-10, 10),
        "i2": st.integers(-(2**31), 2**31),
        "f1": st.one_of(
            st.floats(-10, 10, allow_nan=False), st.just(math.nan), st.just(0.0), st.just(-0.0)
        ),
    }
)


def columns(rows: list[dict]) -> dict:
    return {
        "s1": obj([r["s1"] for r in rows]),  # object column, None = null
        "s2": dict_encode([r["s2"] for r in rows], extra=("unused", "a")),  # dictionary-encoded
        "s3": np.array([r["s3"] for r in rows]),  # numpy unicode column
        "i1": np.array([r["i1"] for r in rows], dtype=np.int64),
        "i2": np.array([r["i2"] for r in rows], dtype=np.int64),
        "f1": np.array([r["f1"] for r in rows], dtype=np.float64),
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=condition, rows=st.lists(row_strategy, min_size=1, max_size=8))
def test_filter_columns_agree_with_rows(text: str, rows: list[dict]) -> None:
    expr = parse_filter(text)
    expected = [expr.evaluate_row(r) for r in rows]
    got = expr.evaluate_columns(columns(rows), len(rows))
    assert got.dtype == bool and got.shape == (len(rows),)
    assert got.tolist() == expected, text


derived_expr = st.recursive(
    st.one_of(st.sampled_from(["a", "b", "c"]), num_lit),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        inner.map(lambda e: f"-({e})"),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(inner, min_size=2, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"
        ),
        st.tuples(st.sampled_from(["log1p", "sqrt"]), inner).map(lambda t: f"{t[0]}({t[1]})"),
    ),
    max_leaves=5,
)
derived_row = st.fixed_dictionaries(
    {
        "a": st.one_of(st.floats(-100, 100, allow_nan=False), st.just(math.nan), st.just(0.0)),
        "b": st.one_of(st.integers(-5, 5), st.just(0)),
        "c": st.floats(-1.5, 3, allow_nan=False),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=derived_expr, rows=st.lists(derived_row, min_size=1, max_size=8))
def test_derived_columns_agree_with_rows(text: str, rows: list[dict]) -> None:
    expr = parse_derived(text)
    cols = {
        "a": np.array([r["a"] for r in rows], dtype=np.float64),
        "b": np.array([r["b"] for r in rows], dtype=np.int64),
        "c": np.array([r["c"] for r in rows], dtype=np.float64),
    }
    expected = [expr.evaluate_row(r, default=0.0) for r in rows]
    got = expr.evaluate_columns(cols, len(rows), default=0.0)
    assert got.dtype == np.float64
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=text)
