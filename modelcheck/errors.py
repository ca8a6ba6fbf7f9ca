"""The errors modelcheck raises on purpose: one type per boundary, one line each.

The command line turns every ModelcheckError into exit code 2 and prints only its
message, so a message must say what failed, where, what was expected and what to try.
"""

from __future__ import annotations


class ModelcheckError(Exception):
    """Base class: the check could not run."""


class SourceError(ModelcheckError):
    """The model file could not be turned into a module."""


class ProbeError(ModelcheckError):
    """The probe data could not be read or does not fit the model."""


class ConfigError(ModelcheckError, ValueError):
    """A setting, a configuration file or an option value is invalid."""


class RuleError(ModelcheckError, ValueError):
    """A rule file or rule expression is invalid."""


class CaptureError(ModelcheckError):
    """The model failed while modelcheck was running it."""


class BatchOutOfMemory(CaptureError):
    """A batch of ``rows`` samples did not fit in memory; the engine retries smaller ones."""

    def __init__(self, message: str, rows: int) -> None:
        super().__init__(message)
        self.rows = rows
