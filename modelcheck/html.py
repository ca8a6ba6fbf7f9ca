"""The HTML renderer: a Report becomes one self-contained page a reviewer reads in a minute.

Python decides everything here — every label, number format, CSS class and SVG coordinate
— and hands the templates in ``reports/`` a finished, plain view model; they only
substitute, loop and test booleans, with autoescape on, so a model's strings can never
become markup. Charts are inline SVG drawn from that geometry: the page fetches nothing,
runs no script (its toggles are CSS), opens offline and prints.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import jinja2
import numpy as np

from modelcheck.families import ACTIVATION_FAMILIES
from modelcheck.metrics import has_gradient_stacks, reference_values
from modelcheck.renderers import format_number
from modelcheck.report import Report
from modelcheck.rules import Finding, Rule, severity_rank
from modelcheck.stats import (
    DEAD_BELOW,
    RESERVOIR_SIZE,
    SAMPLED_ERROR_BOUNDS,
    SAMPLED_MOMENTS_MEASURED,
    SATURATED_FROM,
    Distribution,
    LayerStats,
)

COLLAPSE_FROM = 16
"""From this many layers on, healthy layer cards start collapsed: flagged ones stay open."""

MAX_STRIP_CELLS = 128
"""Per-unit strips show at most this many cells; wider layers share cells between units."""

MAX_ALSO = 40
"""A finding links at most this many of the deeper layers that also cross its threshold."""

OVERVIEW_NAMES_UP_TO = 40
"""The depth overview labels its axis with layer names up to this many layers, else depths."""

# -- the view model ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    text: str
    href: str


@dataclass(frozen=True, slots=True)
class Fact:
    label: str
    value: str
    css: str = ""


@dataclass(frozen=True, slots=True)
class Key:
    """A legend entry: a swatch styled by ``css``, then its text."""

    css: str
    text: str


@dataclass(frozen=True, slots=True)
class Count:
    label: str
    value: int
    css: str


@dataclass(frozen=True, slots=True)
class Rect:
    x: str
    y: str
    w: str
    h: str
    css: str
    title: str = ""
    href: str = ""


@dataclass(frozen=True, slots=True)
class Path:
    d: str
    css: str


@dataclass(frozen=True, slots=True)
class Mark:
    """A data point: a circle with a tooltip, linking to its layer's card."""

    x: str
    y: str
    r: str
    css: str
    title: str
    href: str


@dataclass(frozen=True, slots=True)
class Text:
    x: str
    y: str
    text: str
    css: str = ""
    anchor: str = "start"
    transform: str = ""


@dataclass(frozen=True, slots=True)
class Group:
    """SVG elements drawn in order: rects, paths, marks, texts; ``css`` classes the <g>."""

    css: str = ""
    rects: tuple[Rect, ...] = ()
    paths: tuple[Path, ...] = ()
    marks: tuple[Mark, ...] = ()
    texts: tuple[Text, ...] = ()


@dataclass(frozen=True, slots=True)
class Svg:
    width: int
    height: int
    label: str
    css: str
    groups: tuple[Group, ...]
    stretch: bool = False  # True: fill the box whatever its aspect (per-unit strips)


@dataclass(frozen=True, slots=True)
class Banner:
    verdict: str
    detail: str
    css: str
    counts: tuple[Count, ...]
    headline: Link | None  # the worst finding's message, linking to its layer
    headline_where: str
    headline_css: str
    facts: tuple[Fact, ...]


@dataclass(frozen=True, slots=True)
class FindingView:
    anchor: str
    severity: str
    css: str
    code: str
    slug: str
    title: str
    rule_href: str
    layer: Link | None
    measured: str
    message: str
    why: str
    full: bool  # the first finding of its rule shows why and fixes open; repeats fold them
    fixes: tuple[str, ...]
    fixes_label: str
    also: tuple[Link, ...]  # the deeper layers that cross too
    also_label: str
    also_more: str


@dataclass(frozen=True, slots=True)
class Strip:
    """One chart of the depth overview."""

    title: str
    note: str
    legend: tuple[Key, ...]
    svg: Svg | None
    empty: str


@dataclass(frozen=True, slots=True)
class UnitStrip:
    svg: Svg
    caption: str
    legend: tuple[Key, ...]
    listed: str  # "Dead units: 2, 5, 9" or ""


@dataclass(frozen=True, slots=True)
class Row:
    cells: tuple[str, ...]
    css: str


@dataclass(frozen=True, slots=True)
class LayerRow:
    depth: str
    name: Link
    type: str
    numbers: tuple[str, ...]
    findings: str
    css: str


@dataclass(frozen=True, slots=True)
class Badge:
    text: str
    css: str
    href: str


@dataclass(frozen=True, slots=True)
class LayerCard:
    anchor: str
    depth: str
    name: str
    type: str
    css: str
    flagged: bool
    open: bool
    badges: tuple[Badge, ...]
    summary: str
    thumbnail: Svg | None  # shown in the header while the card is collapsed
    histogram: Svg | None
    note: str
    stats: tuple[Fact, ...]
    gradients: str
    units_strip: UnitStrip | None
    parameters_head: tuple[str, ...]
    parameters: tuple[Row, ...]
    findings: tuple[Link, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    text: str
    placeholder: bool


@dataclass(frozen=True, slots=True)
class RuleView:
    anchor: str
    code: str
    slug: str
    title: str
    fired: str
    what: str
    why: str
    fixes: tuple[tuple[Segment, ...], ...]
    example: str
    settings: tuple[Fact, ...]
    references: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    model_name: str
    banner: Banner
    findings: tuple[FindingView, ...]
    findings_count: str
    overview: tuple[Strip, ...]
    overview_axis: Svg | None
    hidden: tuple[LayerCard, ...]
    hidden_note: str
    table_head: tuple[str, ...]
    table: tuple[LayerRow, ...]
    others: tuple[LayerCard, ...]
    collapsed_note: str
    rules: tuple[RuleView, ...]
    footer: str
    has_flagged: bool


# -- entry point -------------------------------------------------------------------------------


def render_html(report: Report) -> str:
    """The whole report as one HTML document."""
    return _environment().get_template("report.html.j2").render(page=build_page(report))


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates of ``reports/``, compiled once per process (a pytest run writes many)."""
    from modelcheck._resources import data_dir

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(data_dir("reports")),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def build_page(report: Report) -> Page:
    """The view model of the whole report: what the templates show, decided here."""
    # A layer name that occurs twice links to its first occurrence.
    index = {layer.name: i for i, layer in reversed(list(enumerate(report.layers)))}
    flags = _layer_flags(report, index)
    rules = {r.code: r for r in report.rules}
    collapse = len(report.layers) >= COLLAPSE_FROM
    hidden = _hidden_indices(report.layers)
    hidden_set = set(hidden)
    cards = [_layer_card(report, i, flags, collapse) for i in range(len(report.layers))]
    name = report.model.type
    verdict = "passed" if report.ok else "failed"
    return Page(
        title=f"modelcheck: {name} {verdict}",
        model_name=name,
        banner=_banner(report, index),
        findings=_findings(report, index, rules),
        findings_count=str(len(report.findings)),
        overview=_overview(report, flags),
        overview_axis=_overview_axis(report.layers),
        hidden=tuple(cards[i] for i in hidden),
        hidden_note=_hidden_note(report.layers, hidden),
        table_head=TABLE_HEAD,
        table=tuple(_table_row(report, i, flags) for i in range(len(report.layers))),
        others=tuple(c for i, c in enumerate(cards) if i not in hidden_set),
        collapsed_note=(
            f"{sum(not c.open for c in cards)} healthy layers are collapsed; click one to open it."
            if collapse and any(not c.open for c in cards)
            else ""
        ),
        rules=_rule_views(report),
        footer=(
            f"modelcheck {report.version} · torch {report.torch_version} · "
            "`modelcheck rule CODE` explains a rule · this file fetches nothing and runs no script"
        ),
        has_flagged=any(flags),
    )


# -- which layers are flagged ----------------------------------------------------------------


@dataclass(slots=True)
class _Flag:
    """The findings touching one layer: at it, or as one of the deeper layers it covers."""

    severity: str = ""
    at: str = ""  # the worst severity of the findings reported at this very layer
    codes: list[str] = field(default_factory=list)
    slugs: dict[str, str] = field(default_factory=dict)  # slug -> worst severity here
    findings: list[int] = field(default_factory=list)

    def add(self, position: int, f: Finding, here: bool) -> None:
        if not self.severity or severity_rank(f.severity) > severity_rank(self.severity):
            self.severity = f.severity
        if here and (not self.at or severity_rank(f.severity) > severity_rank(self.at)):
            self.at = f.severity
        if f.code not in self.codes:
            self.codes.append(f.code)
        kept = self.slugs.get(f.rule)
        if kept is None or severity_rank(f.severity) > severity_rank(kept):
            self.slugs[f.rule] = f.severity
        self.findings.append(position)

    def __bool__(self) -> bool:
        return bool(self.severity)


def _layer_flags(report: Report, index: Mapping[str, int]) -> list[_Flag]:
    flags = [_Flag() for _ in report.layers]
    for position, f in enumerate(report.findings):
        for name in (f.layer, *f.related):
            if name in index:
                flags[index[name]].add(position, f, name == f.layer)
    return flags


def _hidden_indices(layers: Sequence[LayerStats]) -> list[int]:
    """The hidden activation layers (what the seed article plots); all layers if none."""
    hidden = [
        i
        for i, layer in enumerate(layers[:-1])
        if layer.family in ACTIVATION_FAMILIES and layer.activation is not None
    ]
    return hidden or [i for i, layer in enumerate(layers) if layer.activation is not None]


def _hidden_note(layers: Sequence[LayerStats], hidden: Sequence[int]) -> str:
    if any(layers[i].family in ACTIVATION_FAMILIES for i in hidden):
        return (
            "Hidden activations side by side in depth order, as the seed article plots them: "
            "50 bins, linear counts (log with the switch above), the share of values exactly 0 "
            "as a dark spike, a smoothed density and the cumulative share (right axis)."
        )
    return (
        "This model has no hidden activation layers, so every layer's output is shown: "
        "50 bins, counts on a linear axis (log with the switch above)."
    )


# -- banner and findings -------------------------------------------------------------------------


def _banner(report: Report, index: Mapping[str, int]) -> Banner:
    counts = report.summary
    worst = report.findings[0] if report.findings else None
    failing = len(report.failing)
    if report.ok:
        verdict = "Passed"
        detail = (
            f"no finding at or above --fail-on {report.fail_on}"
            if report.findings
            else "no findings"
        )
    else:
        verdict = "Failed"
        detail = f"{_plural(failing, 'finding')} at or above --fail-on {report.fail_on}"
    headline, where = None, ""
    if worst is not None:
        href = f"#L{index[worst.layer]}" if worst.layer in index else "#F0"
        headline = Link(worst.message, href)
        where = f"{worst.code} {worst.rule}" + (f" at {worst.layer}" if worst.layer else "")
    return Banner(
        verdict=verdict,
        detail=detail,
        css=f"verdict-{worst.severity}" if worst else "verdict-clean",
        counts=tuple(
            Count(
                severity if counts[key] == 1 else key,
                counts[key],
                f"sev-{severity}" if counts[key] else "sev-none",
            )
            for severity, key in (("error", "errors"), ("warning", "warnings"), ("info", "infos"))
        ),
        headline=headline,
        headline_where=where,
        headline_css=f"sev-{worst.severity}" if worst else "",
        facts=_facts(report),
    )


def _facts(report: Report) -> tuple[Fact, ...]:
    model, probe = report.model, report.probe
    trainable = (
        "all trainable"
        if model.trainable_parameters == model.parameters
        else f"{model.trainable_parameters:,} trainable"
    )
    labels = f"labels, loss {probe.loss}" if probe.labels else f"no labels, loss {probe.loss}"
    return (
        Fact("Model", f"{model.type} · {model.parameters:,} parameters ({trainable})"),
        Fact(
            "Source",
            model.description
            if model.format == "module"
            else f"{model.source} ({model.description})",
        ),
        Fact(
            "Run",
            f"{len(report.layers)} layers · {model.dtype} on {model.device} · "
            f"{'train' if probe.train_mode else 'eval'} mode · "
            f"gradients {'on' if probe.gradients else 'off'}",
        ),
        Fact(
            "Probe",
            f"{probe.source} · {probe.samples:,} samples in "
            f"{_plural(probe.batches, 'batch', 'batches')} · {labels}",
        ),
        *(Fact("Note", note) for note in probe.notes),
        *_estimates(report),
        Fact(
            "Checked",
            f"{_date(report.created)} · modelcheck {report.version} · torch "
            f"{report.torch_version} · --fail-on {report.fail_on}",
        ),
    )


def _estimates(report: Report) -> tuple[Fact, ...]:
    """Which statistics came from the sample, and the error bound measured for them."""
    every = (*(layer.activation for layer in report.layers), report.input, report.output)
    shown = [d for d in every if d is not None]
    sampled = sum(map(_is_sampled, shown))
    if not sampled:
        return ()
    total = len(shown)
    which = f"all {total}" if sampled == total else f"{sampled} of {total}"
    bound = SAMPLED_ERROR_BOUNDS
    return (
        Fact(
            "Estimates",
            f"{which} distributions (layers, input, output): skewness, kurtosis, histogram "
            "or quantiles from a seeded sample (the note under each histogram says which). "
            f"Error measured at {SAMPLED_MOMENTS_MEASURED:,} sampled values ({RESERVOIR_SIZE:,} "
            f"for histograms): skewness ±{bound['skewness']}, excess kurtosis "
            f"±{bound['kurtosis']} (more for heavy tails), quantiles "
            f"±{bound['quantile_rank']:.0%} of rank, histograms {bound['histogram_tv']:.0%} "
            "total variation. Means, spreads, extremes, activity and saturation are exact.",
        ),
    )


def _is_sampled(d: Distribution) -> bool:
    finite = d.count - d.nonfinite
    return d.sample_size < finite or d.histogram_sample_size < finite


def _date(created: str) -> str:
    try:
        moment = _dt.datetime.fromisoformat(created)
    except ValueError:
        return created
    zone = moment.tzname() or ""
    return moment.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")


def _findings(
    report: Report, index: Mapping[str, int], rules: Mapping[str, Rule]
) -> tuple[FindingView, ...]:
    seen: set[str] = set()
    views = []
    for position, f in enumerate(report.findings):
        rule = rules.get(f.code)
        views.append(
            FindingView(
                anchor=f"F{position}",
                severity=f.severity,
                css=f"sev-{f.severity}",
                code=f.code,
                slug=f.rule,
                title=f.title,
                rule_href=f"#R-{f.code}" if rule else "",
                layer=Link(f.layer, f"#L{index[f.layer]}") if f.layer in index else None,
                measured=_measured(f),
                message=f.message,
                why=_prose(rule.why) if rule else "",
                full=f.code not in seen,
                fixes=f.fixes,
                fixes_label=f"What to try ({len(f.fixes)})",
                also=tuple(
                    Link(name, f"#L{index[name]}") for name in f.related[:MAX_ALSO] if name in index
                ),
                # A check without a threshold (a branch that starts near zero) has none to pass.
                also_label="Also past the threshold:" if f.threshold is not None else "Also at:",
                also_more=(
                    f"and {len(f.related) - MAX_ALSO} more" if len(f.related) > MAX_ALSO else ""
                ),
            )
        )
        seen.add(f.code)
    return tuple(views)


def _measured(f: Finding) -> str:
    if f.value is None:
        return ""
    if f.threshold is None or not math.isfinite(f.threshold):
        return f"measured {format_number(f.value)}"
    return f"measured {format_number(f.value)} vs threshold {format_number(f.threshold)}"


# -- depth overview ------------------------------------------------------------------------------

_W = 960  # overview width in SVG units
_X0, _X1 = 64, _W - 112  # plot area: room for y labels left and threshold labels right
_STRIP_H, _PAD_T, _PAD_B = 86, 8, 8


@dataclass(frozen=True, slots=True)
class _Series:
    values: list[float | None]
    css: str
    label: str  # in the legend
    tip: str  # in a point's tooltip
    marks: bool = True


@dataclass(frozen=True, slots=True)
class _Line:
    value: float
    severity: str
    label: str


def _overview(report: Report, flags: Sequence[_Flag]) -> tuple[Strip, ...]:
    layers = report.layers
    if not layers:
        return ()
    act = [layer.activation for layer in layers]
    hidden = set(_hidden_indices(layers)) if any(a is not None for a in act) else set()
    rules = {r.slug: r for r in report.rules}
    rms = [None if a is None else a.rms for a in act]
    grads = [None if layer.param_grad is None else layer.param_grad.rms for layer in layers]
    out_grads = [None if layer.output_grad is None else layer.output_grad.rms for layer in layers]
    kurt = [a.kurtosis if a is not None and i in hidden else None for i, a in enumerate(act)]
    dead = [None if a is None else a.dead_fraction for a in act]
    zeros = [a.zero_fraction if a is not None and i in hidden else None for i, a in enumerate(act)]
    sat = [None if a is None else a.saturated_fraction for a in act]
    rms_ref, grad_ref = reference_values(layers)  # the layers the rules divide by
    # Layers of repeated blocks are judged against the last block, which no one line shows.
    stacked = has_gradient_stacks(layers)
    specs = [
        (
            "Activation rms",
            "log scale; lines: rule thresholds relative to the first layer with weights",
            [_Series(rms, "s-main", "output rms", "output rms")],
            True,
            _ratio_lines(rules, rms_ref, "exploding-activations", "vanishing-activations"),
            ("exploding-activations", "vanishing-activations"),
            "no layer produced float outputs",
        ),
        (
            "Excess kurtosis",
            "hidden activation layers; 0 for a Gaussian",
            [_Series(kurt, "s-main", "excess kurtosis", "excess kurtosis")],
            False,
            _fixed_lines(rules, "kurtosis-growth", finite_only=True),
            ("kurtosis-growth",),
            "no hidden layer has a defined kurtosis",
        ),
        (
            "Dead units and zeros",
            "share of units active on < 1% of positions (ReLU layers); "
            "line: share of values exactly 0 (hidden layers)",
            [
                _Series(zeros, "s-soft", "zeros", "share of zeros", marks=False),
                _Series(dead, "s-main", "dead units", "dead-unit share"),
            ],
            False,
            _fixed_lines(rules, "dead-units"),
            ("dead-units",),
            "no ReLU-family layers in this model",
        ),
        (
            "Saturated units",
            "share of units in the flat region on ≥ 95% of positions (tanh, sigmoid, …)",
            [_Series(sat, "s-main", "saturated units", "saturated-unit share")],
            False,
            _fixed_lines(rules, "saturation"),
            ("saturation",),
            "no bounded activations (tanh, sigmoid, hardtanh) in this model",
        ),
        (
            "Gradient rms",
            "log scale; rms of each layer's parameter gradients and of the gradient at its "
            "output; thresholds relative to the last weight layer's"
            + (
                " (vanishing-gradients compares a layer of repeated blocks with the same "
                "layer in the last block: no line)"
                if stacked
                else ""
            ),
            [
                _Series(out_grads, "s-soft", "at the output", "output-gradient rms", marks=False),
                _Series(grads, "s-main", "parameters", "parameter-gradient rms"),
            ],
            True,
            _ratio_lines(
                rules, grad_ref, "exploding-gradients", None if stacked else "vanishing-gradients"
            ),
            ("exploding-gradients", "vanishing-gradients"),
            "gradients were not computed (--no-gradients)"
            if not report.probe.gradients
            else "no layer has parameter gradients",
        ),
    ]
    strips = []
    for title, note, series, log, lines, slugs, empty in specs:
        has_data = any(_plottable(v, log) for v in series[-1].values)
        legend = tuple(Key(s.css, s.label) for s in series) if has_data else ()
        svg = _strip_svg(layers, series, log, lines, slugs, flags, title) if has_data else None
        strips.append(Strip(title, note, legend, svg, empty))
    return tuple(strips)


def _plottable(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v >= 0 if log else True)


def _ratio_lines(
    rules: Mapping[str, Rule], ref: float | None, up: str, down: str | None
) -> list[_Line]:
    if ref is None:
        return []
    lines = []
    for slug, sign in ((up, "×"), (down, "×")):
        rule = rules.get(slug)
        if rule is None:
            continue
        for severity, ratio in rule.thresholds.items():
            if math.isfinite(ratio) and ratio > 0:
                lines.append(_Line(ref * ratio, severity, f"{severity} {sign}{_short(ratio)}"))
    return lines


def _fixed_lines(rules: Mapping[str, Rule], slug: str, finite_only: bool = False) -> list[_Line]:
    rule = rules.get(slug)
    if rule is None:
        return []
    return [
        _Line(value, severity, f"{severity} {_short(value)}")
        for severity, value in rule.thresholds.items()
        if math.isfinite(value) or not finite_only
    ]


def _x_of(i: int, n: int) -> float:
    return _X0 + (i + 0.5) * (_X1 - _X0) / n


def _strip_svg(
    layers: Sequence[LayerStats],
    series: Sequence[_Series],
    log: bool,
    lines: Sequence[_Line],
    slugs: Sequence[str],
    flags: Sequence[_Flag],
    title: str,
) -> Svg:
    n = len(layers)
    top, bottom = _PAD_T, _STRIP_H - _PAD_B
    data = [v for s in series for v in s.values if _plottable(v, log)]
    scale, ticks, shown = _y_scale(data, lines, log, top, bottom)
    grid = [
        Path(f"M{_X0} {_f(scale(t))}H{_X1}", "grid" if t != 0 or log else "axis") for t in ticks
    ]
    tick_texts = [Text(_f(_X0 - 6), _f(scale(t) + 3.5), _short(t), "tick", "end") for t in ticks]
    guide_paths, guide_texts = [], []
    labels, ys = [], []
    for line in lines:
        if line in shown:
            y = scale(line.value)
            guide_paths.append(Path(f"M{_X0} {_f(y)}H{_X1}", f"limit limit-{line.severity}"))
            labels.append((line.label, line.severity))
        else:  # off the scale: named at the edge it lies beyond
            y = top if line.value > max(data, default=0.0) else bottom
            labels.append((f"{line.label} {'↑' if y == top else '↓'}", line.severity))
        ys.append(y)
    for (label, severity), label_y in zip(labels, _spread(ys, 11.0, bottom + 2)):
        guide_texts.append(Text(_f(_X1 + 6), _f(label_y + 3.5), label, f"limit-text {severity}"))
    step = (_X1 - _X0) / n
    bands = [
        Rect(
            _f(_x_of(i, n) - max(step, 3) / 2),
            _f(top),
            _f(max(step, 3)),
            _f(bottom - top),
            f"band band-{flag.at}",
            f"{layers[i].name}: {', '.join(flag.codes)}",
            f"#L{i}",
        )
        for i, flag in enumerate(flags)
        if flag.at
    ]
    paths, marks, notes = [], [], []
    radius = 3.0 if n <= 60 else 2.0
    for s in series:
        if s.marks:  # a NaN or Inf cannot be plotted: say so at the top of its column
            notes += [
                Text(
                    _f(_x_of(i, n)), _f(top + 9), "NaN" if math.isnan(v) else "Inf", "nan", "middle"
                )
                for i, v in enumerate(s.values)
                if v is not None and not math.isfinite(v)
            ]
        points = [
            (i, _clamped(scale, v, log, bottom))
            for i, v in enumerate(s.values)
            if _plottable(v, log)
        ]
        if len(points) > 1:
            d = "".join(
                f"{'M' if j == 0 else 'L'}{_f(_x_of(i, n))} {_f(y)}"
                for j, (i, y) in enumerate(points)
            )
            paths.append(Path(d, f"series {s.css}"))
        if not s.marks:
            continue
        for i, y in points:
            hit = next((flags[i].slugs[slug] for slug in slugs if slug in flags[i].slugs), None)
            value = s.values[i]
            marks.append(
                Mark(
                    _f(_x_of(i, n)),
                    _f(y),
                    _f(radius + 1.5 if hit else radius),
                    f"pt pt-{hit}" if hit else "pt",
                    f"{layers[i].name} — {s.tip} {format_number(value)}",
                    f"#L{i}",
                )
            )
    frame = Path(f"M{_X0} {top}V{bottom}H{_X1}", "axis")
    return Svg(
        _W,
        _STRIP_H,
        title,
        "strip",
        (
            Group("bands", rects=tuple(bands)),
            Group("frame", paths=(*grid, frame, *guide_paths), texts=(*tick_texts, *guide_texts)),
            Group("data", paths=tuple(paths), marks=tuple(marks), texts=tuple(notes)),
        ),
    )


def _spread(ys: Sequence[float], gap: float, lowest: float) -> list[float]:
    """Label positions near ``ys``, at least ``gap`` apart and none below ``lowest``,
    in the same order."""
    order = sorted(range(len(ys)), key=lambda k: ys[k])
    placed = [0.0] * len(ys)
    last = -math.inf
    for k in order:  # downwards, pushing each label clear of the one above
        placed[k] = last = max(ys[k], last + gap)
    last = math.inf
    for k in reversed(order):  # then upwards, lifting any that fell off the bottom
        placed[k] = last = min(placed[k], lowest, last - gap)
    return placed


def _clamped(scale: Callable[[float], float], v: float, log: bool, bottom: float) -> float:
    """Zero on a log axis sits on the axis floor rather than at minus infinity."""
    return bottom if log and v <= 0 else scale(v)


def _y_scale(
    data: Sequence[float], lines: Sequence[_Line], log: bool, top: float, bottom: float
) -> tuple[Callable[[float], float], list[float], list[_Line]]:
    """A y scale fitting the data and the nearest threshold each way, its ticks, and the
    threshold lines it shows."""
    if log:
        return _log_scale(data, lines, top, bottom)
    lo, hi = min([*data, 0.0]), max([*data, 0.0])
    if lines and all(0 <= line.value <= 1 for line in lines):
        lo, hi = 0.0, 1.0  # a share: always the whole 0..1
    shown = [line for line in lines if lo <= line.value <= hi or line.value <= 2 * max(hi, 1e-12)]
    hi = max([hi, *(line.value for line in shown)])
    if hi <= lo:
        hi = lo + 1.0
    ticks = _nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])

    def scale(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    return scale, ticks, shown


def _log_scale(
    data: Sequence[float], lines: Sequence[_Line], top: float, bottom: float
) -> tuple[Callable[[float], float], list[float], list[_Line]]:
    positive = [v for v in data if v > 0] or [1.0]
    lo, hi = min(positive), max(positive)
    # Show the nearest threshold on each side (and the farther ones the data reaches).
    above = sorted((line for line in lines if line.value >= hi), key=lambda line: line.value)
    below = sorted((line for line in lines if line.value <= lo), key=lambda line: -line.value)
    inside = [line for line in lines if lo < line.value < hi]
    shown = inside + above[:1] + below[:1]
    values = [lo, hi, *(line.value for line in shown)]
    e_lo = math.floor(math.log10(min(values)))
    e_hi = math.ceil(math.log10(max(values)))
    if e_hi == e_lo:
        e_hi += 1
    every = max(1, math.ceil((e_hi - e_lo) / 5))
    ticks = [10.0**e for e in range(e_lo, e_hi + 1, every)]

    def scale(v: float) -> float:
        return bottom - (math.log10(v) - e_lo) / (e_hi - e_lo) * (bottom - top)

    return scale, ticks, shown


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _overview_axis(layers: Sequence[LayerStats]) -> Svg | None:
    n = len(layers)
    if n == 0:
        return None
    texts = []
    longest = max(len(_clip(layer.name, 18)) for layer in layers)
    if n <= OVERVIEW_NAMES_UP_TO and longest * 6.2 < (_X1 - _X0) / n * 0.9:
        height = 20  # the names fit side by side
        for i, layer in enumerate(layers):
            texts.append(Text(_f(_x_of(i, n)), "13", _clip(layer.name, 18), "axis-name", "middle"))
    elif n <= OVERVIEW_NAMES_UP_TO:
        height = int(12 + longest * 4.6)
        for i, layer in enumerate(layers):
            x = _f(_x_of(i, n) + 3)
            texts.append(
                Text(x, "4", _clip(layer.name, 18), "axis-name", "end", f"rotate(-45 {x} 4)")
            )
    else:
        height = 28
        step = _nice_ticks(0, n, 8)[1] if n > 8 else 1
        for depth in range(0, n, int(step)):
            texts.append(Text(_f(_x_of(depth, n)), "14", str(depth), "tick", "middle"))
        texts.append(Text(_f(_X1 + 6), "14", "depth", "tick"))
    return Svg(
        _W, height, "layers in execution order", "strip axis-strip", (Group(texts=tuple(texts)),)
    )


# -- histograms ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Box:
    """Where a histogram's plot area sits inside its SVG."""

    width: int
    height: int
    x0: float
    x1: float
    y0: float
    y1: float


_CARD = _Box(320, 156, 36, 320 - 34, 14, 156 - 26)
_THUMB = _Box(132, 30, 1, 131, 2, 29)


@dataclass(frozen=True, slots=True)
class _Bins:
    """A layer's histogram with the values exactly 0 taken out of their bin."""

    edges: np.ndarray
    counts: np.ndarray
    zeros: float
    density: np.ndarray

    @property
    def lo(self) -> float:
        return float(self.edges[0])

    @property
    def hi(self) -> float:
        return float(self.edges[-1])

    def x(self, v: float, box: _Box) -> float:
        return box.x0 + (v - self.lo) / (self.hi - self.lo) * (box.x1 - box.x0)


def _bins(d: Distribution) -> _Bins | None:
    h = d.histogram
    if h is None or not h.counts:
        return None
    edges = np.asarray(h.edges, dtype=np.float64)
    counts = np.asarray(h.counts, dtype=np.float64)
    zeros = d.zero_fraction * (d.count - d.nonfinite)
    if zeros > 0 and edges[0] <= 0 <= edges[-1]:
        # The zero count is exact; the bins are scaled from a sample, hence the clamp.
        spike_bin = min(int(np.searchsorted(edges, 0.0, side="right")) - 1, len(counts) - 1)
        counts[spike_bin] = max(counts[spike_bin] - zeros, 0.0)
    else:
        zeros = 0.0
    return _Bins(edges, counts, zeros, _smoothed(counts))


def _histogram_svg(name: str, d: Distribution) -> tuple[Svg | None, str]:
    """Bars (50 bins, the zero spike apart), smoothed density and CDF; a linear and a log
    group, one shown at a time."""
    bins = _bins(d)
    if bins is None:
        if d.nonfinite:
            return None, f"no histogram: {d.nonfinite:,} of {d.count:,} values are NaN or Inf"
        return None, "no finite values to plot"
    groups = (
        _bars_group("lin", bins, _CARD, log=False),
        _bars_group("log", bins, _CARD, log=True),
        _histogram_frame(bins, d),
        _cdf_group(d.quantiles, bins),
    )
    svg = Svg(_CARD.width, _CARD.height, f"histogram of {name}", "hist", groups)
    total = d.count - d.nonfinite
    sampled = []
    if d.sample_size < total:
        sampled.append(f"skewness and kurtosis from {d.sample_size:,} sampled")
    if d.histogram_sample_size < total:
        sampled.append(f"histogram and CDF from {d.histogram_sample_size:,}")
    return svg, f"{total:,} values" + (f" ({', '.join(sampled)})" if sampled else "")


def _thumbnail(name: str, d: Distribution | None) -> Svg | None:
    """The histogram's shape in a few pixels, for a collapsed card's header."""
    bins = None if d is None else _bins(d)
    if bins is None:
        return None
    bars = _bars_group("", bins, _THUMB, log=False, labelled=False)
    return Svg(_THUMB.width, _THUMB.height, f"histogram of {name}", "thumb", (bars,))


def _smoothed(counts: np.ndarray) -> np.ndarray:
    """A kernel density estimate read off the histogram, in bar units.

    The Gaussian kernel's width follows Scott's rule (1.06 σ n^-1/5) for the values the bars
    hold, so few values get a smooth curve and many a detailed one; the edges reflect, so a
    density piled against a bound (ReLU's 0) does not sag there.
    """
    n = float(counts.sum())
    bins = np.arange(counts.size) + 0.5
    if n <= 1:
        return counts.copy()
    mean = float((counts * bins).sum() / n)
    spread = math.sqrt(float((counts * (bins - mean) ** 2).sum() / n))
    sigma = max(1.06 * spread * n**-0.2, 0.75)  # in bins
    reach = min(math.ceil(3 * sigma), counts.size - 1)
    kernel = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(counts, reach, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid")


def _bars_group(css: str, bins: _Bins, box: _Box, *, log: bool, labelled: bool = True) -> Group:
    counts, zeros = bins.counts, bins.zeros
    top_bar = float(counts.max()) if counts.size else 0.0
    ceiling = max(top_bar, zeros) if log else top_bar
    broken = not log and zeros > top_bar * 1.05  # the spike runs off the top, marked
    if ceiling <= 0:
        ceiling = max(zeros, 1.0)

    def y(c: float) -> float:
        share = math.log10(1 + c) / math.log10(1 + ceiling) if log else min(c / ceiling, 1.0)
        return box.y1 - share * (box.y1 - box.y0)

    def x(v: float) -> float:
        return bins.x(v, box)

    d = [f"M{_f(x(bins.edges[0]))} {_f(box.y1)}"]
    for i, c in enumerate(counts):
        d.append(f"V{_f(y(c))}H{_f(x(bins.edges[i + 1]))}")
    d.append(f"V{_f(box.y1)}Z")
    paths = [Path("".join(d), "bars")]
    if labelled:
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        curve = "".join(
            f"{'M' if i == 0 else 'L'}{_f(x(c))} {_f(y(v))}"
            for i, (c, v) in enumerate(zip(centres, bins.density))
        )
        paths.append(Path(curve, "density"))
    rects, texts = [], []
    if zeros > 0:
        width = 3 if labelled else 2
        left = min(max(x(0.0) - width / 2, box.x0), box.x1 - width)
        spike_top = box.y0 if broken else y(zeros)
        rects.append(Rect(_f(left), _f(spike_top), str(width), _f(box.y1 - spike_top), "spike"))
        if broken and labelled:
            marks = f"M{_f(left - 2)} {box.y0 + 9}l7 -3M{_f(left - 2)} {box.y0 + 13}l7 -3"
            paths.append(Path(marks, "break"))
    if labelled:
        peak = ceiling if log else top_bar
        top_label = _count(peak) if peak > 0 else ""
        texts.append(Text(_f(box.x0 - 4), _f(box.y0 + 4), top_label, "tick", "end"))
        texts.append(Text(_f(box.x0 - 4), _f(box.y1), "0", "tick", "end"))
    return Group(css, rects=tuple(rects), paths=tuple(paths), texts=tuple(texts))


def _histogram_frame(bins: _Bins, d: Distribution) -> Group:
    box, lo, hi = _CARD, bins.lo, bins.hi
    texts = [
        Text(_f(box.x0), _f(box.y1 + 13), _short(lo), "tick", "start"),
        Text(_f(box.x1), _f(box.y1 + 13), _short(hi), "tick", "end"),
        Text(_f(box.x1 + 4), _f(box.y0 + 4), "100%", "tick cdf-tick"),
        Text(_f(box.x1 + 4), _f(box.y1), "0%", "tick cdf-tick"),
    ]
    zero_x = bins.x(0.0, box)
    if lo < 0 < hi and min(zero_x - box.x0, box.x1 - zero_x) > 18:
        texts.append(Text(_f(zero_x), _f(box.y1 + 13), "0", "tick", "middle"))
    if bins.zeros > 0:
        label_x = min(max(zero_x + 6, box.x0 + 4), box.x1 - 60)
        label = f"{_percent(d.zero_fraction)} exactly 0"
        texts.append(Text(_f(label_x), _f(box.y0 - 3), label, "spike-label"))
    paths = (Path(f"M{_f(box.x0)} {_f(box.y1)}H{_f(box.x1)}", "axis"),)
    return Group("frame", paths=paths, texts=tuple(texts))


def _cdf_group(quantiles: Sequence[float] | None, bins: _Bins) -> Group:
    if not quantiles:
        return Group()
    box, steps = _CARD, len(quantiles) - 1
    points = []
    for k, q in enumerate(quantiles):
        point = (_f(bins.x(q, box)), _f(box.y1 - k / steps * (box.y1 - box.y0)))
        if not points or point != points[-1]:
            points.append(point)
    d = "".join(f"{'M' if i == 0 else 'L'}{px} {py}" for i, (px, py) in enumerate(points))
    return Group("cdf", paths=(Path(d, "cdf"),))


# -- per-unit strip --------------------------------------------------------------------------


def _units_strip(layer: LayerStats, flag: _Flag) -> UnitStrip | None:
    d = layer.activation
    if d is None or d.units < 2:
        return None
    if d.unit_active_fraction is not None:
        return _strip_of(
            np.asarray(d.unit_active_fraction),
            np.asarray(d.unit_active_fraction) < DEAD_BELOW,
            "active",
            "dead",
            flag.slugs.get("dead-units"),
            "darker: active more often",
            f"dead (active < {DEAD_BELOW:.0%})",
        )
    if d.unit_saturated_fraction is not None:
        saturated = np.asarray(d.unit_saturated_fraction)
        return _strip_of(
            1.0 - saturated,
            saturated >= SATURATED_FROM,
            "in range",
            "saturated",
            flag.slugs.get("saturation"),
            "darker: responsive more often",
            f"saturated (flat ≥ {SATURATED_FROM:.0%})",
        )
    std = np.asarray(d.unit_std)
    top = float(std.max()) if std.size and np.isfinite(std).all() else 0.0
    if top <= 0:
        return None
    return _strip_of(
        std / top,
        std == 0,
        "spread",
        "constant",
        None,
        "darker: larger std",
        "constant",
    )


def _strip_of(
    level: np.ndarray,
    bad: np.ndarray,
    good_word: str,
    bad_word: str,
    severity: str | None,
    shade_legend: str,
    bad_legend: str,
) -> UnitStrip:
    units = level.size
    per_cell = math.ceil(units / MAX_STRIP_CELLS)
    cells = math.ceil(units / per_cell)
    pad = cells * per_cell - units
    cell_level = np.pad(level, (0, pad), constant_values=np.nan).reshape(cells, per_cell)
    cell_bad = np.pad(bad.astype(float), (0, pad), constant_values=np.nan).reshape(cells, per_cell)
    shade = np.nanmean(cell_level, axis=1)
    bad_share = np.nanmean(cell_bad, axis=1)
    classes = ["u-bad" if b >= 0.5 else f"u{min(int(s * 5), 4)}" for s, b in zip(shade, bad_share)]
    runs: dict[str, list[str]] = {}
    start = 0
    for i in range(1, cells + 1):
        if i == cells or classes[i] != classes[start]:
            runs.setdefault(classes[start], []).append(f"M{start} 0h{i - start}v1h-{i - start}z")
            start = i
    bad_css = f"u-bad u-{severity}" if severity else "u-bad"
    paths = tuple(
        Path("".join(parts), bad_css if css == "u-bad" else css) for css, parts in runs.items()
    )
    bad_idx = np.flatnonzero(bad)
    caption = (
        ""
        if per_cell == 1
        else f"{per_cell} units per cell ({bad_word} when most of its units are)."
    )
    listed = ""
    if bad_idx.size == 0 and bad_word != "constant":
        listed = f"No {bad_word} units."
    elif bad_idx.size == units:
        listed = f"All {units} units are {bad_word}."
    elif bad_idx.size:
        shown = ", ".join(str(i) for i in bad_idx[:24])
        more = f" … and {bad_idx.size - 24} more" if bad_idx.size > 24 else ""
        listed = f"{bad_word.capitalize()} units ({bad_idx.size} of {units}): {shown}{more}"
    svg = Svg(cells, 1, f"per-unit {good_word}", "units", (Group(paths=paths),), stretch=True)
    legend = (Key("u3", shade_legend),) + ((Key(bad_css, bad_legend),) if bad_idx.size else ())
    return UnitStrip(svg, caption, legend, listed)


# -- layer cards and the table -----------------------------------------------------------------

TABLE_HEAD = (
    "#", "layer", "type", "units", "mean", "std", "min", "max", "zeros",
    "skew", "kurtosis", "dead", "saturated", "grad rms", "findings",
)  # fmt: skip


def _layer_card(report: Report, i: int, flags: Sequence[_Flag], collapse: bool) -> LayerCard:
    layer, flag = report.layers[i], flags[i]
    d = layer.activation
    histogram, note = _histogram_svg(layer.name, d) if d is not None else (None, "no float output")
    head, rows = _parameter_table(layer)
    badges = tuple(
        Badge(code, _badge_css(report, code, flag, layer.name), f"#F{_first(report, code, flag)}")
        for code in flag.codes
    )
    return LayerCard(
        anchor=f"L{i}",
        depth=str(i),
        name=layer.name,
        type=layer.type,
        thumbnail=_thumbnail(layer.name, d),
        css=_flag_css(flag),
        flagged=bool(flag),
        open=bool(flag) or not collapse,
        badges=badges,
        summary=_card_summary(d),
        histogram=histogram,
        note=_layer_note(report, layer, note),
        stats=_card_stats(layer),
        gradients=_gradient_note(layer),
        units_strip=_units_strip(layer, flag),
        parameters_head=head,
        parameters=rows,
        findings=tuple(
            Link(f"{report.findings[k].code} {report.findings[k].rule}", f"#F{k}")
            for k in flag.findings
        ),
    )


def _parameter_table(layer: LayerStats) -> tuple[tuple[str, ...], tuple[Row, ...]]:
    """The layer's weights as read before the run; a NaN/Inf column only when one has some."""
    bad = any(p.nonfinite for p in layer.parameters)
    head = ("parameter", "shape", "mean", "std", "min", "max")
    rows = []
    for p in layer.parameters:
        cells = (
            p.name,
            "×".join(str(size) for size in p.shape),
            format_number(p.mean),
            format_number(p.std),
            format_number(p.min),
            format_number(p.max),
        )
        if bad:
            cells += (f"{p.nonfinite:,}" if p.nonfinite else "",)
        rows.append(Row(cells, "bad" if p.nonfinite else ""))
    return (*head, "NaN/Inf") if bad else head, tuple(rows)


def _badge_css(report: Report, code: str, flag: _Flag, name: str) -> str:
    """Solid where the finding is reported at this layer, outlined where the layer is one of
    the deeper ones it also covers."""
    mine = [report.findings[k] for k in flag.findings if report.findings[k].code == code]
    worst = max((f.severity for f in mine), key=severity_rank)
    here = any(f.layer == name for f in mine)
    return f"sev-{worst}" if here else f"sev-{worst} badge-related"


def _first(report: Report, code: str, flag: _Flag) -> int:
    return next(k for k in flag.findings if report.findings[k].code == code)


def _card_summary(d: Distribution | None) -> str:
    if d is None:
        return ""
    parts = [f"rms {format_number(d.rms)}", f"zeros {_percent(d.zero_fraction)}"]
    if d.kurtosis is not None:
        parts.append(f"kurtosis {format_number(d.kurtosis)}")
    if d.dead_fraction is not None:
        parts.append(f"dead {_percent(d.dead_fraction)}")
    if d.saturated_fraction is not None:
        parts.append(f"saturated {_percent(d.saturated_fraction)}")
    return " · ".join(parts)


def _card_stats(layer: LayerStats) -> tuple[Fact, ...]:
    d = layer.activation
    facts = []
    if d is not None:
        facts += [
            Fact("mean", format_number(d.mean)),
            Fact("std", format_number(d.std)),
            Fact("rms", format_number(d.rms)),
            Fact("min", format_number(d.min)),
            Fact("max", format_number(d.max)),
            Fact("zeros", _percent(d.zero_fraction)),
            Fact("skew", format_number(d.skewness)),
            Fact("kurtosis", format_number(d.kurtosis)),
        ]
        if d.dead_fraction is not None:
            facts.append(Fact("dead", _unit_count(d.dead_fraction, d.units)))
        if d.saturated_fraction is not None:
            facts.append(Fact("saturated", _unit_count(d.saturated_fraction, d.units)))
        if d.nonfinite:
            facts.append(Fact("NaN/Inf", f"{d.nonfinite:,}", "bad"))
    return tuple(facts)


def _gradient_note(layer: LayerStats) -> str:
    parts = []
    if layer.output_grad is not None:
        parts.append(f"at the output {format_number(layer.output_grad.rms)}")
    if layer.param_grad is not None:
        parts.append(f"of the parameters {format_number(layer.param_grad.rms)}")
    return f"Gradient rms {' and '.join(parts)}." if parts else ""


def _layer_note(report: Report, layer: LayerStats, histogram_note: str) -> str:
    """How many values the card rests on, and how often the layer ran if that is unusual."""
    parts = [histogram_note]
    if layer.activation is not None:
        parts.append(_plural(layer.activation.units, "unit"))
    if layer.calls != report.probe.batches:
        parts.append(
            f"ran {layer.calls} times in {_plural(report.probe.batches, 'batch', 'batches')}"
        )
    return " · ".join(parts)


def _table_row(report: Report, i: int, flags: Sequence[_Flag]) -> LayerRow:
    layer, flag = report.layers[i], flags[i]
    d = layer.activation
    grad = layer.param_grad or layer.output_grad
    if d is None:
        numbers = ("",) * 10
    else:
        numbers = (
            str(d.units),
            format_number(d.mean),
            format_number(d.std),
            format_number(d.min),
            format_number(d.max),
            _percent(d.zero_fraction),
            format_number(d.skewness),
            format_number(d.kurtosis),
            "" if d.dead_fraction is None else _unit_count(d.dead_fraction, d.units),
            "" if d.saturated_fraction is None else _unit_count(d.saturated_fraction, d.units),
        )
    return LayerRow(
        depth=str(i),
        name=Link(layer.name, f"#L{i}"),
        type=layer.type,
        numbers=(*numbers, "" if grad is None else format_number(grad.rms)),
        findings=" ".join(flag.codes),
        css=_flag_css(flag),
    )


def _flag_css(flag: _Flag) -> str:
    """Tinted by severity where a finding is reported; lighter where a finding only
    counts the layer among the deeper ones that also cross; "healthy" otherwise."""
    if flag.at:
        return f"flag-{flag.at}"
    return "flag-related" if flag else "healthy"


# -- rule reference ------------------------------------------------------------------------------


def _rule_views(report: Report) -> tuple[RuleView, ...]:
    fired: dict[str, int] = {}
    for f in report.findings:
        fired[f.code] = fired.get(f.code, 0) + 1
    views = []
    for rule in report.rules:
        if rule.code not in fired:
            continue
        settings = {**rule.thresholds, **rule.params}
        views.append(
            RuleView(
                anchor=f"R-{rule.code}",
                code=rule.code,
                slug=rule.slug,
                title=rule.title,
                fired="fired once" if fired[rule.code] == 1 else f"fired {fired[rule.code]} times",
                what=_prose(rule.what),
                why=_prose(rule.why),
                fixes=tuple(_segments(fix.text) for fix in rule.fixes),
                example=rule.example,
                settings=tuple(Fact(k, format_number(v)) for k, v in settings.items()),
                references=rule.references,
            )
        )
    return tuple(views)


def _segments(template: str) -> tuple[Segment, ...]:
    """A fix template split into text and ``{placeholders}``, shown as placeholders."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        if literal:
            parts.append(Segment(literal, False))
        if name:
            parts.append(Segment(name, True))
    return tuple(parts)


# -- small formatting helpers --------------------------------------------------------------------


def _f(v: float) -> str:
    """An SVG coordinate: one decimal, no trailing zeros."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _short(v: float) -> str:
    """An axis label: as few characters as reading it needs."""
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    if 1e-2 <= abs(v) < 1e4:
        return str(int(v)) if v == int(v) else f"{v:.3g}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _count(n: float) -> str:
    """A count for an axis: 70, 4.1k, 2.3M."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.2g}{suffix}" if n < 10 * factor else f"{n / factor:.0f}{suffix}"
    return f"{n:.0f}" if n >= 10 or n == round(n) else f"{n:.2g}"


def _percent(share: float | None) -> str:
    if share is None:
        return "n/a"
    if share == 0:
        return "0%"
    if 0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1:
        return ">99.9%"
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


def _unit_count(share: float, units: int) -> str:
    return f"{round(share * units)} / {units}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


def _prose(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
