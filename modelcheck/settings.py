"""Every setting of a check, declared once: name, default, type and one line of doc.

The same table validates keyword arguments of ``modelcheck.check()``, command-line
flags and ``[tool.modelcheck]`` tables. Layers apply in a fixed order — built-in
defaults, then a configuration file, then arguments — and the result is a frozen
``Settings``. An unknown key or a bad value is a ConfigError naming where it came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from modelcheck.errors import ConfigError

SEVERITY_CHOICES = ("error", "warning", "info", "never")
LOSS_CHOICES = ("auto", "cross_entropy", "mse", "bce")
DATASETS = ("iris", "digits", "wine", "breast_cancer")
"""scikit-learn's bundled datasets that ``probe`` may name."""
DEFAULT_SAMPLE_SIZE = 16_384
SEED_MAX = 2**32 - 1
"""The largest seed: torch's generators take 64 bits, and modelcheck seeds them with the
seed plus an offset."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved settings of one check."""

    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    extend_select: tuple[str, ...] = ()
    fail_on: str = "error"
    loss: str = "auto"
    train_mode: bool = False
    gradients: bool = True
    batch_size: int = 64
    max_samples: int | None = None
    seed: int = 0
    sample_size: int = DEFAULT_SAMPLE_SIZE
    probe: str | None = None
    rules: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    per_layer_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    extend_rules: tuple[str, ...] = ()
    output_key: str | None = None
    forward_kwargs: Mapping[str, object] = field(default_factory=dict)
    unit_axes: Mapping[str, int] = field(default_factory=dict)
    progress: bool = True

    def updated(self, values: Mapping[str, object], where: str) -> Settings:
        """A copy with ``values`` (snake_case or kebab-case keys) validated and applied."""
        changes = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            option = OPTIONS.get(name)
            if option is None:
                known = sorted(k.replace("_", "-") for k in OPTIONS)
                close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise ConfigError(f"{where}: unknown setting {key!r}; {hint}")
            changes[name] = option.convert(value, f"{where}: {key}")
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Option:
    doc: str
    convert: Callable[[object, str], object]


def _choice(choices: tuple[str, ...]) -> Callable[[object, str], str]:
    def convert(value: object, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return str(value)

    return convert


def _boolean(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _integer(
    minimum: int, optional: bool = False, maximum: int | None = None
) -> Callable[[object, str], int | None]:
    def convert(value: object, where: str) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{where}: expected an integer <= {maximum}, got {value!r}")
        return value

    return convert


def _names(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(v.strip() for v in value)


def _optional_names(value: object, where: str) -> tuple[str, ...] | None:
    return None if value is None else _names(value, where)


def _optional_text(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _rule_overrides(value: object, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of rule -> {{setting = value}}")
    result = {}
    for rule, overrides in value.items():
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}.{rule}: expected a table like {{ error = 0.6 }}")
        result[str(rule)] = dict(overrides)
    return result


def _layer_ignores(value: object, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where}: expected a table like {{ "head.*" = ["saturation"] }}')
    return {str(glob): _names(rules, f"{where}.{glob}") for glob, rules in value.items()}


def _keywords(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"{where}: expected a table of argument name -> value, e.g. {{ sr = 16000 }}"
        )
    return dict(value)


def _unit_axes(value: object, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise ConfigError(
            f'{where}: expected a table of layer pattern -> axis, e.g. {{ "rnn*" = -1 }}'
        )
    return dict(value)


OPTIONS: Mapping[str, Option] = {
    "select": Option(
        "rules to check: codes, code prefixes or slugs (default: all)", _optional_names
    ),
    "ignore": Option("rules not to check", _names),
    "extend_select": Option("rules to check on top of select", _names),
    "fail_on": Option(
        "lowest severity that fails the check (error, warning, info, never)",
        _choice(SEVERITY_CHOICES),
    ),
    "loss": Option("loss used with labels (auto, cross_entropy, mse, bce)", _choice(LOSS_CHOICES)),
    "train_mode": Option("run the model in train mode (dropout on, batch statistics)", _boolean),
    "gradients": Option("run the backward pass and check gradients", _boolean),
    "batch_size": Option("probe samples per batch", _integer(1)),
    "max_samples": Option("use at most this many probe samples", _integer(1, optional=True)),
    "seed": Option(
        "seed of the random probe, the surrogate loss and the sampling",
        _integer(0, maximum=SEED_MAX),
    ),
    "sample_size": Option(
        "values sampled per layer and batch for moments and histograms (a probe of more "
        "than 16 batches spreads 16 batches' worth over all of them)",
        _integer(16),
    ),
    "probe": Option("default probe (file, dataset name or 'random')", _optional_text),
    "rules": Option(
        "per-rule thresholds and parameters, e.g. dead-units = { error = 0.6 }", _rule_overrides
    ),
    "per_layer_ignores": Option(
        'rules ignored on matching layers, e.g. "head.*" = ["saturation"]', _layer_ignores
    ),
    "extend_rules": Option("extra rule files (globs) to load beside the built-in ones", _names),
    "output_key": Option(
        "part of the model's output the loss uses: a key, attribute or index (default: "
        "logits, sentence_embedding or last_hidden_state, else the first float tensor)",
        _optional_text,
    ),
    "forward_kwargs": Option(
        'keyword arguments for every forward call besides the probe, e.g. {"sr": 16000}',
        _keywords,
    ),
    "unit_axes": Option(
        'axis of the units per layer pattern, e.g. "encoder.*" = -1 (default: features of '
        "Linear, channels of Conv/BatchNorm, last dim of sequence layers)",
        _unit_axes,
    ),
    "progress": Option(
        "progress bar on stderr for checks over a second (never off a terminal or in pytest)",
        _boolean,
    ),
}
