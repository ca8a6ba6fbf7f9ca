"""The HTML report in a real headless Chromium: it loads from a file with no console errors,
renders visible charts with the flagged layer in colour, its toggles work without scripts, and
it prints.

Needs Debian's ``chromium`` (the README's test command installs it). Set
MODELCHECK_UPDATE_SCREENSHOT=1 to rewrite docs/report-demo.png from the demo report.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from chromium import CHROMIUM, Chromium, png_pixels
from models import gaussian
from test_html import EVIL, FAULTY, EvilNames, seed_report

import modelcheck

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "report-demo.png"
WARNING_RGB = (0xB3, 0x5C, 0x00)  # --warning in reports/report.css
ERROR_RGB = (0xC0, 0x27, 0x1D)  # --error


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") or os.path.exists(CHROMIUM)):
        pytest.fail("chromium is not installed: apt-get install -y chromium (see README)")
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The demo's report, a failing one and one with markup in its module names, as files."""
    folder = tmp_path_factory.mktemp("reports")
    built = {
        "demo": seed_report(),
        "failing": FAULTY["dead ReLU"](),
        "evil": modelcheck.check(EvilNames(), gaussian()),
    }
    for name, report in built.items():
        report.write_html(folder / f"{name}.html")
    return {name: (folder / f"{name}.html", report) for name, report in built.items()}


def problems(console: list[dict]) -> list[str]:
    """Console errors and warnings, uncaught exceptions, and blocked loads (CSP)."""
    found = []
    for event in console:
        params = event["params"]
        if event["method"] == "Runtime.exceptionThrown":
            found.append(params["exceptionDetails"]["text"])
        elif event["method"] == "Log.entryAdded" and params["entry"]["level"] in (
            "error",
            "warning",
        ):
            found.append(params["entry"]["text"])
        elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "warn"):
            found.append(str(params["args"]))
    return found


def share_of(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    close = np.abs(pixels[..., :3].astype(int) - np.asarray(rgb)).max(axis=-1) <= tolerance
    return float(close.mean())


def test_demo_report_loads_without_console_errors_and_draws_its_charts(browser, reports):
    path, report = reports["demo"]
    tab = browser.open(path)
    try:
        assert problems(tab.console) == []
        assert tab.evaluate("document.querySelectorAll('svg').length") > 10
        # Every chart has a size on screen: nothing collapsed to zero by the stylesheet.
        sizes = tab.evaluate(
            "[...document.querySelectorAll('svg.strip, svg.hist')]"
            ".map(s => s.getBoundingClientRect().height)"
        )
        assert sizes and min(sizes) > 20
        height = _demo_figure_height(tab)
        pixels = png_pixels(tab.screenshot(height=height))
        if os.environ.get("MODELCHECK_UPDATE_SCREENSHOT"):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(tab.screenshot(height=height, fast=False))
    finally:
        tab.close()
    assert pixels.shape[1] == 1280 and pixels.shape[0] > 1500
    ink = (pixels[..., :3] < 200).any(axis=-1).mean()
    assert 0.02 < ink < 0.6, ink  # text and charts, neither blank nor a solid block
    assert len(np.unique(pixels[::4, ::4, :3].reshape(-1, 3), axis=0)) > 50
    assert report.findings[0].severity == "warning"
    assert share_of(pixels, WARNING_RGB) > 1e-3  # the flagged layer shows in amber


def _demo_figure_height(tab) -> int:
    """From the top of the page to the end of the hidden-layer histograms."""
    bottom = tab.evaluate("document.getElementById('histograms').getBoundingClientRect().bottom")
    return int(bottom) + 16


def test_failing_report_shows_red_where_the_error_is(browser, reports):
    path, _ = reports["failing"]
    tab = browser.open(path)
    try:
        assert problems(tab.console) == []
        pixels = png_pixels(tab.screenshot(height=900))
    finally:
        tab.close()
    assert share_of(pixels, ERROR_RGB) > 1e-3  # the verdict, the count and the finding


def test_markup_in_module_names_stays_text_in_the_browser(browser, reports):
    path, report = reports["evil"]
    tab = browser.open(path)
    try:
        assert problems(tab.console) == []
        assert tab.evaluate("document.scripts.length") == 0
        names = tab.evaluate(
            "[...document.querySelectorAll('.card .lname')].map(e => e.textContent)"
        )
    finally:
        tab.close()
    assert f"blocks.{EVIL}" in names
    assert names == [layer.name for layer in _card_order(report)]


def _card_order(report):
    from modelcheck.html import build_page

    page = build_page(report)
    by_name = {layer.name: layer for layer in report.layers}
    return [by_name[card.name] for card in (*page.hidden, *page.others)]


def test_toggles_work_with_scripts_disabled(browser, reports):
    path, _ = reports["failing"]
    tab = browser.open(path, scripts=False)
    shown = "el => getComputedStyle(el).display !== 'none'"
    try:
        assert problems(tab.console) == []
        healthy = f"[...document.querySelectorAll('.healthy')].filter({shown}).length"
        logs = f"[...document.querySelectorAll('.hist .log')].filter({shown}).length"
        lins = f"[...document.querySelectorAll('.hist .lin')].filter({shown}).length"
        assert tab.evaluate(healthy) > 0 and tab.evaluate(logs) == 0 and tab.evaluate(lins) > 0
        tab.evaluate("document.getElementById('only-flagged').click()")
        tab.evaluate("document.getElementById('log-counts').click()")
        assert tab.evaluate(healthy) == 0
        assert tab.evaluate(logs) > 0 and tab.evaluate(lins) == 0
    finally:
        tab.close()


def test_report_prints_without_the_toolbar(browser, reports):
    path, _ = reports["demo"]
    tab = browser.open(path, width=794, media="print")  # A4 at 96 dpi
    try:
        assert tab.evaluate("getComputedStyle(document.querySelector('.toolbar')).display") == (
            "none"
        )
        overflow = tab.evaluate("document.documentElement.scrollWidth - innerWidth")
        pixels = png_pixels(tab.screenshot(height=1100))
    finally:
        tab.close()
    assert overflow <= 0  # nothing wider than the paper
    assert (pixels[..., :3] < 200).any(axis=-1).mean() > 0.02


def test_the_checks_above_catch_a_blocked_load_and_a_blank_page(browser, tmp_path):
    """Controls: the console and pixel checks can fail."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!doctype html><meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
        '<body><img src="https://example.invalid/x.png" alt=""></body>'
    )
    tab = browser.open(page)
    try:
        found = problems(tab.console)
        pixels = png_pixels(tab.screenshot(height=600))
    finally:
        tab.close()
    assert any("Content Security Policy" in text for text in found), found
    assert (pixels[..., :3] < 200).any(axis=-1).mean() < 0.001
