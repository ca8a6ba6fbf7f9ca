"""The result of a check: findings plus every layer's statistics; renderers only read it.

``Report.to_dict`` is the JSON contract of DESIGN.md: keys are only ever added, never
renamed, and numbers that are not finite become null (with ``nonfinite`` counts saying
why), so any JSON parser can read it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelcheck.rules import SEVERITIES, Finding, Rule, severity_rank

if TYPE_CHECKING:  # the types only: renderers load without torch
    from modelcheck.stats import Distribution, LayerStats


@dataclass(frozen=True, slots=True)
class ModelInfo:
    source: str
    format: str
    type: str
    parameters: int
    trainable_parameters: int
    dtype: str
    device: str
    description: str


@dataclass(frozen=True, slots=True)
class ProbeInfo:
    source: str
    samples: int
    batches: int
    labels: bool
    loss: str
    train_mode: bool
    gradients: bool
    sample_size: int
    output_key: str = ""  # where in the model's output the checked output was, e.g. "['logits']"
    notes: tuple[str, ...] = ()  # how the run differed from a plain forward, and why


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one check found. ``ok`` is False when a finding reaches ``fail_on``."""

    version: str
    torch_version: str
    created: str
    model: ModelInfo
    probe: ProbeInfo
    layers: tuple[LayerStats, ...]
    input: Distribution | None
    output: Distribution | None
    findings: tuple[Finding, ...]
    rules: tuple[Rule, ...]
    fail_on: str
    # (rule code, layer or None for the model) pairs the rules looked at: the findings'
    # denominator, which JUnit output reports as passing test cases.
    checked: tuple[tuple[str, str | None], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failing

    @property
    def failing(self) -> tuple[Finding, ...]:
        """Findings at or above ``fail_on``."""
        if self.fail_on == "never":
            return ()
        bar = severity_rank(self.fail_on)
        return tuple(f for f in self.findings if severity_rank(f.severity) >= bar)

    @property
    def summary(self) -> dict[str, int]:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        return {"errors": counts["error"], "warnings": counts["warning"], "infos": counts["info"]}

    def layer(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(layer_names(self))}")

    def to_dict(self) -> dict:
        return _finite_or_null(self._as_dict())

    def _as_dict(self) -> dict:
        return {
            "version": self.version,
            "tool": {
                "modelcheck": self.version,
                "torch": self.torch_version,
                "created": self.created,
            },
            "model": _plain(self.model),
            "probe": _plain(self.probe),
            "layers": [_layer_dict(layer, depth) for depth, layer in enumerate(self.layers)],
            "findings": [_finding_dict(f) for f in self.findings],
            "summary": {**self.summary, "ok": self.ok, "fail_on": self.fail_on},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self) -> str:
        """The self-contained HTML report (inline CSS and SVG, nothing fetched)."""
        from modelcheck.html import render_html  # a renderer: only the HTML path pays for it

        return render_html(self)

    def write_html(self, path: str | os.PathLike[str]) -> None:
        """Write the HTML report to ``path`` atomically: all of it, or nothing."""
        write_atomic(path, self.to_html())


def layer_names(report: Report) -> list[str]:
    return [layer.name for layer in report.layers]


def number(value: float | None) -> float | None:
    """A JSON-safe number: NaN and infinities become None."""
    if value is None or not math.isfinite(value):
        return None
    return value


def _finite_or_null(value: object) -> object:
    """``value`` with every NaN and infinity, however deeply nested, replaced by None:
    NaN in the probe reaches quantiles and extremes, and must not break the JSON."""
    if isinstance(value, float):
        return number(value)
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _plain(info: ModelInfo | ProbeInfo) -> dict:
    return {name: getattr(info, name) for name in info.__slots__}


def layer_stats_dict(layer: LayerStats) -> dict[str, object]:
    """The flat ``stats`` object of one layer (DESIGN.md contract)."""
    d = layer.activation
    stats: dict[str, object] = dict.fromkeys(_DISTRIBUTION_KEYS)
    if d is not None:
        stats.update({key: getattr(d, key) for key in _DISTRIBUTION_KEYS})
    grad, pgrad = layer.output_grad, layer.param_grad
    stats.update(
        {
            "grad_rms": None if grad is None else grad.rms,
            "param_grad_rms": None if pgrad is None else pgrad.rms,
            "param_grad_mean_abs": None if pgrad is None else pgrad.mean_abs,
            "param_nonfinite": sum(p.nonfinite for p in layer.parameters),
            "buffer_nonfinite": layer.buffer_nonfinite,
        }
    )
    return {k: number(v) if isinstance(v, float) else v for k, v in stats.items()}


_DISTRIBUTION_KEYS = (
    "count", "mean", "std", "rms", "min", "max", "skewness", "kurtosis", "zero_fraction",
    "nonfinite", "units", "dead_fraction", "saturated_fraction", "saturated_value_fraction",
    "sample_size",
)  # fmt: skip


def _layer_dict(layer: LayerStats, depth: int) -> dict:
    d = layer.activation
    return {
        "name": layer.name,
        "type": layer.type,
        "family": layer.family,
        "depth": depth,
        "functional": layer.functional,
        "calls": layer.calls,
        "stats": layer_stats_dict(layer),
        "histogram": None
        if d is None or d.histogram is None
        else {"edges": list(d.histogram.edges), "counts": list(d.histogram.counts)},
        "quantiles": None if d is None or d.quantiles is None else list(d.quantiles),
        "parameters": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "mean": number(p.mean),
                "std": number(p.std),
                "min": number(p.min),
                "max": number(p.max),
                "fan_in": p.fan_in,
                "nonfinite": p.nonfinite,
            }
            for p in layer.parameters
        ],
    }


def _finding_dict(f: Finding) -> dict:
    return {
        "code": f.code,
        "rule": f.rule,
        "severity": f.severity,
        "layer": f.layer,
        "value": number(f.value),
        "threshold": number(f.threshold),
        "message": f.message,
        "fixes": list(f.fixes),
        "title": f.title,
        "deeper": f.deeper,
    }


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place,
    so a reader never sees half a report and a failure (or Ctrl-C) leaves nothing behind.

    The rename replaces a symlink at ``path`` rather than writing through it, and the
    file keeps the mode of the report it replaces, or gets the umask's like any new file
    (mkstemp's would be owner-only).
    """
    target = Path(path)
    fd, tmp = _create_beside(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            _keep_mode(handle.fileno(), target)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _create_beside(target: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _keep_mode(fd: int, target: Path) -> None:
    """Give a replacement report the mode of the one it replaces (a new one has the
    umask's, from os.open)."""
    with contextlib.suppress(FileNotFoundError):
        os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))
