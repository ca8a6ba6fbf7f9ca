"""Options of the test suite itself."""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        help="rewrite the golden output files beside the tests (tests/test_formats/) from this run",
    )
