"""The condition language of rule files: a small, safe expression language.

A rule's condition, such as ``mean(unit_active < 0.01) > 0.5 and kind in ("relu",)``,
is parsed with :mod:`ast` into a closed set of node types and compiled once into a
tree of closures. Nothing a rule file says ever reaches ``eval``, ``exec`` or
``compile``; anything outside the language is a :class:`RuleError` at parse time.

Values are numbers, booleans, strings, ``None`` and 1-D numpy arrays of per-unit
metrics. Arithmetic and comparisons on arrays are elementwise (numpy semantics) and
the allow-listed :data:`FUNCTIONS` aggregate them.

``None`` means "this metric does not apply here" and propagates: arithmetic,
comparisons and calls with a ``None`` operand give ``None``, ``and``/``or`` follow
three-valued logic, and :func:`truthy` reads ``None`` as false, so a rule whose
metrics do not apply does not fire. Numbers follow IEEE (``1 / 0`` is ``inf``,
comparisons with ``nan`` are false). Every failure, at parse time or at evaluation,
is a one-line :class:`RuleError`.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import functools
import math
import operator
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from modelcheck.errors import RuleError

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_SOURCE_CHARS",
    "Expression",
    "parse",
    "truthy",
]

MAX_SOURCE_CHARS = 2000
MAX_NODES = 500
MAX_DEPTH = 50

_Env = Mapping[str, object]
_Run = Callable[[_Env], object]

_CONSTANT_NAMES: Mapping[str, object] = MappingProxyType(
    {"true": True, "false": False, "null": None, "inf": math.inf, "nan": math.nan}
)
# Ints stay exact up to here; beyond it arithmetic switches to float, so a chain of
# multiplications cannot grow a number without bound.
_EXACT_INT = 2**63
_MISSING = object()
# What numpy and the builtins raise on bad operands; evaluation turns them into RuleError.
_OPERAND_ERRORS = (TypeError, ValueError, ArithmeticError)


class _Problem(Exception):
    """What went wrong, and where in the source once a node has claimed it."""

    def __init__(self, what: str, segment: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.segment = segment

    def located(self, segment: str, label: str = "") -> _Problem:
        """Claim the problem for a node, unless a node inside it already did."""
        if self.segment is None:
            self.segment = segment
            if label:
                self.what = f"{label} {self.what}"
        return self


def _failed(exc: Exception, segment: str, label: str) -> _Problem:
    """A problem for an error numpy or the builtins raised on bad operands."""
    return _Problem(f"{label} failed: {_one_line(str(exc)) or type(exc).__name__}", segment)


# ---------------------------------------------------------------------------- messages


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _message(where: str, what: str, source: str | None, segment: str | None = None) -> str:
    prefix = f"{_one_line(where)}: " if where.strip() else ""
    if source is None:
        return f"{prefix}{_one_line(what)}"
    text = source.strip()
    at = f" at {_clip(segment)!r}" if segment and segment.strip() != text else ""
    return f"{prefix}{_one_line(what)}{at} in {_clip(text)!r}"


def _suggest(name: str, candidates: Iterable[str], kind: str, limit: int = 8) -> str:
    """Up to 3 close matches, or else the first few candidates."""
    pool = sorted({c for c in candidates if isinstance(c, str)})
    close = difflib.get_close_matches(name, pool, n=3)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    if not pool:
        return ""
    more = f", … ({len(pool)} in all)" if len(pool) > limit else ""
    return f"; {kind} are {', '.join(pool[:limit])}{more}"


def _kind(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, Mapping):
        return "a mapping"
    simple = {bool: "a bool", int: "an int", float: "a float", str: "a string"}
    return simple.get(type(value), f"a {type(value).__name__}")


def _describe(value: object) -> str:
    if isinstance(value, (int, float)):
        return _clip(repr(value), 40)
    return _kind(value)


# ---------------------------------------------------------------------------- values


_PLAIN_TYPES = frozenset({bool, int, float, str, type(None)})


def _normalize(value: object) -> object:
    """Turn numpy scalars into Python ones and lists of numbers into arrays."""
    if type(value) in _PLAIN_TYPES:  # most values: rules run thousands of evaluations
        return value
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):  # ragged or odd: keep it as a list
            return value
        if array.ndim >= 1 and array.dtype.kind in "biuf":
            return array
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float))


def _is_exact_int(value: object) -> bool:
    return isinstance(value, int) and -_EXACT_INT <= value <= _EXACT_INT


def _to_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a double
        return math.inf if value > 0 else -math.inf


def _as_float(value: object) -> float | np.ndarray:
    """A number as a float, or an array of numbers as a float array."""
    if _is_number(value):
        return _to_float(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.astype(np.float64, copy=False)
    raise _Problem(f"needs numbers, got {_kind(value)}")


def _values(value: object) -> np.ndarray:
    """The numbers of value as a flat float array, for aggregations."""
    return np.ravel(_as_float(value))


def _scalar_or_array(result: object) -> object:
    return result if isinstance(result, np.ndarray) else _normalize(result)


def _truth(value: object) -> object:
    """Truth as None, a bool or a bool array; nan is false."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        if kind == "b":
            return value
        if kind in "iu":
            return value != 0
        if kind == "f":
            return (value != 0) & ~np.isnan(value)
        raise _Problem(f"needs numbers or booleans, got {_kind(value)}")
    if isinstance(value, float):
        return not (value == 0 or math.isnan(value))
    return bool(value)


def _negated(truth: object) -> object:
    if truth is None:
        return None
    if isinstance(truth, np.ndarray):
        return ~truth
    return not truth


def _as_bool(result: object) -> object:
    if isinstance(result, np.ndarray):
        return result.astype(bool, copy=False)
    return bool(result)


def truthy(value: object) -> bool:
    """Whether a condition's value makes the rule fire: None and nan do not."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return False
    if isinstance(value, np.ndarray):
        raise RuleError("condition gave an array; aggregate it with any()/all()/mean()")
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


# ---------------------------------------------------------------------------- operators


@dataclass(frozen=True, slots=True)
class _Arithmetic:
    symbol: str
    ufunc: np.ufunc
    exact: Callable[[int, int], int] | None  # int arithmetic, where it is exact and cheap
    divides: bool = False


_ARITHMETIC: Mapping[type, _Arithmetic] = MappingProxyType(
    {
        ast.Add: _Arithmetic("+", np.add, operator.add),
        ast.Sub: _Arithmetic("-", np.subtract, operator.sub),
        ast.Mult: _Arithmetic("*", np.multiply, operator.mul),
        ast.Div: _Arithmetic("/", np.true_divide, None),
        ast.FloorDiv: _Arithmetic("//", np.floor_divide, operator.floordiv, divides=True),
        ast.Mod: _Arithmetic("%", np.remainder, operator.mod, divides=True),
        # Powers are always float: a huge exponent then overflows to inf at once.
        ast.Pow: _Arithmetic("**", np.power, None),
    }
)

_REJECTED_OPERATORS: Mapping[type, str] = MappingProxyType(
    {
        ast.MatMult: "'@' is not allowed",
        ast.BitAnd: "'&' is not allowed; use 'and'",
        ast.BitOr: "'|' is not allowed; use 'or'",
        ast.BitXor: "'^' is not allowed; use '**' for powers",
        ast.LShift: "'<<' is not allowed",
        ast.RShift: "'>>' is not allowed",
        ast.Invert: "'~' is not allowed; use 'not'",
    }
)

_COMPARISONS: Mapping[type, Callable[[object, object], object]] = MappingProxyType(
    {
        ast.Lt: operator.lt,
        ast.LtE: operator.le,
        ast.Gt: operator.gt,
        ast.GtE: operator.ge,
        ast.Eq: operator.eq,
        ast.NotEq: operator.ne,
    }
)


def _arithmetic(op: _Arithmetic, a: object, b: object) -> object:
    if a is None or b is None:
        return None
    if op.exact and _is_exact_int(a) and _is_exact_int(b) and not (op.divides and b == 0):
        return op.exact(a, b)
    try:
        x, y = _as_float(a), _as_float(b)
    except _Problem:
        raise _Problem(f"{op.symbol!r} needs numbers, got {_kind(a)} and {_kind(b)}") from None
    return _scalar_or_array(op.ufunc(x, y))


def _sign(symbol: str, value: object) -> object:
    if value is None:
        return None
    if isinstance(value, int):
        return -value if symbol == "-" else +value
    try:
        number = _as_float(value)
    except _Problem:
        raise _Problem(f"unary {symbol!r} needs a number, got {_kind(value)}") from None
    return -number if symbol == "-" else number


def _compare(test: Callable[[object, object], object], a: object, b: object) -> object:
    if a is None or b is None:
        return None
    return _as_bool(test(a, b))


def _is_none(a: object, b: object) -> bool:
    return a is None


def _is_not_none(a: object, b: object) -> bool:
    return a is not None


def _member(item: object, container: object) -> object:
    """`item in container`, elementwise when item is an array."""
    if item is None or container is None:
        return None
    if isinstance(container, np.ndarray):
        return _as_bool(np.isin(item, container))
    if isinstance(container, (tuple, list, set, frozenset)):
        found: object = False
        for element in container:
            found = found | _as_bool(item == element)
        return found
    if isinstance(container, str):
        if not isinstance(item, str):
            raise _Problem(f"'in' a string needs a string on the left, got {_kind(item)}")
        return item in container
    if isinstance(container, Mapping):
        if isinstance(item, np.ndarray):
            raise _Problem("'in' a mapping needs a single key on the left, got an array")
        return item in container
    raise _Problem(f"'in' needs a list, an array, a string or a mapping, got {_kind(container)}")


def _not_member(item: object, container: object) -> object:
    return _negated(_member(item, container))


def _conjunction(truths: Iterable[object]) -> object:
    """Three-valued and: False wins, then None, then elementwise and of arrays."""
    unknown = False
    arrays: list[np.ndarray] = []
    for truth in truths:
        if truth is None:
            unknown = True
        elif isinstance(truth, np.ndarray):
            arrays.append(truth)
        elif not truth:
            return False
    if unknown:
        return None
    return functools.reduce(np.logical_and, arrays) if arrays else True


def _disjunction(truths: Iterable[object]) -> object:
    """Three-valued or: True wins, then None, then elementwise or of arrays."""
    unknown = False
    arrays: list[np.ndarray] = []
    for truth in truths:
        if truth is None:
            unknown = True
        elif isinstance(truth, np.ndarray):
            arrays.append(truth)
        elif truth:
            return True
    if unknown:
        return None
    return functools.reduce(np.logical_or, arrays) if arrays else False


# ---------------------------------------------------------------------------- functions


def _abs(x: object) -> object:
    if isinstance(x, int):
        return abs(int(x))
    return _scalar_or_array(np.abs(_as_float(x)))


def _elementwise(ufunc: np.ufunc) -> Callable[[object], object]:
    def apply(x: object) -> object:
        return _scalar_or_array(ufunc(_as_float(x)))

    return apply


def _extreme(reduce: Callable[[np.ndarray], object], pairwise: np.ufunc) -> Callable[..., object]:
    def apply(*args: object) -> object:
        if len(args) == 1:
            values = _values(args[0])
            return float(reduce(values)) if values.size else None
        return _scalar_or_array(functools.reduce(pairwise, [_as_float(a) for a in args]))

    return apply


def _aggregate(reduce: Callable[[np.ndarray], object]) -> Callable[[object], object]:
    def apply(x: object) -> object:
        values = _values(x)
        return float(reduce(values)) if values.size else None

    return apply


def _count(x: object) -> int:
    truth = _truth(x)
    if isinstance(truth, np.ndarray):
        return int(np.count_nonzero(truth))
    return int(bool(truth))


def _quantifier(reduce: Callable[[np.ndarray], object]) -> Callable[[object], object]:
    def apply(x: object) -> object:
        truth = _truth(x)
        if isinstance(truth, np.ndarray):
            return bool(reduce(truth)) if truth.size else None
        return bool(truth)

    return apply


def _len(x: object) -> int:
    if isinstance(x, np.ndarray):
        return int(x.size)
    if isinstance(x, (str, list, tuple, set, frozenset, Mapping)):
        return len(x)
    raise _Problem(f"needs an array, a string or a list, got {_kind(x)}")


def _end(index: int) -> Callable[[object], object]:
    def apply(x: object) -> object:
        if _is_number(x):
            return x
        if isinstance(x, np.ndarray):
            flat = x.ravel()
            return _normalize(flat[index]) if flat.size else None
        if isinstance(x, (list, tuple)):
            return _normalize(x[index]) if x else None
        raise _Problem(f"needs an array, got {_kind(x)}")

    return apply


def _quantile(x: object, q: object) -> object:
    if isinstance(q, bool) or not _is_number(q) or not 0 <= q <= 1:
        raise _Problem(f"needs q between 0 and 1, got {_describe(q)}")
    values = _values(x)
    return float(np.quantile(values, float(q))) if values.size else None


def _round(x: object, digits: object = 0) -> object:
    if isinstance(digits, bool) or not (
        isinstance(digits, int) or (isinstance(digits, float) and digits.is_integer())
    ):
        raise _Problem(f"needs a whole number of digits, got {_describe(digits)}")
    places = max(-400, min(400, int(digits)))
    number = _as_float(x)
    rounded = np.round(number, places)
    # numpy scales by 10**places, which overflows for extreme places; the answer
    # there is the number itself (many digits) or zero (rounding to huge powers of 10).
    fallback = number if places > 0 else 0.0 * number
    result = np.where(np.isfinite(rounded) | ~np.isfinite(number), rounded, fallback)
    return result if isinstance(number, np.ndarray) else float(result)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, values.size])
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(starts + (sizes - 1) / 2, sizes)
    return ranks


def _spearman_numpy(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float(np.clip(np.dot(rx, ry) / math.sqrt(np.dot(rx, rx) * np.dot(ry, ry)), -1, 1))


@functools.cache
def _scipy_spearmanr() -> Callable[..., object] | None:
    try:
        from scipy.stats import spearmanr
    except ImportError:  # scipy is optional here; the numpy version gives the same numbers
        return None
    return spearmanr


def _spearman(x: object) -> object:
    values = _values(x)
    index = np.flatnonzero(np.isfinite(values))
    values = values[index]
    if values.size < 3 or values.min() == values.max():
        return None  # no trend is defined
    spearmanr = _scipy_spearmanr()
    if spearmanr is None:
        return _spearman_numpy(index.astype(np.float64), values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(index, values)[0])


def _matches(name: object, pattern: object) -> bool:
    if not isinstance(name, str) or not isinstance(pattern, str):
        raise _Problem(f"needs two strings, got {_kind(name)} and {_kind(pattern)}")
    try:
        return fnmatch.fnmatchcase(name, pattern)
    except re.error as exc:
        raise _Problem(f"has a bad pattern: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Function:
    apply: Callable[..., object]
    min_args: int
    max_args: int | None  # None: any number
    doc: str


_TABLE: Mapping[str, _Function] = MappingProxyType(
    {
        "abs": _Function(_abs, 1, 1, "abs(x): absolute value, elementwise on arrays"),
        "min": _Function(
            _extreme(np.min, np.minimum),
            1,
            None,
            "min(x) or min(a, b, ...): smallest element of an array, or elementwise minimum",
        ),
        "max": _Function(
            _extreme(np.max, np.maximum),
            1,
            None,
            "max(x) or max(a, b, ...): largest element of an array, or elementwise maximum",
        ),
        "sqrt": _Function(_elementwise(np.sqrt), 1, 1, "sqrt(x): square root; nan below 0"),
        "log": _Function(_elementwise(np.log), 1, 1, "log(x): natural log; -inf at 0"),
        "log10": _Function(_elementwise(np.log10), 1, 1, "log10(x): base-10 log; -inf at 0"),
        "log2": _Function(_elementwise(np.log2), 1, 1, "log2(x): base-2 log; -inf at 0"),
        "exp": _Function(_elementwise(np.exp), 1, 1, "exp(x): e to the x; inf on overflow"),
        "isfinite": _Function(
            _elementwise(np.isfinite), 1, 1, "isfinite(x): true where x is neither inf nor nan"
        ),
        "round": _Function(
            _round, 1, 2, "round(x) or round(x, digits): round half to even, elementwise"
        ),
        "mean": _Function(_aggregate(np.mean), 1, 1, "mean(x): mean of an array; None if empty"),
        "median": _Function(
            _aggregate(np.median), 1, 1, "median(x): median of an array; None if empty"
        ),
        "sum": _Function(_aggregate(np.sum), 1, 1, "sum(x): sum of an array; None if empty"),
        "count": _Function(
            _count, 1, 1, "count(x): number of truthy elements (nan is false); 0 if empty"
        ),
        "any": _Function(
            _quantifier(np.any), 1, 1, "any(x): true if some element is truthy; None if empty"
        ),
        "all": _Function(
            _quantifier(np.all), 1, 1, "all(x): true if every element is truthy; None if empty"
        ),
        "len": _Function(_len, 1, 1, "len(x): number of elements of an array, string or list"),
        "first": _Function(_end(0), 1, 1, "first(x): first element of an array; None if empty"),
        "last": _Function(_end(-1), 1, 1, "last(x): last element of an array; None if empty"),
        "std": _Function(
            _aggregate(np.std), 1, 1, "std(x): population standard deviation; None if empty"
        ),
        "quantile": _Function(
            _quantile, 2, 2, "quantile(x, q): q-th quantile, 0 <= q <= 1, linear; None if empty"
        ),
        "spearman": _Function(
            _spearman,
            1,
            1,
            "spearman(x): rank correlation of the finite values with their index 0..n-1;"
            " None if fewer than 3 or constant",
        ),
        "matches": _Function(
            _matches, 2, 2, "matches(name, pattern): case-sensitive glob match (*, ?, [seq])"
        ),
    }
)

FUNCTIONS: Mapping[str, str] = MappingProxyType({name: f.doc for name, f in _TABLE.items()})
"""Allow-listed function name -> one-line description, for the docs."""


# ---------------------------------------------------------------------------- closures


def _constant(value: object) -> _Run:
    return lambda env: value


def _lookup(name: str, segment: str) -> _Run:
    def run(env: _Env) -> object:
        value = env.get(name, _MISSING)
        if value is _MISSING:
            raise _Problem(f"name {name!r} is not defined{_suggest(name, env, 'names')}", segment)
        return _normalize(value)

    return run


def _subscript(mapping: _Run, name: str, key: str, segment: str) -> _Run:
    def run(env: _Env) -> object:
        value = mapping(env)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise _Problem(f"{name!r} is {_kind(value)}, not a mapping of metrics", segment)
        return _normalize(value.get(key))  # a metric that is not there does not apply

    return run


def _binary(op: _Arithmetic, left: _Run, right: _Run, segment: str) -> _Run:
    def run(env: _Env) -> object:
        a, b = left(env), right(env)
        try:
            return _arithmetic(op, a, b)
        except _Problem as problem:
            problem.located(segment)
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, repr(op.symbol)) from exc

    return run


def _unary(symbol: str, operand: _Run, segment: str) -> _Run:
    def run(env: _Env) -> object:
        value = operand(env)
        try:
            return _negated(_truth(value)) if symbol == "not" else _sign(symbol, value)
        except _Problem as problem:
            problem.located(segment, "'not'" if symbol == "not" else "")
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, repr(symbol)) from exc

    return run


def _logic(word: str, operands: list[_Run], segment: str) -> _Run:
    combine = _conjunction if word == "and" else _disjunction

    def run(env: _Env) -> object:
        try:
            return combine(_truth(operand(env)) for operand in operands)
        except _Problem as problem:
            problem.located(segment, repr(word))
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, repr(word)) from exc

    return run


_Test = Callable[[object, object], object]


def _chain(first: _Run, tests: list[tuple[_Test, _Run]], segment: str) -> _Run:
    def outcomes(env: _Env) -> Iterable[object]:
        left = first(env)
        for test, operand in tests:
            right = operand(env)
            yield test(left, right)
            left = right

    def run(env: _Env) -> object:
        try:
            return _conjunction(outcomes(env))
        except _Problem as problem:
            problem.located(segment)
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, "comparison") from exc

    return run


def _choice(test: _Run, body: _Run, orelse: _Run, segment: str) -> _Run:
    def run(env: _Env) -> object:
        try:
            condition = _truth(test(env))
            if condition is None:
                return None
            if not isinstance(condition, np.ndarray):
                return body(env) if condition else orelse(env)
            a, b = body(env), orelse(env)  # an array condition picks elementwise
            if a is None or b is None:
                return None
            return np.where(condition, _as_float(a), _as_float(b))
        except _Problem as problem:
            problem.located(segment, "'if'")
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, "'if'") from exc

    return run


def _call(name: str, function: _Function, args: list[_Run], segment: str) -> _Run:
    def run(env: _Env) -> object:
        values = [arg(env) for arg in args]
        if any(value is None for value in values):
            return None
        try:
            return function.apply(*values)
        except _Problem as problem:
            problem.located(segment, f"{name}()")
            raise
        except _OPERAND_ERRORS as exc:
            raise _failed(exc, segment, f"{name}()") from exc

    return run


# ---------------------------------------------------------------------------- compiler

_REJECTED: Mapping[type, str] = MappingProxyType(
    {
        ast.Attribute: 'attribute access (a.b) is not allowed; use a name or name["metric"]',
        ast.Lambda: "lambda is not allowed",
        ast.ListComp: "comprehensions are not allowed; use any(), all(), count() or mean()",
        ast.SetComp: "comprehensions are not allowed",
        ast.DictComp: "comprehensions are not allowed",
        ast.GeneratorExp: "generator expressions are not allowed; use any(), all() or count()",
        ast.JoinedStr: "f-strings are not allowed",
        ast.FormattedValue: "f-strings are not allowed",
        ast.NamedExpr: "assignment (:=) is not allowed",
        ast.Dict: "dict displays are not allowed",
        ast.Set: "set displays are not allowed",
        ast.List: "lists are only allowed on the right of 'in'",
        ast.Tuple: "tuples are only allowed on the right of 'in'",
        ast.Slice: "slices are not allowed",
        ast.Starred: "starred expressions (*a) are not allowed",
        ast.Await: "await is not allowed",
        ast.Yield: "yield is not allowed",
        ast.YieldFrom: "yield is not allowed",
    }
)


class _Compiler:
    """Checks an ast.expr against the language and builds its closures."""

    def __init__(self, text: str) -> None:
        self._bytes = text.encode("utf-8")
        self._line_starts = [0]
        for line in self._bytes.split(b"\n")[:-1]:
            self._line_starts.append(self._line_starts[-1] + len(line) + 1)
        self.names: dict[str, None] = {}  # ordered, so the first unknown name is reported
        self.functions: set[str] = set()

    def segment(self, node: ast.expr) -> str:
        # ast offsets are utf-8 byte columns
        start = self._line_starts[node.lineno - 1] + node.col_offset
        end = self._line_starts[node.end_lineno - 1] + node.end_col_offset
        return self._bytes[start:end].decode("utf-8", "replace")

    def reject(self, node: ast.AST, what: str) -> _Problem:
        return _Problem(what, self.segment(node) if isinstance(node, ast.expr) else None)

    def compile(self, node: ast.expr) -> _Run:
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is None:
            what = _REJECTED.get(type(node), f"{type(node).__name__} expressions are not allowed")
            raise self.reject(node, what)
        return handler(node)

    def _Constant(self, node: ast.Constant) -> _Run:
        value = node.value
        if isinstance(value, int) and not _is_exact_int(value):
            value = _to_float(value)  # huge literals are fine as floats
        if value is None or isinstance(value, (int, float, str)):
            return _constant(value)
        kind = {bytes: "bytes literals are", complex: "complex numbers are"}.get(
            type(value), "'...' is"
        )
        raise self.reject(node, f"{kind} not allowed")

    def _Name(self, node: ast.Name) -> _Run:
        if node.id in _CONSTANT_NAMES:
            return _constant(_CONSTANT_NAMES[node.id])
        self._check_name(node)
        self.names.setdefault(node.id)
        return _lookup(node.id, self.segment(node))

    def _check_name(self, node: ast.Name) -> None:
        if node.id.startswith("_"):
            raise self.reject(node, f"names starting with '_' ({node.id!r}) are not allowed")

    def _BinOp(self, node: ast.BinOp) -> _Run:
        op = _ARITHMETIC.get(type(node.op))
        if op is None:
            raise self.reject(node, _REJECTED_OPERATORS.get(type(node.op), "operator not allowed"))
        return _binary(op, self.compile(node.left), self.compile(node.right), self.segment(node))

    def _UnaryOp(self, node: ast.UnaryOp) -> _Run:
        symbol = {ast.USub: "-", ast.UAdd: "+", ast.Not: "not"}.get(type(node.op))
        if symbol is None:
            raise self.reject(node, _REJECTED_OPERATORS.get(type(node.op), "operator not allowed"))
        return _unary(symbol, self.compile(node.operand), self.segment(node))

    def _BoolOp(self, node: ast.BoolOp) -> _Run:
        word = "and" if isinstance(node.op, ast.And) else "or"
        return _logic(word, [self.compile(v) for v in node.values], self.segment(node))

    def _IfExp(self, node: ast.IfExp) -> _Run:
        parts = (self.compile(node.test), self.compile(node.body), self.compile(node.orelse))
        return _choice(*parts, self.segment(node))

    def _Compare(self, node: ast.Compare) -> _Run:
        first = self.compile(node.left)
        tests = [
            self._comparison(op, right)
            for op, right in zip(node.ops, node.comparators, strict=True)
        ]
        return _chain(first, tests, self.segment(node))

    def _comparison(self, op: ast.cmpop, right: ast.expr) -> tuple[_Test, _Run]:
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not _is_none_literal(right):
                raise self.reject(
                    right, "'is' is only allowed as 'is None' or 'is not None'; use '=='"
                )
            return (_is_none if isinstance(op, ast.Is) else _is_not_none), _constant(None)
        if isinstance(op, (ast.In, ast.NotIn)):
            test = _member if isinstance(op, ast.In) else _not_member
            return test, self._container(right)
        return functools.partial(_compare, _COMPARISONS[type(op)]), self.compile(right)

    def _container(self, node: ast.expr) -> _Run:
        if isinstance(node, ast.Name) and node.id not in _CONSTANT_NAMES:
            return self.compile(node)
        if isinstance(node, (ast.Tuple, ast.List)) and all(map(_is_literal, node.elts)):
            return _constant(tuple(self.compile(e)({}) for e in node.elts))
        raise self.reject(
            node, "the right side of 'in' must be a name or a list of literals like ('a', 'b')"
        )

    def _Call(self, node: ast.Call) -> _Run:
        name = self._function_name(node.func)
        function = _TABLE[name]
        if node.keywords:
            raise self.reject(node, f"keyword arguments are not allowed; {name}() takes positions")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.reject(arg, "starred arguments (*a) are not allowed")
        count, low, high = len(node.args), function.min_args, function.max_args
        if count < low or (high is not None and count > high):
            wanted = (
                f"{low}" if low == high else f"{low} or more" if high is None else f"{low}-{high}"
            )
            noun = "argument" if high == 1 else "arguments"
            raise self.reject(node, f"{name}() takes {wanted} {noun}, got {count}")
        self.functions.add(name)
        args = [self.compile(arg) for arg in node.args]
        return _call(name, function, args, self.segment(node))

    def _function_name(self, func: ast.expr) -> str:
        if isinstance(func, ast.Attribute):
            raise self.reject(func, "method calls (a.b()) are not allowed")
        if not isinstance(func, ast.Name):
            if type(func) in _REJECTED:
                self.compile(func)  # raises with the construct's own message
            raise self.reject(func, "only allow-listed functions can be called, by name")
        self._check_name(func)
        if func.id not in _TABLE:
            hint = _suggest(func.id, _TABLE, "allowed functions", len(_TABLE))
            raise self.reject(func, f"function {func.id!r} is not allowed{hint}")
        return func.id

    def _Subscript(self, node: ast.Subscript) -> _Run:
        if isinstance(node.slice, ast.Slice):
            raise self.reject(node, "slices are not allowed")
        key = node.slice
        value = node.value
        if (
            not isinstance(value, ast.Name)
            or value.id in _CONSTANT_NAMES
            or not isinstance(key, ast.Constant)
            or not isinstance(key.value, str)
        ):
            raise self.reject(node, 'only name["metric"] subscripts are allowed')
        return _subscript(self.compile(value), value.id, key.value, self.segment(node))


def _is_none_literal(node: ast.expr) -> bool:
    return (isinstance(node, ast.Constant) and node.value is None) or (
        isinstance(node, ast.Name) and node.id == "null"
    )


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
        if isinstance(node, ast.Constant):
            return _is_number(node.value)
        return isinstance(node, ast.Name) and node.id in ("inf", "nan")
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, (int, float, str))
    return isinstance(node, ast.Name) and node.id in _CONSTANT_NAMES


# ---------------------------------------------------------------------------- parse


@dataclass(frozen=True, slots=True)
class Expression:
    """A parsed condition: immutable, and cheap to evaluate again and again."""

    source: str
    names: frozenset[str]  # free variable names referenced
    functions: frozenset[str]  # function names called
    _run: _Run = field(repr=False, compare=False)
    _where: str = field(default="", repr=False, compare=False)

    def evaluate(self, env: Mapping[str, object]) -> object:
        """The value of the expression with its names bound by env."""
        if not isinstance(env, Mapping):
            what = f"evaluation needs a mapping of names to values, got {type(env).__name__}"
            raise RuleError(_message(self._where, what, self.source))
        with np.errstate(all="ignore"):  # IEEE results, not warnings
            return self.value_in(env)

    def value_in(self, env: Mapping[str, object]) -> object:
        """``evaluate`` inside the caller's ``np.errstate(all="ignore")``, for a caller that
        evaluates thousands of times: entering it costs more than most expressions do."""
        try:
            return _normalize(self._run(env))
        except _Problem as problem:
            message = _message(self._where, problem.what, self.source, problem.segment)
            raise RuleError(message) from problem.__cause__


def parse(
    source: str, *, known_names: Collection[str] | None = None, where: str = ""
) -> Expression:
    """Parse a condition; every problem with it is a one-line RuleError."""
    if not isinstance(source, str):
        what = f"an expression must be a string, got {type(source).__name__}"
        raise RuleError(_message(where, what, None))
    try:
        run, compiler = _compile(source)
        names = tuple(compiler.names)
        if known_names is not None:
            _check_known(names, known_names)
    except _Problem as problem:
        raise RuleError(_message(where, problem.what, source, problem.segment)) from None
    return Expression(source, frozenset(names), frozenset(compiler.functions), run, where)


def _compile(source: str) -> tuple[_Run, _Compiler]:
    if len(source) > MAX_SOURCE_CHARS:
        raise _Problem(
            f"expression is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}"
        )
    text = source.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise _Problem("empty expression")
    # The parentheses let a condition span several lines of a TOML string.
    wrapped = f"(\n{text}\n)"
    root = _syntax_tree(wrapped, text)
    _check_size(root)
    compiler = _Compiler(wrapped)
    return compiler.compile(root), compiler


def _syntax_tree(wrapped: str, text: str) -> ast.expr:
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences: not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(wrapped, mode="eval")
    except SyntaxError as exc:
        raise _Problem(_syntax_message(exc, text)) from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise _Problem(f"syntax error: {_one_line(str(exc)) or 'too complex to parse'}") from None
    root = tree.body
    if root.lineno == 1:  # our opening parenthesis was closed by the text itself
        if isinstance(root, ast.Tuple) and not root.elts:
            raise _Problem("empty expression")
        raise _Problem("syntax error: unbalanced parentheses")
    return root


def _syntax_message(exc: SyntaxError, text: str) -> str:
    what = f"syntax error: {_one_line(exc.msg or 'invalid syntax')}"
    line = (exc.lineno or 0) - 1  # the first line of the wrapped text is ours
    lines = text.split("\n")
    if not 1 <= line <= len(lines) or not exc.offset:
        return what
    if len(lines) == 1:
        return f"{what} at column {exc.offset}"
    return f"{what} at line {line}, column {exc.offset}"


def _check_size(root: ast.expr) -> None:
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise _Problem(f"expression has more than {MAX_NODES} parts; split the rule")
        if depth > MAX_DEPTH:
            raise _Problem(f"expression is nested more than {MAX_DEPTH} levels deep; simplify it")
        stack.extend(
            (child, depth + 1)
            for child in ast.iter_child_nodes(node)
            if not isinstance(
                child, (ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop)
            )
        )


def _check_known(names: Iterable[str], known_names: Collection[str]) -> None:
    known = set(known_names)
    for name in names:
        if name not in known:
            raise _Problem(f"unknown name {name!r}{_suggest(name, known, 'known names')}")
