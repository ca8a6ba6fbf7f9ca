"""Options and shared fixtures of the test suite itself."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--update-goldens",
        action="store_true",
        help="rewrite the golden output files beside the tests (tests/test_formats/) from this run",
    )


@pytest.fixture(scope="session")
def kernel_built():
    """Fail, not pass on PyTorch's path, a test of the compiled kernel where it is missing."""
    from modelcheck import kernel

    if kernel.LIBRARY is None:
        pytest.fail("modelcheck._kernel is not built or out of date: reinstall (pip install -e .)")
