"""modelcheck: a health-check linter for PyTorch models.

``check(model, probe)`` runs the model on probe data, watches every layer's activations
and gradients, evaluates the declarative rules in ``rules/`` and returns a Report.
"""

from modelcheck.assertions import assert_healthy
from modelcheck.engine import __version__, check
from modelcheck.errors import (
    CaptureError,
    ConfigError,
    ModelcheckError,
    ProbeError,
    RuleError,
    SourceError,
)
from modelcheck.report import Report
from modelcheck.rules import Finding

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
