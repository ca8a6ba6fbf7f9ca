"""Coverage-guided fuzzing of the rule condition language with atheris.

Random bytes become a condition (either read as text, or assembled from the
language's tokens so that many of them parse) and an env of random numbers, arrays
and None. ``parse`` and ``evaluate`` may return or raise RuleError; any other
exception is a bug, and atheris stops on it and saves the input that caused it.

    pip install atheris
    python tests/fuzz/fuzz_expr_atheris.py -atheris_runs=20000

This is a script, not a pytest test; it needs atheris, numpy and the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["modelcheck"]):
    from modelcheck.errors import RuleError
    from modelcheck.expr import FUNCTIONS, parse, truthy

NAMES = ["x", "y", "u", "v", "s", "m", "n"]
TOKENS = [
    *NAMES,
    *(f"{name}(" for name in FUNCTIONS),
    *["0", "1", "2.5", "1e308", "-1", "9", "99999999999999999999999", "inf", "nan"],
    *["true", "false", "null", "None", "True", "False", "'relu'", "'a*'", '"dead"'],
    *["+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!="],
    *["and", "or", "not", "in", "not in", "is", "is not", "if", "else"],
    *["(", ")", ")", ",", "[", "]", '["dead"]', "[0]", ":", "."],
    *["lambda", "for", ":=", "{", "}", "@", "~", "&", "*", "__import__", "f'{x}'", "\n"],
]
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


def _source(data: atheris.FuzzedDataProvider) -> str:
    if data.ConsumeBool():
        return data.ConsumeUnicodeNoSurrogates(data.ConsumeIntInRange(0, 120))
    count = data.ConsumeIntInRange(1, 16)
    return " ".join(TOKENS[data.ConsumeIntInRange(0, len(TOKENS) - 1)] for _ in range(count))


def test_one_input(raw: bytes) -> None:
    data = atheris.FuzzedDataProvider(raw)
    source = _source(data)
    env = {name: _value(data) for name in NAMES}
    try:
        expression = parse(source)
    except RuleError:
        return
    try:
        truthy(expression.evaluate(env))
    except RuleError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
