"""Health baselines: a JSON snapshot of every layer's health metrics, checked in beside a
test, and a comparison that names which metric of which layer moved how far.

A reader of the Report, like the renderers. The pytest plugin binds the file to the
test's directory (``__modelcheck__/NAME.json``); the behaviour is pytest-regressions':
a missing baseline is written and the assertion fails saying so, a mismatch writes
``NAME.obtained.json`` beside it and fails listing only the metrics that moved past
their tolerance, and an update rewrites the baseline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelcheck.errors import ConfigError
from modelcheck.renderers import format_number
from modelcheck.report import Report, layer_stats_dict, write_atomic

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Tolerance:
    """``|obtained - expected| <= atol + rtol * |expected|``, the rule of numpy.isclose."""

    atol: float = 0.0
    rtol: float = 0.0

    def allows(self, expected: float, obtained: float) -> bool:
        return abs(obtained - expected) <= self.atol + self.rtol * abs(expected)

    def __str__(self) -> str:
        parts = [f"±{format_number(self.atol)}"] if self.atol else []
        parts += [f"±{self.rtol:.0%}"] if self.rtol else []
        return " + ".join(parts) or "exact"


# What a layer's health is judged by, and how far each may drift before a test fails.
# Fractions move in absolute terms; scales (rms, gradients) in relative terms; shape
# statistics rest on a sample of at most sample_size values per batch, so they get both.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "rms": Tolerance(rtol=0.1),
    "std": Tolerance(rtol=0.1),
    "zero_fraction": Tolerance(atol=0.02),
    "dead_fraction": Tolerance(atol=0.02),
    "saturated_fraction": Tolerance(atol=0.02),
    "skewness": Tolerance(atol=0.25, rtol=0.1),
    "kurtosis": Tolerance(atol=0.5, rtol=0.1),
    "grad_rms": Tolerance(rtol=0.25),
    "param_grad_rms": Tolerance(rtol=0.25),
    "nonfinite": Tolerance(),
}
METRICS = tuple(DEFAULT_TOLERANCES)


@dataclass(frozen=True, slots=True)
class Difference:
    """One metric of one layer past its tolerance, or (``note``) a layer that appeared
    or disappeared."""

    layer: str
    metric: str | None = None
    expected: float | None = None
    obtained: float | None = None
    tolerance: Tolerance | None = None
    note: str = ""

    def describe(self, width: int) -> str:
        if self.note:
            return f"{self.layer:<{width}}  {self.note}"
        line = f"{self.layer:<{width}}  {self.metric:<18}  "
        line += f"{format_number(self.expected)} -> {format_number(self.obtained)}"
        if self.expected is not None and self.obtained is not None:
            delta = self.obtained - self.expected
            moved = f"{'+' if delta >= 0 else ''}{format_number(delta)}"
            if self.expected and self.tolerance and not self.tolerance.atol:  # a relative one
                moved += f", {'+' if delta >= 0 else ''}{delta / abs(self.expected):.0%}"
            line += f"  ({moved}; tolerance {self.tolerance})"
        return line


def snapshot(report: Report) -> dict:
    """The baseline document: each layer's metrics in execution order, rounded to six
    significant digits so that a checked-in file diffs readably."""
    layers = {}
    for layer in report.layers:
        stats = layer_stats_dict(layer)
        layers[layer.name] = {metric: _rounded(stats.get(metric)) for metric in METRICS}
    return {
        "modelcheck-baseline": FORMAT_VERSION,
        "model": report.model.type,
        "probe": report.probe.source,
        "samples": report.probe.samples,
        "layers": layers,
    }


def _rounded(value: object) -> float | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return None


def tolerances_from(overrides: Mapping[str, object] | None) -> dict[str, Tolerance]:
    """Defaults with ``{"rms": {"rtol": 0.2}, "dead_fraction": {"atol": 0.05}}`` applied."""
    merged = dict(DEFAULT_TOLERANCES)
    for metric, spec in (overrides or {}).items():
        if metric not in merged:
            raise ConfigError(
                f"tolerances: {metric!r} is not a baseline metric; known: {', '.join(METRICS)}"
            )
        if not isinstance(spec, Mapping) or set(spec) - {"atol", "rtol"}:
            raise ConfigError(
                f"tolerances.{metric}: expected a mapping like {{'atol': 0.02, 'rtol': 0.1}}"
            )
        for key, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"tolerances.{metric}.{key}: expected a number >= 0")
        merged[metric] = Tolerance(**{k: float(v) for k, v in spec.items()})
    return merged


def compare(
    expected: Mapping[str, object], obtained: Mapping[str, object], tolerances: Mapping
) -> list[Difference]:
    """Every layer metric that moved past its tolerance, in the obtained layer order,
    then layers that are gone."""
    before = expected.get("layers", {})
    after = obtained["layers"]
    found = []
    for layer, metrics in after.items():
        if layer not in before:
            found.append(Difference(layer, note="new layer, not in the baseline"))
            continue
        for metric, value in metrics.items():
            old = before[layer].get(metric)
            tolerance = tolerances[metric]
            same = old is None and value is None
            if not same and (old is None or value is None or not tolerance.allows(old, value)):
                found.append(Difference(layer, metric, old, value, tolerance))
    found += [Difference(layer, note="layer gone") for layer in before if layer not in after]
    return found


def assert_matches(
    report: Report,
    path: str | Path,
    *,
    tolerances: Mapping[str, object] | None = None,
    update: bool = False,
    update_hint: str = "pass update=True",
) -> str:
    """Compare ``report`` with the baseline at ``path`` and return "matched"; or rewrite
    it under ``update`` and return "updated". A missing baseline is written and raises
    AssertionError saying so; a mismatch raises one naming what moved."""
    __tracebackhide__ = True
    path = Path(path)
    limits = tolerances_from(tolerances)
    obtained = snapshot(report)
    obtained_path = path.with_name(f"{path.stem}.obtained{path.suffix}")
    if update or not path.exists():
        _write(path, obtained)
        obtained_path.unlink(missing_ok=True)
        if update:
            return "updated"
        raise AssertionError(
            f"modelcheck: baseline {path} did not exist; it was created now from this run. "
            "Check it in: later runs compare against it."
        )
    try:
        expected = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AssertionError(
            f"modelcheck: cannot read baseline {path} ({error}); {update_hint} to rewrite it"
        ) from None
    differences = compare(expected, obtained, limits)
    if not differences:
        obtained_path.unlink(missing_ok=True)
        return "matched"
    _write(obtained_path, obtained)
    width = max(len(d.layer) for d in differences)
    lines = [
        f"modelcheck: {_count(differences)} moved past the baseline {path}:",
        *(f"  {d.describe(width)}" for d in differences),
        f"This run's values are in {obtained_path}; if the change is intended, {update_hint} "
        "to accept them.",
    ]
    raise AssertionError("\n".join(lines))


def _count(differences: list[Difference]) -> str:
    n = len(differences)
    layers = len({d.layer for d in differences})
    return f"{n} health metric{'s' if n != 1 else ''} of {layers} layer{'s' if layers != 1 else ''}"


def _write(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
