"""Coverage-guided fuzzing of the rule condition language with atheris.

Random bytes become a condition (either read as text, or assembled from the
language's tokens so that many of them parse) and an env of random numbers, arrays
and None. ``parse`` and ``evaluate`` may return or raise RuleError; any other
exception is a bug, and atheris stops on it and saves the input that caused it.

    pip install atheris
    python tests/fuzz/fuzz_expr_atheris.py -atheris_runs=20000

This is a script, not a pytest test; it needs only atheris and numpy (not torch).
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import atheris
import numpy as np

# modelcheck/__init__.py pulls in torch, which the condition language does not need:
# an empty package lets modelcheck.expr load in a venv with only atheris and numpy.
_package = types.ModuleType("modelcheck")
_package.__path__ = [str(Path(__file__).resolve().parents[2] / "modelcheck")]
sys.modules.setdefault("modelcheck", _package)

with atheris.instrument_imports(include=["modelcheck"]):
    from modelcheck.errors import RuleError
    from modelcheck.expr import FUNCTIONS, parse, truthy

NAMES = ["x", "y", "u", "v", "s", "m", "n"]
# Token mode alternates an operand and an operator, so that many conditions parse;
# now and then a token from outside the language, or a bracket, goes in between.
OPERANDS = [
    *NAMES,
    *(f"{name}({arg})" for name in FUNCTIONS for arg in ("u", "x")),
    *["min(u, 2)", "max(x, y, 1)", "round(u, 1)", "matches(s, 'r*')", "quantile(u, 0.5)"],
    *["0", "1", "2.5", "1e308", "-1", "9", "99999999999999999999999", "inf", "nan"],
    *["true", "false", "null", "None", "'relu'", "'a*'", 'm["dead"]', "(1, 'relu')", "()"],
]
OPERATORS = [
    *["+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!="],
    *["and", "or", "in", "not in", "is", "is not", "if", "else", "and not", "is None or"],
]
EXTRAS = ["(", ")", "not", "-", ",", "[", "]", "[0]", ":", ".", "lambda", "for", ":=", "{"]
EXTRAS += ["}", "@", "~", "&", "*", "__import__", "f'{x}'", "\n", "#", "\\", "'"]
SCALARS = [None, 0, 1, -3, 2.5, True, False, "relu", "", float("nan"), float("inf")]


def _value(data: atheris.FuzzedDataProvider) -> object:
    kind = data.ConsumeIntInRange(0, 4)
    if kind == 0:
        return SCALARS[data.ConsumeIntInRange(0, len(SCALARS) - 1)]
    if kind == 1:
        return data.ConsumeFloat()  # includes nan, inf and subnormals
    if kind == 2:
        return data.ConsumeIntInRange(-(2**70), 2**70)
    if kind == 3:
        return np.array(data.ConsumeFloatList(data.ConsumeIntInRange(0, 6)))
    return {"dead": data.ConsumeFloat(), "u": np.array(data.ConsumeFloatList(3))}


def _pick(data: atheris.FuzzedDataProvider, tokens: list[str]) -> str:
    return tokens[data.ConsumeIntInRange(0, len(tokens) - 1)]


def _source(data: atheris.FuzzedDataProvider) -> str:
    if data.ConsumeIntInRange(0, 3) == 0:
        return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 120))
    tokens = [_pick(data, OPERANDS)]
    for _ in range(data.ConsumeIntInRange(0, 8)):
        if data.ConsumeIntInRange(0, 7) == 0:
            tokens.append(_pick(data, EXTRAS))
        tokens += [_pick(data, OPERATORS), _pick(data, OPERANDS)]
    return " ".join(tokens)


def test_one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    source = _source(data)
    env = {name: _value(data) for name in NAMES}
    try:
        expression = parse(source)
    except RuleError:
        return
    with contextlib.suppress(RuleError):
        truthy(expression.evaluate(env))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
