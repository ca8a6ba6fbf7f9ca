"""Tests for modelcheck.expr, the condition language of rule files."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from modelcheck import expr
from modelcheck.errors import RuleError
from modelcheck.expr import FUNCTIONS, Expression, parse, truthy

NAN = math.nan
INF = math.inf


def run(source: str, **env: object) -> object:
    return parse(source).evaluate(env)


def same(actual: object, expected: object) -> bool:
    """Equality where nan equals nan and arrays compare elementwise."""
    if isinstance(expected, np.ndarray):
        return isinstance(actual, np.ndarray) and np.array_equal(actual, expected, equal_nan=True)
    if isinstance(actual, np.ndarray):
        return False
    if isinstance(expected, float):
        if not isinstance(actual, float):
            return False
        both_nan = math.isnan(expected) and math.isnan(actual)
        return both_nan or math.isclose(actual, expected, rel_tol=1e-12)
    return actual == expected


def rule_error(source: str, env: dict[str, object] | None = None, **kwargs: object) -> str:
    """The message of the RuleError that parsing (or evaluating) source raises."""
    with pytest.raises(RuleError) as info:
        parse(source, **kwargs).evaluate(env or {})
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


# ---------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2", 3),
        ("5 - 7", -2),
        ("3 * 4", 12),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("7.5 % 2", 1.5),
        ("2 ** 10", 1024.0),
        ("2 ** -1", 0.5),
        ("1.5 + 1", 2.5),
        ("-(3)", -3),
        ("+3", 3),
        ("--3", 3),
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-2 ** 2", -4.0),
        ("True + True", 2),
        ("1e3", 1000.0),
    ],
)
def test_arithmetic_operators_follow_python_precedence_and_results(source, expected):
    assert same(run(source), expected)


def test_int_arithmetic_stays_int_and_division_gives_float():
    assert type(run("7 // 2")) is int
    assert type(run("2 * 3 - 1")) is int
    assert type(run("6 / 3")) is float


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 / 0", INF),
        ("-1 / 0", -INF),
        ("0 / 0", NAN),
        ("1 // 0", INF),
        ("1 % 0", NAN),
        ("0 ** -1", INF),
        ("1e308 * 10", INF),
        ("10.0 ** 400", INF),
        ("(-8) ** 0.5", NAN),
        ("inf - inf", NAN),
        ("2.5 / 0", INF),
    ],
)
def test_numbers_follow_ieee_instead_of_raising(source, expected):
    assert same(run(source), expected)


def test_huge_powers_return_quickly_as_inf():
    start = time.perf_counter()
    assert run("9**9**9**9") == INF
    assert run("2 ** 10 ** 10") == INF
    assert run("(10 ** 300) * 10 ** 300") == INF
    assert time.perf_counter() - start < 1.0


def test_huge_int_literals_become_floats():
    assert run("1" + "0" * 400) == INF
    assert run("12345678901234567890123 * 1") == pytest.approx(1.2345678901234568e22)


def test_products_of_large_ints_switch_to_float_and_stay_small():
    source = " * ".join(["99999999999"] * 40)
    assert isinstance(run(source), float)


def test_arithmetic_on_arrays_is_elementwise_and_in_float():
    u = np.array([1, 2, 3])
    assert same(run("u * 2 + 1", u=u), np.array([3.0, 5.0, 7.0]))
    assert same(run("u / 0", u=u), np.array([INF, INF, INF]))
    assert same(run("-u", u=u), np.array([-1.0, -2.0, -3.0]))
    assert same(run("u ** -1", u=np.array([2, 0])), np.array([0.5, INF]))
    assert same(run("u + v", u=u, v=np.array([1.0, 1.0, 1.0])), np.array([2.0, 3.0, 4.0]))


def test_arrays_of_different_lengths_are_a_rule_error():
    message = rule_error("u + v", {"u": np.array([1.0, 2.0]), "v": np.array([1.0, 2.0, 3.0])})
    assert "'+'" in message and "'u + v'" in message


# ---------------------------------------------------------------------------- comparisons


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 < 2", True),
        ("2 < 1", False),
        ("2 <= 2", True),
        ("3 > 2", True),
        ("2 >= 3", False),
        ("2 == 2.0", True),
        ("2 != 2", False),
        ("'relu' == 'relu'", True),
        ("'a' < 'b'", True),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),
        ("1 < 2 <= 2 != 3", True),
    ],
)
def test_comparisons_and_chains(source, expected):
    assert run(source) is expected


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "=="])
def test_nan_comparisons_are_false(op):
    assert run(f"nan {op} 1") is False
    assert run(f"nan {op} nan") is False


def test_nan_not_equal_is_true_as_in_ieee():
    assert run("nan != nan") is True


def test_comparisons_on_arrays_are_elementwise():
    u = np.array([0.0, 0.005, 0.5, NAN])
    assert same(run("u < 0.01", u=u), np.array([True, True, False, False]))
    assert same(run("0 < u < 1", u=u), np.array([False, True, True, False]))


def test_mean_of_an_array_comparison_is_a_fraction():
    unit_active = np.array([0.0, 0.005, 0.2, 0.9])
    assert run("mean(unit_active < 0.01)", unit_active=unit_active) == 0.5
    assert run("mean(unit_active < 0.01) >= 0.5", unit_active=unit_active) is True


# ---------------------------------------------------------------------------- logic and null


def _and(a, b):
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _or(a, b):
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


TRUTHS = [True, False, None]


@pytest.mark.parametrize("a", TRUTHS)
@pytest.mark.parametrize("b", TRUTHS)
def test_and_or_use_three_valued_logic(a, b):
    assert run("a and b", a=a, b=b) is _and(a, b)
    assert run("a or b", a=a, b=b) is _or(a, b)


def test_and_or_give_booleans_from_truthiness():
    assert run("2 and 'x'") is True
    assert run("0 or ''") is False
    assert run("nan or 0") is False
    assert run("1 and 2 and None") is None
    assert run("0 or None or 3") is True


def test_and_or_short_circuit_past_undefined_names():
    assert run("False and undefined_metric") is False
    assert run("True or undefined_metric") is True


def test_and_or_on_arrays_are_elementwise():
    u = np.array([1.0, 0.0, NAN])
    assert same(run("u and True", u=u), np.array([True, False, False]))
    assert same(run("u or False", u=u), np.array([True, False, False]))
    assert run("u and False", u=u) is False
    assert run("u and None", u=u) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [("not 0", True), ("not 1", False), ("not ''", True), ("not nan", True), ("not n", None)],
)
def test_not_uses_truthiness_and_keeps_none(source, expected):
    assert run(source, n=None) is expected


def test_not_on_an_array_is_elementwise():
    assert same(run("not u", u=np.array([0.0, 2.0])), np.array([True, False]))


@pytest.mark.parametrize(
    "source",
    [
        "n + 1",
        "1 - n",
        "n * 2",
        "n / 0",
        "n ** 2",
        "-n",
        "+n",
        "n < 1",
        "1 == n",
        "1 < n < 2",
        "mean(n)",
        "abs(n)",
        "max(1, n)",
        "matches(n, 'a*')",
        "quantile(x, n)",
        "n in (1, 2)",
        "1 in n",
        "x if n else 2",
        "m['k'] + 1",
        "n['k']",
        "u if u > 0 else n",
    ],
)
def test_null_propagates_through_arithmetic_comparisons_and_calls(source):
    env = {"n": None, "x": np.array([1.0, 2.0]), "m": {"k": None}, "u": np.array([1.0, -1.0])}
    assert parse(source).evaluate(env) is None


def test_is_none_and_is_not_none_test_for_null():
    assert run("n is None", n=None) is True
    assert run("x is None", x=0) is False
    assert run("n is not None", n=None) is False
    assert run("x is not null", x=0) is True
    assert run("m['absent'] is None", m={}) is True


def test_missing_metric_gives_none_not_error():
    metrics = {"dead_fraction": 0.4}
    assert run("m['dead_fraction'] > 0.3", m=metrics) is True
    assert run("m['saturation']", m=metrics) is None
    assert run("m['saturation'] > 0.3", m=metrics) is None
    assert truthy(run("m['saturation'] > 0.3", m=metrics)) is False


def test_undefined_name_at_evaluation_is_a_rule_error_naming_it():
    message = rule_error("unit_activ > 0", {"unit_active": 1.0, "grad": 2.0})
    assert "'unit_activ'" in message and "did you mean 'unit_active'" in message


def test_subscript_of_a_non_mapping_is_a_rule_error():
    assert "not a mapping" in rule_error("m['k']", {"m": 3})


# ---------------------------------------------------------------------------- in, is, if


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("s in ('relu', 'gelu')", True),
        ("s in ['tanh']", False),
        ("s not in ('relu',)", False),
        ("x in (1, 2, -3)", True),
        ("-3 in (1, 2, -3)", True),
        ("x in ()", False),
        ("x not in ()", True),
        ("nan in (nan,)", False),
        ("None in (1, 2)", None),
        ("x in (inf, -inf, true, null)", False),
        ("s in names", True),
        ("s in word", True),
        ("x in values", True),
        ("'k' in m", True),
        ("'z' in m", False),
        ("s in names_set", True),
    ],
)
def test_in_and_not_in(source, expected):
    env = {
        "s": "relu",
        "word": "xrelux",
        "x": 2,
        "names": ["relu", "gelu"],
        "names_set": frozenset({"relu"}),
        "values": np.array([1.0, 2.0]),
        "m": {"k": 1},
    }
    assert parse(source).evaluate(env) is expected


def test_in_with_an_array_on_the_left_is_elementwise():
    u = np.array([1.0, 2.0, 3.0])
    assert same(run("u in (1, 3)", u=u), np.array([True, False, True]))
    assert same(run("u not in (1, 3)", u=u), np.array([False, True, False]))
    assert same(run("u in w", u=u, w=np.array([2.0])), np.array([False, True, False]))


def test_in_needs_a_container_on_the_right():
    assert "'in'" in rule_error("x in y", {"x": 1, "y": 3})
    assert "'in'" in rule_error("x in s", {"x": 1, "s": "abc"})


def test_conditional_evaluates_only_the_chosen_branch():
    assert run("1 if x > 0 else undefined_metric", x=1) == 1
    assert run("undefined_metric if x > 0 else 2", x=-1) == 2
    assert run("1 if nan else 2") == 2


def test_conditional_with_none_condition_gives_none():
    assert run("1 if n else 2", n=None) is None


def test_conditional_with_an_array_condition_picks_elementwise():
    u = np.array([-1.0, 2.0])
    assert same(run("u if u > 0 else 0", u=u), np.array([0.0, 2.0]))


# ---------------------------------------------------------------------------- functions

U = np.array([3.0, 1.0, 2.0, 4.0])
B = np.array([True, False, True, True])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("abs(-3)", 3),
        ("abs(-2.5)", 2.5),
        ("abs(-u)", U),
        ("min(u)", 1.0),
        ("max(u)", 4.0),
        ("min(3, 1, 2)", 1.0),
        ("max(u, 2.5)", np.array([3.0, 2.5, 2.5, 4.0])),
        ("min(u, u * 2)", U),
        ("sqrt(16)", 4.0),
        ("sqrt(-1)", NAN),
        ("log(1)", 0.0),
        ("log(0)", -INF),
        ("log10(1000)", 3.0),
        ("log2(8)", 3.0),
        ("exp(0)", 1.0),
        ("exp(1000)", INF),
        ("isfinite(1)", True),
        ("isfinite(inf)", False),
        ("isfinite(u / 0)", np.array([False] * 4)),
        ("round(2.5)", 2.0),
        ("round(3.5)", 4.0),
        ("round(1.2345, 2)", 1.23),
        ("round(1234, -2)", 1200.0),
        ("round(1.5, 400)", 1.5),
        ("round(123, -400)", 0.0),
        ("round(u / 3, 1)", np.round(U / 3, 1)),
        ("mean(u)", 2.5),
        ("mean(b)", 0.75),
        ("median(u)", 2.5),
        ("sum(u)", 10.0),
        ("sum(7)", 7.0),
        ("count(b)", 3),
        ("count(u > 2)", 2),
        ("count(half)", 1),
        ("any(u > 3)", True),
        ("any(u > 4)", False),
        ("all(u > 0)", True),
        ("all(b)", False),
        ("len(u)", 4),
        ("len('relu')", 4),
        ("len(names)", 2),
        ("first(u)", 3.0),
        ("last(u)", 4.0),
        ("first(5)", 5),
        ("std(u)", float(np.std(U))),
        ("quantile(u, 0.5)", 2.5),
        ("quantile(u, 0)", 1.0),
        ("quantile(u, 1)", 4.0),
        ("spearman(u)", 0.4),
        ("matches('layer1.conv', 'layer*.conv')", True),
        ("matches('layer1.conv', 'Layer*')", False),
        ("matches('fc', 'f?')", True),
    ],
)
def test_functions(source, expected):
    env = {"u": U, "b": B, "names": ["a", "b"], "half": np.float64(0.5)}
    assert same(parse(source).evaluate(env), expected)


def test_function_table_documents_every_function_in_one_line():
    assert set(FUNCTIONS) == {
        "abs", "min", "max", "sqrt", "log", "log10", "log2", "exp", "isfinite", "round",
        "mean", "median", "sum", "count", "any", "all", "len", "first", "last", "std",
        "quantile", "spearman", "matches",
    }  # fmt: skip
    for name, description in FUNCTIONS.items():
        assert description.startswith(f"{name}(") and "\n" not in description


@pytest.mark.parametrize(
    "source",
    [
        "mean(e)",
        "median(e)",
        "sum(e)",
        "std(e)",
        "min(e)",
        "max(e)",
        "first(e)",
        "last(e)",
        "any(e)",
        "all(e)",
        "quantile(e, 0.5)",
        "spearman(e)",
    ],
)
def test_aggregations_of_empty_arrays_give_none(source):
    assert run(source, e=np.array([])) is None


def test_count_and_len_of_an_empty_array_are_zero():
    assert run("count(e)", e=np.array([])) == 0
    assert run("len(e)", e=np.array([])) == 0


def test_count_reads_nan_as_false():
    assert run("count(u)", u=np.array([1.0, NAN, 0.0, -2.0])) == 2


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 1.0),
        ([4.0, 3.0, 2.0, 1.0], -1.0),
        ([1.0, NAN, 2.0, INF, 3.0], 1.0),
        ([2.0, 2.0, 2.0], None),
        ([1.0, 2.0, NAN, NAN], None),
        ([1.0], None),
    ],
)
def test_spearman_measures_the_trend_of_the_finite_values(values, expected):
    assert run("spearman(u)", u=np.array(values)) == expected


@pytest.mark.parametrize("seed", range(5))
def test_spearman_without_scipy_gives_the_same_numbers(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=30).astype(float)  # integers, so with ties
    values[rng.integers(0, 30, size=3)] = NAN
    with_scipy = run("spearman(u)", u=values)
    monkeypatch.setattr(expr, "_scipy_spearmanr", lambda: None)
    assert run("spearman(u)", u=values) == pytest.approx(with_scipy, abs=1e-12)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ('"a" + 1', "'+' needs numbers, got a string and an int"),
        ("len(3)", "len() needs an array, a string or a list"),
        ("-'a'", "unary '-' needs a number"),
        ("not w", "'not' needs numbers or booleans"),
        ("'a' < 1", "comparison failed"),
        ("mean('a')", "mean() needs numbers"),
        ("abs('a')", "abs() needs numbers"),
        ("s * 2", "'*' needs numbers"),
        ("round(1.5, 0.5)", "round() needs a whole number of digits"),
        ("quantile(u, 2)", "quantile() needs q between 0 and 1"),
        ("quantile(u, nan)", "quantile() needs q between 0 and 1"),
        ("matches(1, 'a')", "matches() needs two strings"),
        ("first('abc')", "first() needs an array"),
        ("count(w)", "count() needs numbers or booleans"),
        ("1 if w else 2", "'if' needs numbers or booleans"),
        ("u if u > 1 else 'x'", "'if' needs numbers"),
    ],
)
def test_type_errors_at_evaluation_are_rule_errors_naming_the_expression(source, fragment):
    env = {"s": "relu", "u": U, "w": np.array(["a", "b"])}
    message = rule_error(source, env)
    assert fragment in message and repr(source) in message


def test_evaluation_errors_point_at_the_failing_part():
    message = rule_error("x > 1 and mean(s) > 0", {"x": 2, "s": "relu"})
    assert "at 'mean(s)'" in message


def test_numpy_scalars_and_lists_in_the_env_are_plain_values():
    assert type(run("x + 1", x=np.float32(1.5))) is float
    assert run("x", x=np.int64(3)) == 3 and type(run("x", x=np.int64(3))) is int
    assert same(run("x * 2", x=[1, 2]), np.array([2.0, 4.0]))
    assert run("first(u)", u=np.array([1, 2])) == 1 and type(run("first(u)", u=[1, 2])) is int


def test_results_of_aggregations_are_python_scalars():
    for source in ["mean(u)", "sum(u)", "std(u)", "quantile(u, .3)", "count(u)", "any(u)"]:
        assert not isinstance(run(source, u=U), np.generic), source


# ---------------------------------------------------------------------------- rejected constructs


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("a.b", "attribute access"),
        ("x.__class__", "attribute access"),
        ("a.b()", "method calls"),
        ("__import__('os')", "names starting with '_'"),
        ("_private + 1", "names starting with '_'"),
        ("(lambda: 1)()", "lambda"),
        ("[x for x in y]", "comprehensions"),
        ("{x for x in y}", "comprehensions"),
        ("{x: 1 for x in y}", "comprehensions"),
        ("any(x for x in y)", "generator expressions"),
        ('f"{a}"', "f-strings"),
        ("(a := 1)", "assignment (:=)"),
        ("{1: 2}", "dict displays"),
        ("{1, 2}", "set displays"),
        ("[1, 2]", "lists are only allowed on the right of 'in'"),
        ("(1, 2)", "tuples are only allowed on the right of 'in'"),
        ("mean([1, 2])", "lists are only allowed"),
        ("a[1:2]", "slices"),
        ("a[0]", 'only name["metric"] subscripts'),
        ("a[b]", 'only name["metric"] subscripts'),
        ("a['x']['y']", 'only name["metric"] subscripts'),
        ("min(a, key=b)", "keyword arguments"),
        ("min(**a)", "keyword arguments"),
        ("min(*a)", "starred arguments"),
        ("*a", "starred"),
        ("open('x')", "function 'open' is not allowed"),
        ("eval('1')", "function 'eval' is not allowed"),
        ("x(1)", "function 'x' is not allowed"),
        ("m['f'](1)", "only allow-listed functions"),
        ("x is y", "'is' is only allowed as 'is None'"),
        ("x is 1", "'is' is only allowed as 'is None'"),
        ("x is not True", "'is' is only allowed as 'is None'"),
        ("x in (y, 1)", "the right side of 'in'"),
        ("x in 3", "the right side of 'in'"),
        ("x in mean(y)", "the right side of 'in'"),
        ("x & y", "'&' is not allowed; use 'and'"),
        ("x | y", "'|' is not allowed; use 'or'"),
        ("x ^ y", "'^' is not allowed"),
        ("x << 1", "'<<' is not allowed"),
        ("x >> 1", "'>>' is not allowed"),
        ("x @ y", "'@' is not allowed"),
        ("~x", "'~' is not allowed; use 'not'"),
        ("1j", "complex numbers"),
        ("b'x'", "bytes literals"),
        ("...", "'...' is not allowed"),
        ("yield x", "yield"),
        ("await x", "await"),
        ("x = 1", "syntax error"),
        ("import os", "syntax error"),
        ("a; b", "syntax error"),
        ("x +", "syntax error"),
        ("a) + (b", "syntax error: unbalanced parentheses"),
        ("(a", "syntax error"),
        ("a\x00", "syntax error"),
        ("min()", "min() takes 1 or more arguments, got 0"),
        ("mean(x, y)", "mean() takes 1 argument, got 2"),
        ("round(x, 1, 2)", "round() takes 1-2 arguments, got 3"),
        ("", "empty expression"),
        ("  \n ", "empty expression"),
        ("# just a comment", "empty expression"),
    ],
)
def test_constructs_outside_the_language_are_rejected_at_parse_time(source, fragment):
    with pytest.raises(RuleError) as info:
        parse(source)
    message = str(info.value)
    assert fragment in message, message
    assert len(message.splitlines()) == 1


def test_unknown_function_suggests_close_matches():
    message = rule_error("maen(x) > 1")
    assert "function 'maen' is not allowed; did you mean 'mean'" in message


def test_unknown_function_without_close_match_lists_the_allowed_ones():
    message = rule_error("zzzz(x)")
    assert all(name in message for name in FUNCTIONS)


def test_module_never_calls_eval_exec_or_compile():
    tree = ast.parse(inspect.getsource(expr))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "__import__", "open"}


# ---------------------------------------------------------------------------- names


def test_unknown_names_are_rejected_at_parse_time_with_a_suggestion():
    known = {"unit_active", "grad_norm", "layer_type"}
    message = rule_error("mean(unit_activ) > 0.5", known_names=known)
    assert "unknown name 'unit_activ'; did you mean 'unit_active'?" in message


def test_unknown_name_without_close_match_lists_known_names():
    message = rule_error("zzz > 1", known_names={"alpha", "beta"})
    assert "known names are alpha, beta" in message


def test_suggestions_list_at_most_three_close_matches():
    known = {"unit_a", "unit_b", "unit_c", "unit_d", "unit_e"}
    message = rule_error("unit_ > 1", known_names=known)
    suggestions = message.split("did you mean ")[1].split("?")[0]
    assert suggestions.count("'unit_") == 3


def test_constants_and_function_names_are_not_free_names():
    expression = parse(
        "mean(u) > x and m['k'] in (1, 2) and y is not null and z < inf and true",
        known_names={"u", "x", "m", "y", "z"},
    )
    assert expression.names == frozenset({"u", "x", "m", "y", "z"})
    assert expression.functions == frozenset({"mean"})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("true", True),
        ("false", False),
        ("True", True),
        ("False", False),
        ("null", None),
        ("None", None),
        ("inf", INF),
        ("-inf", -INF),
        ("nan", NAN),
        ("'text'", "text"),
        ("2.5", 2.5),
    ],
)
def test_literals(source, expected):
    assert same(run(source), expected)


def test_constant_names_cannot_be_shadowed_by_the_env():
    assert run("true", true=False) is True


# ---------------------------------------------------------------------------- messages


def test_parse_errors_carry_the_location_prefix():
    message = rule_error("mean(x", where="rules/dead-units.toml: condition")
    assert message.startswith("rules/dead-units.toml: condition: syntax error")
    assert message.endswith("in 'mean(x'")


def test_evaluation_errors_carry_the_location_prefix():
    expression = parse("x + 's'", where="rules/dead-units.toml: condition")
    with pytest.raises(RuleError, match=r"^rules/dead-units.toml: condition: '\+' needs"):
        expression.evaluate({"x": 1})


def test_messages_without_a_location_do_not_start_with_a_colon():
    assert rule_error("a.b").startswith("attribute access")


def test_multi_line_conditions_parse_and_their_errors_stay_on_one_line():
    assert run("x > 1\n  and x < 3", x=2) is True
    message = rule_error("x > 1\n  and\n x.y", where="a.toml:\ncondition")
    assert "\\n" in message  # the source is quoted, its newlines escaped


def test_syntax_errors_give_the_column():
    assert "at column" in rule_error("x + + * 2")


# ---------------------------------------------------------------------------- guards


def test_long_source_is_rejected():
    message = rule_error("x" * 10_000)
    assert "10000 characters long; the limit is 2000" in message
    assert len(message) < 400


def test_source_at_the_length_limit_is_accepted():
    assert parse("1" + " " * (expr.MAX_SOURCE_CHARS - 1)).evaluate({}) == 1


def test_deep_nesting_is_rejected():
    assert "nested more than" in rule_error("-" * 60 + "1")
    assert "syntax error" in rule_error("(" * 300 + "1" + ")" * 300)


def test_too_many_parts_are_rejected():
    assert "more than 500 parts" in rule_error("max(" + ", ".join(["1"] * 600) + ")")


def test_non_string_source_is_rejected():
    with pytest.raises(RuleError, match="must be a string"):
        parse(3)  # type: ignore[arg-type]


def test_env_must_be_a_mapping():
    with pytest.raises(RuleError, match="needs a mapping"):
        parse("x").evaluate([("x", 1)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- Expression, truthy


def test_expression_is_immutable_hashable_and_reusable():
    expression = parse("mean(u) > t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.source = "1"  # type: ignore[misc]
    assert expression == parse("mean(u) > t") and hash(expression) == hash(parse("mean(u) > t"))
    assert isinstance(expression, Expression) and expression.source == "mean(u) > t"
    assert expression.evaluate({"u": U, "t": 2}) is True
    assert expression.evaluate({"u": U, "t": 3}) is False


def test_evaluation_does_not_change_the_env():
    u = np.array([3.0, 1.0, 2.0])
    env = {"u": u}
    parse("spearman(u) + round(u, 1) + abs(u) + (u if u > 2 else 0)").evaluate(env)
    assert np.array_equal(u, [3.0, 1.0, 2.0]) and env == {"u": u}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (NAN, False),
        (np.float64(NAN), False),
        (0, False),
        (0.0, False),
        ("", False),
        (False, False),
        (1, True),
        (-0.5, True),
        ("x", True),
        (INF, True),
        (np.bool_(True), True),
        (np.array(1.0), True),
    ],
)
def test_truthy(value, expected):
    assert truthy(value) is expected


def test_truthy_of_an_array_asks_for_an_aggregation():
    with pytest.raises(RuleError, match=r"aggregate it with any\(\)/all\(\)/mean\(\)"):
        truthy(np.array([True, False]))


# ---------------------------------------------------------------------------- fuzzing

NAMES = ["x", "y", "u", "v", "s", "m", "n", "undefined_metric"]
SCALARS = [None, 0, 1, -3, 2.5, NAN, INF, -INF, 1e308, 10**30, True, False, "relu", ""]
ARRAYS = [
    np.array([]),
    np.array([0.0, 0.5, NAN, INF]),
    np.array([1.0, -2.0, 3.0]),
    np.array([True, False, True]),
    np.array([1, 2, 3]),
    np.array(["a", "b"]),
    np.array([1e308, -1e308, 5e-324]),
    [1, 2, 3],
    ["relu", "gelu"],
]
MAPPINGS = [{"dead": 0.5, "u": np.array([1.0, 2.0]), "none": None}, {}]


def envs(source: str, count: int = 3) -> list[dict[str, object]]:
    """A few envs of random values, seeded by the source itself.

    Hypothesis spends about a millisecond on every drawn argument, far more than parse
    and evaluate take, so the envs come from the one drawn string.
    """
    chance = random.Random(zlib.crc32(source.encode("utf-8", "surrogatepass")))
    result = []
    for _ in range(count):
        env: dict[str, object] = {name: chance.choice(SCALARS + ARRAYS) for name in NAMES[:-2]}
        env["m"] = chance.choice(MAPPINGS + SCALARS[:3])
        result.append(env)
    return result


# Token soup: form, operator, form, ... where forms include calls, subscripts and the
# odd unbalanced parenthesis, and now and then a token from outside the language.
OPERANDS = [
    *NAMES,
    *["0", "1", "2.5", "1e308", "-1", "99999999999999999999999", "inf", "nan", "true"],
    *["false", "null", "None", "'relu'", '"a*"', "()", "(1, 'relu')", "[2, 3]", 'm["dead"]'],
]
FORMS = [
    *OPERANDS,
    *OPERANDS,
    *(f"{name}({arg})" for name in FUNCTIONS for arg in ("u", "x", "s")),
    *["min(u, 2)", "max(x, y, 1)", "round(u, 1)", "matches(s, 'r*')", "quantile(u, 0.5)"],
    *["not x", "-u", "(x", "y)", "(u > 1)", "x is None", "n is not None", "m['none']"],
]
OPERATORS = [
    *["+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!="],
    *["and", "or", "in", "not in", "if", "else", ","],
]
NOISE = [".", ":", "lambda", "for", "=", ":=", "{", "}", "@", "~", "&", "*", "__import__"]
NOISE += ["open(", "f'{x}'", "\n", "#", "\\", "'", "[0]", "[1:2]", "[", "]", "is", "x.y"]


def _assemble(codes: str) -> str:
    """Read drawn characters as tokens: a form, an operator (rarely noise), a form, ..."""
    tokens = []
    for position, code in enumerate(map(ord, codes)):
        if position % 2 == 0:
            tokens.append(FORMS[code % len(FORMS)])
        elif code % 20:
            tokens.append(OPERATORS[code % len(OPERATORS)])
        else:
            tokens.append(NOISE[code % len(NOISE)])
    if len(tokens) % 2 == 0:
        tokens.pop()  # end on a form, not an operator
    return " ".join(tokens)


# One drawn string per example: hypothesis draws it several times faster than a list.
TOKEN_SOUP = st.text(st.characters(max_codepoint=0x2FFF), min_size=1, max_size=9).map(_assemble)


ATOMS = st.sampled_from(
    [*NAMES, "0", "1", "-1", "2.5", "1e308", "inf", "nan", "true", "null", "'relu'", 'm["dead"]']
)
UNARY_FUNCTIONS = [name for name in FUNCTIONS if name not in ("quantile", "matches", "round")]


def _grow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.tuples(children, children)
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        st.tuples(
            children, st.sampled_from(["<", "<=", ">", "==", "!=", "and", "or"]), children
        ).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["-", "+", "not "]), children).map(lambda t: f"({t[0]}{t[1]})"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(st.sampled_from(UNARY_FUNCTIONS), children).map(lambda t: f"{t[0]}({t[1]})"),
        st.lists(children, min_size=1, max_size=3).map(lambda a: f"max({', '.join(a)})"),
        pairs.map(lambda t: f"quantile({t[0]}, {t[1]})"),
        pairs.map(lambda t: f"round({t[0]}, {t[1]})"),
        pairs.map(lambda t: f"matches({t[0]}, {t[1]})"),
        st.tuples(children, st.sampled_from(["(1, 'relu')", "()", "u", "s", "m", "v"])).map(
            lambda t: f"({t[0]} in {t[1]})"
        ),
        children.map(lambda c: f"({c} is not None)"),
    )


GRAMMAR = st.recursive(ATOMS, _grow, max_leaves=10)

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_total(source: str) -> None:
    """parse and evaluate either succeed or raise a one-line RuleError, nothing else."""
    try:
        expression = parse(source, where="fuzz")
    except RuleError as err:
        assert len(str(err).splitlines()) == 1
        event("rejected by parse")
        return
    for env in envs(source):
        try:
            value = expression.evaluate(env)
        except RuleError as err:
            assert len(str(err).splitlines()) == 1
            event("rejected by evaluate")
            continue
        event("evaluated")
        try:
            assert truthy(value) in (True, False)
        except RuleError:
            assert isinstance(value, np.ndarray)


# Inputs the fuzz must get through in every run (CI included), 10,000 together: hypothesis
# may stop a run early when it believes a space exhausted, so each test counts what ran.
FUZZ_INPUTS = {"text": 4000, "token soup": 3500, "grammar": 2500}


def run_fuzz(strategy: st.SearchStrategy[str], examples: int) -> int:
    """Feed ``examples`` generated conditions through check_total; return how many ran."""
    ran = 0

    @settings(FUZZ, max_examples=examples)
    @given(source=strategy)
    def fuzz(source: str) -> None:
        nonlocal ran
        ran += 1
        check_total(source)

    fuzz()
    return ran


def test_fuzz_arbitrary_text_gives_a_value_or_a_rule_error():
    assert run_fuzz(st.text(max_size=40), FUZZ_INPUTS["text"]) >= FUZZ_INPUTS["text"]


def test_fuzz_token_soup_gives_a_value_or_a_rule_error():
    assert run_fuzz(TOKEN_SOUP, FUZZ_INPUTS["token soup"]) >= FUZZ_INPUTS["token soup"]


def test_fuzz_well_formed_expressions_give_a_value_or_a_rule_error():
    assert run_fuzz(GRAMMAR, FUZZ_INPUTS["grammar"]) >= FUZZ_INPUTS["grammar"]


ATHERIS_HARNESS = Path(__file__).parent / "fuzz" / "fuzz_expr_atheris.py"


@pytest.mark.skipif(sys.platform != "linux", reason="atheris installs from wheels on Linux")
def test_coverage_guided_fuzz_runs_ten_thousand_inputs_without_a_foreign_exception(tmp_path):
    """atheris (libFuzzer) mutates inputs towards new coverage of expr.py; the harness stops
    with a non-zero exit and a crash file on any exception other than RuleError."""
    result = subprocess.run(
        [sys.executable, str(ATHERIS_HARNESS), "-atheris_runs=10000", "-seed=1",
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 10000 in" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no crash or timeout artefacts
