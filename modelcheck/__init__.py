"""modelcheck: a health-check linter for PyTorch models.

``check(model, probe)`` runs the model on probe data, watches every layer's activations
and gradients, evaluates the declarative rules in ``rules/`` and returns a Report.

The names below torch are imported on first use (PEP 562), so that importing a part of
the package that needs no torch — the pytest plugin, which every pytest run in the
environment loads, or ``modelcheck.errors`` — does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from modelcheck.errors import (
    CaptureError,
    ConfigError,
    ModelcheckError,
    ProbeError,
    RuleError,
    SourceError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from modelcheck.assertions import assert_healthy
    from modelcheck.engine import check
    from modelcheck.report import Report
    from modelcheck.rules import Finding

_LAZY = {
    "assert_healthy": "modelcheck.assertions",
    "check": "modelcheck.engine",
    "Report": "modelcheck.report",
    "Finding": "modelcheck.rules",
}

__all__ = [
    "CaptureError",
    "ConfigError",
    "Finding",
    "ModelcheckError",
    "ProbeError",
    "Report",
    "RuleError",
    "SourceError",
    "__version__",
    "assert_healthy",
    "check",
]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'modelcheck' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
