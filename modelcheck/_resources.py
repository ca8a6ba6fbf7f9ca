"""Where the shipped rule pack and report templates are, installed or not.

A wheel carries them inside the package (``modelcheck/_data``); an editable install
or a source checkout has them at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for base in (_PACKAGE / "_data", _PACKAGE.parent):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"modelcheck's {name}/ directory is missing from the installation")
