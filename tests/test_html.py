"""The HTML report: every finding and layer is in it, it is one safe self-contained file, its
charts show what the check measured, and it is written whole or not at all."""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import re
import stat
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from models import (
    dead_relu_model,
    gaussian,
    lora_model,
    mlp,
    nan_in_second_layer,
    saturated_tanh_model,
    scaled_chain,
    seeded,
    trained_seed_network,
)
from torch import nn

import modelcheck
from modelcheck import html as html_renderer
from modelcheck.cli import main
from modelcheck.probe import probe_from_data
from modelcheck.stats import DEAD_BELOW

EVIL = "<script>alert(1)</script>"
MB = 1024 * 1024


@functools.cache
def seed_report():
    """What `modelcheck demo` reports, from the trained seed network the suite shares."""
    model, x, y = trained_seed_network()
    probe = dataclasses.replace(probe_from_data((x, y)), source="iris test split (standardised)")
    return modelcheck.check(model, probe, loss="mse")


# Reports are frozen: each is checked once and shared by the tests that read it.
FAULTY = {
    "dead ReLU": lambda: modelcheck.check(dead_relu_model(0.75), gaussian()),
    "saturated tanh": lambda: modelcheck.check(saturated_tanh_model(), gaussian()),
    "exploding chain": lambda: modelcheck.check(scaled_chain(4.0), gaussian(features=32)),
    "NaN weight": lambda: modelcheck.check(nan_in_second_layer(), gaussian()),
}
FAULTY = {name: functools.cache(build) for name, build in FAULTY.items()}


class EvilNames(nn.Module):
    """A model whose module names are markup; a report must show them as text."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({EVIL: nn.Linear(8, 16), "act": nn.ReLU()})
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks["act"](self.blocks[EVIL](x)))


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def ids(page: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page))


def section(page: str, anchor: str) -> str:
    """The markup of the layer card with this id."""
    start = page.index(f'id="{anchor}"')
    return page[start : page.index("</details>", start)]


# -- content -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [seed_report, *FAULTY.values()], ids=["healthy", *FAULTY])
def test_report_shows_every_finding_and_a_section_for_every_layer(build):
    report = build()
    page = report.to_html()
    for position, f in enumerate(report.findings):
        finding = page[page.index(f'id="F{position}"') :]
        finding = html.unescape(finding[: finding.index("</article>")])
        for text in (f.code, f.rule, f.severity, f.message, *f.fixes):
            assert text in finding
    for depth, layer in enumerate(report.layers):
        card = html.unescape(section(page, f"L{depth}"))
        assert layer.name in card and layer.type in card
    assert ("Failed" if not report.ok else "Passed") in page


@pytest.mark.parametrize(
    ("build", "rule", "label"),
    [
        (FAULTY["exploding chain"], "exploding-activations", "Also past the threshold:"),
        (lambda: modelcheck.check(lora_model(), gaussian()), "poor-initialization", "Also at:"),
    ],
    ids=["threshold", "zero-initialised"],
)
def test_a_finding_names_the_other_layers_it_covers(build, rule, label):
    report = build()
    [f] = [f for f in report.findings if f.rule == rule]
    page = html.unescape(report.to_html())
    finding = page[page.index(f.message) :]
    finding = finding[: finding.index("</article>")]
    assert label in finding and f.related[0] in finding[finding.index(label) :]


def test_faulty_models_fail_their_banner_and_flag_the_layer_at_fault():
    report = FAULTY["dead ReLU"]()
    page = report.to_html()
    banner = page[page.index('<header class="banner') : page.index("</header>")]
    assert "verdict-error" in banner and "Failed" in banner
    assert "<b>1</b> error" in banner
    dead = report.layer("3")
    depth = report.layers.index(dead)
    assert f'<details class="card flag-error" id="L{depth}" open>' in page
    assert "MC101" in section(page, f"L{depth}")


def test_healthy_model_passes_with_no_layer_flagged():
    page = modelcheck.check(seeded(0)(lambda: mlp([8, 32, 4]))(), gaussian()).to_html()
    assert "Passed" in page and "verdict-clean" in page
    assert not re.search(r'class="[^"]*\bflag-', page)
    assert "No findings" in page


def test_every_chart_is_well_formed_svg():
    for build in FAULTY.values():
        for chart in svgs(build().to_html()):
            ET.fromstring(chart)  # raises on malformed XML


def test_report_fetches_nothing_and_runs_no_script():
    page = FAULTY["saturated tanh"]().to_html()
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", page)
    assert not re.search(r"url\(|@import|<link\b|<script\b|<iframe\b|<img\b", page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "default-src 'none'" in page  # the browser refuses anything else, too


def test_internal_links_all_lead_somewhere():
    for build in (seed_report, *FAULTY.values()):
        page = build().to_html()
        targets = set(re.findall(r'href="#([^"]+)"', page))
        assert targets and targets <= ids(page), targets - ids(page)


def test_module_names_that_look_like_markup_are_shown_as_text():
    report = modelcheck.check(EvilNames(), gaussian())
    page = report.to_html()
    assert any(layer.name == f"blocks.{EVIL}" for layer in report.layers)
    assert EVIL not in page
    assert "<script" not in page
    assert html.escape(f"blocks.{EVIL}") in page
    for chart in svgs(page):
        ET.fromstring(chart)


# -- what the charts show ----------------------------------------------------------------------


def test_depth_overview_draws_the_thresholds_the_check_used():
    report = modelcheck.check(
        dead_relu_model(0.75), gaussian(), rules={"dead-units": {"warning": 0.3, "error": 0.6}}
    )
    strip = next(s for s in html_renderer.build_page(report).overview if s.title.startswith("Dead"))
    labels = [t.text for g in strip.svg.groups for t in g.texts]
    assert "warning 0.3" in labels and "error 0.6" in labels
    assert "warning 0.25" not in labels


def test_offending_points_are_coloured_by_severity_and_link_to_their_layer():
    report = FAULTY["dead ReLU"]()
    page = html_renderer.build_page(report)
    strip = next(s for s in page.overview if s.title.startswith("Dead"))
    marks = [m for g in strip.svg.groups for m in g.marks]
    flagged = [m for m in marks if "pt-error" in m.css]
    depth = report.layers.index(report.layer("3"))
    assert [m.href for m in flagged] == [f"#L{depth}"]
    bands = {r.href: r.css for g in strip.svg.groups for r in g.rects}
    assert bands[f"#L{depth}"] == "band band-error"
    # every strip shades every flagged layer: here also the exploding-activations warning
    exploding = next(f for f in report.findings if f.rule == "exploding-activations")
    assert bands[f"#L{report.layers.index(report.layer(exploding.layer))}"] == "band band-warning"


def test_histogram_separates_exact_zeros_into_a_labelled_spike():
    report = FAULTY["dead ReLU"]()
    layer = report.layer("3")
    svg, _ = html_renderer._histogram_svg(layer.name, layer.activation)
    linear = next(g for g in svg.groups if g.css == "lin")
    assert [r.css for r in linear.rects] == ["spike"]
    labels = [t.text for g in svg.groups for t in g.texts]
    zeros = layer.activation.zero_fraction
    assert f"{zeros:.0%} exactly 0" in labels
    assert {g.css for g in svg.groups} >= {"lin", "log", "cdf"}


def test_histogram_note_says_how_many_values_each_estimate_rests_on():
    model = seeded(0)(lambda: mlp([64, 512, 4]))()
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    report = modelcheck.check(model, x, batch_size=32, sample_size=4_000)
    hidden = report.layer("0").activation  # 3 batches of 32 x 512 = 49,152 values
    _, note = html_renderer._histogram_svg("0", hidden)
    assert note == (
        "49,152 values (skewness and kurtosis from 12,000 sampled, histogram and CDF from 4,096)"
    )
    _, small = html_renderer._histogram_svg("2", report.layer("2").activation)
    assert small == "384 values"  # everything fits: nothing is estimated


def test_header_states_the_measured_error_bound_when_something_was_sampled():
    model = seeded(0)(lambda: mlp([64, 512, 4]))()
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    sampled = modelcheck.check(model, x, batch_size=32, sample_size=4_000)
    facts = {f.label: f.value for f in html_renderer.build_page(sampled).banner.facts}
    # The 512-unit layers and the 6,144-value input outgrow the 4,096-value histogram
    # sample; the 384 values of the output do not.
    assert facts["Estimates"].startswith("3 of 5 distributions (layers, input, output)")
    for bound in ("skewness ±0.05", "kurtosis ±0.35", "quantiles ±3% of rank", "histograms 6%"):
        assert bound in facts["Estimates"]
    whole = modelcheck.check(model, x[:4])  # 2,048 values at most: everything fits
    assert "Estimates" not in {f.label for f in html_renderer.build_page(whole).banner.facts}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_header_lists_the_notes_of_the_run():
    model = seeded(0)(lambda: mlp([8, 16, 4]))()
    report = modelcheck.check(torch.jit.script(model), torch.randn(32, 8))
    notes = [f.value for f in html_renderer.build_page(report).banner.facts if f.label == "Note"]
    assert notes == list(report.probe.notes) and len(notes) == 1
    assert "TorchScript" in notes[0] and html.escape(notes[0]) in report.to_html()


def test_unit_strip_lists_exactly_the_dead_units():
    report = FAULTY["dead ReLU"]()
    layer = report.layer("3")
    active = np.asarray(layer.activation.unit_active_fraction)
    dead = np.flatnonzero(active < DEAD_BELOW)
    card = next(c for c in html_renderer.build_page(report).hidden if c.name == "3")
    listed = card.units_strip.listed
    assert listed.startswith(f"Dead units ({dead.size} of {active.size}): ")
    assert listed.split(": ")[1].split(", ")[:5] == [str(i) for i in dead[:5]]
    assert "u-error" in {p.css.split()[-1] for g in card.units_strip.svg.groups for p in g.paths}


def test_nan_values_are_named_where_they_cannot_be_plotted():
    page = FAULTY["NaN weight"]().to_html()
    assert ">NaN</text>" in page
    assert "values are NaN or Inf" in page


def test_rule_reference_covers_exactly_the_rules_that_fired():
    report = FAULTY["saturated tanh"]()
    views = html_renderer.build_page(report).rules
    assert {v.code for v in views} == {f.code for f in report.findings}
    saturation = next(v for v in views if v.slug == "saturation")
    assert any(seg.placeholder and seg.text == "layer" for fix in saturation.fixes for seg in fix)
    assert saturation.references


def test_healthy_layers_collapse_only_in_large_models():
    small = html_renderer.build_page(FAULTY["dead ReLU"]())
    assert all(card.open for card in (*small.hidden, *small.others))
    big = html_renderer.build_page(deep_report(depth=10))
    cards = (*big.hidden, *big.others)
    assert len(cards) >= html_renderer.COLLAPSE_FROM
    assert all(card.open == card.flagged for card in cards)
    assert any(not card.open for card in cards)


# -- size and writing --------------------------------------------------------------------------


def deep_report(depth: int, width: int = 32):
    """A plain deep ReLU stack with PyTorch's default init: its units die with depth."""
    model = seeded(11)(lambda: mlp([width] * (depth + 1), last_activation=True))()
    return modelcheck.check(model, gaussian(n=16, features=width))


def test_a_200_layer_report_stays_under_3_mb():
    # 160 units: wider than a unit strip has cells, as real layers are
    report = deep_report(depth=100, width=160)
    assert len(report.layers) == 200
    assert report.findings  # the worst case: flagged layers, open cards, findings to list
    page = report.to_html()
    assert len(page.encode()) < 3 * MB
    assert {f"L{i}" for i in range(200)} <= ids(page)


def test_write_html_writes_the_report_readable_like_any_new_file(tmp_path):
    report = FAULTY["dead ReLU"]()
    target = tmp_path / "report.html"
    report.write_html(target)
    assert target.read_text(encoding="utf-8") == report.to_html()
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain.txt").stat().st_mode
    )


def test_a_failed_render_leaves_no_file_and_the_old_report_intact(tmp_path, monkeypatch):
    report = FAULTY["dead ReLU"]()
    target = tmp_path / "report.html"
    target.write_text("previous report")

    def broken(page):
        raise RuntimeError("template failed half-way")

    monkeypatch.setattr(html_renderer, "build_page", broken)
    with pytest.raises(RuntimeError):
        report.write_html(target)
    assert target.read_text() == "previous report"
    assert os.listdir(tmp_path) == ["report.html"]


# -- command line --------------------------------------------------------------------------------


@pytest.fixture
def dead_model_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(dead_relu_model(0.75), tmp_path / "dead.pt")
    return tmp_path / "dead.pt"


def test_cli_html_option_writes_the_report_and_says_where(dead_model_file, capsys):
    code = main([str(dead_model_file), "--trust", "--probe", "random", "--html", "out.html"])
    out, _ = capsys.readouterr()
    assert code == 1
    page = (dead_model_file.parent / "out.html").read_text()
    assert "MC101" in page and "dead.pt" in page
    assert f"HTML report: {dead_model_file.parent / 'out.html'}" in out


def test_cli_with_json_keeps_stdout_for_json_and_names_the_report_on_stderr(
    dead_model_file, capsys
):
    code = main([str(dead_model_file), "--trust", "--format", "json", "--html", "out.html"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith("{") and "HTML report" not in out
    assert "HTML report:" in err


def test_cli_refuses_an_html_path_it_cannot_write_before_running(dead_model_file, capsys):
    refused = (
        ("missing/out.html", "does not exist"),
        (".", "is a directory"),
        ("dead.pt", "would overwrite"),
    )
    for bad, needle in refused:
        code = main([str(dead_model_file), "--trust", "--html", bad])
        _, err = capsys.readouterr()
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(dead_model_file.parent)) == ["dead.pt"]


@pytest.fixture
def fast_demo(monkeypatch, tmp_path):
    """The demo command with its training replaced by an already checked report."""
    import modelcheck.demo

    report = FAULTY["dead ReLU"]()
    monkeypatch.setattr(modelcheck.demo, "run_demo", lambda **options: (None, report))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_writes_its_report_to_a_chosen_path_or_not_at_all(fast_demo, capsys):
    main(["demo", "--html", "chosen.html"])
    assert "HTML report:" in capsys.readouterr().out
    assert os.listdir(fast_demo) == ["chosen.html"]
    os.remove(fast_demo / "chosen.html")
    main(["demo", "--no-html"])
    assert "HTML report" not in capsys.readouterr().out
    assert os.listdir(fast_demo) == []
