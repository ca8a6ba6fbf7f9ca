"""Read ``[tool.modelcheck]`` from a project's pyproject.toml (or ``--config FILE``).

A front-door helper beside ``settings``: it finds the file, applies its table over the
built-in defaults through the one option table of ``modelcheck.settings``, and checks
every rule it names against the rules that will run, so a typo fails before a model is
loaded. Every error is one line naming the file, the line and the key: tomllib gives no
positions for valid TOML, so the line is found in the text (``key_line``). Relative paths
in the file (``probe``, ``extend-rules``) are relative to the file, as in ruff.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomllib

from modelcheck import rules
from modelcheck.errors import ConfigError
from modelcheck.settings import DATASETS, Settings

PYPROJECT = "pyproject.toml"
_TABLE = ("tool", "modelcheck")


@dataclass(frozen=True, slots=True)
class Configured:
    """Settings after a configuration file, and where each setting it set came from."""

    settings: Settings
    path: Path | None  # None: no file, built-in defaults
    origins: Mapping[str, str] = field(default_factory=dict)  # setting -> "file:line"


def find_config(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` that has a ``[tool.modelcheck]``
    table; one without the table is passed over, as ruff does, so a project's tool
    settings apply in its subdirectories."""
    for directory in (start, *start.parents):
        candidate = _shown(directory / PYPROJECT)
        if candidate.is_file():
            tool = _read(candidate)[1].get("tool")
            if isinstance(tool, Mapping) and "modelcheck" in tool:
                return candidate
    return None


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    start: str | os.PathLike[str] | None = None,
) -> Configured:
    """The built-in defaults with the configuration file applied over them.

    ``path`` is an explicit file (``--config``): a pyproject.toml is read at its
    ``[tool.modelcheck]`` table, any other TOML file at its top level (or its
    ``[tool.modelcheck]`` table if it has one). Without it the file is found from
    ``start`` (the working directory) upwards; no file means the defaults.
    """
    explicit = path is not None
    file = Path(path) if explicit else find_config(Path(start or os.getcwd()).resolve())
    if file is None:
        return Configured(Settings(), None)
    if explicit and not file.is_file():
        raise ConfigError(f"--config {file}: no such file")
    text, data = _read(file)
    table, prefix = _modelcheck_table(data, file)
    settings, origins = Settings(), {}
    for key, value in table.items():
        where = _where(file, text, (*prefix, key))
        settings = settings.updated({key: value}, where)
        origins[key.replace("-", "_")] = where
    settings = _relative_to(file.parent.resolve(), settings, origins)
    _check_rule_names(settings, table, file, text, prefix)
    return Configured(settings, file.resolve(), origins)


def _shown(file: Path) -> Path:
    """A found file as the user would write it: relative to the working directory."""
    try:
        return file.relative_to(Path.cwd())
    except ValueError:
        return file


def _read(file: Path) -> tuple[str, dict]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConfigError(f"{file}: cannot read configuration ({reason})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"\(at line (\d+), column \d+\)", str(error))
        line = found.group(1) if found else len(text.splitlines()) or 1
        message = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", str(error))
        raise ConfigError(f"{file}:{line}: invalid TOML: {message}") from None


def _modelcheck_table(data: dict, file: Path) -> tuple[Mapping[str, object], tuple[str, ...]]:
    tool = data.get("tool", {})
    if isinstance(tool, Mapping) and "modelcheck" in tool:
        table = tool["modelcheck"]
        if not isinstance(table, Mapping):
            raise ConfigError(f"{file}: [tool.modelcheck] must be a table")
        return table, _TABLE
    if file.name == PYPROJECT:
        raise ConfigError(f"{file}: no [tool.modelcheck] table")
    return data, ()


def _where(file: Path, text: str, keys: Sequence[str]) -> str:
    line = key_line(text, keys)
    return f"{file}:{line}" if line else str(file)


def _relative_to(directory: Path, settings: Settings, origins: Mapping[str, str]) -> Settings:
    """Paths written in a configuration file are relative to that file; a rule-file
    pattern that matches nothing is an error here, where its line is known."""
    changes: dict[str, object] = {}
    probe = settings.probe
    if "probe" in origins and probe and probe.strip().lower() not in (*DATASETS, "random"):
        changes["probe"] = str(directory / probe)  # an absolute probe path stays as it is
    if "extend_rules" in origins:
        patterns = []
        for pattern in settings.extend_rules:
            full = os.path.join(glob.escape(str(directory)), pattern)
            if not glob.glob(full):
                raise ConfigError(
                    f"{origins['extend_rules']}: extend-rules: {pattern!r} matches no rule "
                    f"file in {directory}"
                )
            patterns.append(full)
        changes["extend_rules"] = tuple(patterns)
    return replace(settings, **changes)


def _check_rule_names(
    settings: Settings,
    table: Mapping[str, object],
    file: Path,
    text: str,
    prefix: tuple[str, ...],
) -> None:
    """Every rule the file names must exist among the built-in and ``extend-rules`` rules,
    and every key of a ``[rules.NAME]`` table must be a threshold or parameter of it."""
    every = rules.load_rule_set(Settings(extend_rules=settings.extend_rules))
    for key, value in table.items():
        name = key.replace("-", "_")
        where = _where(file, text, (*prefix, key))
        if name in ("select", "ignore", "extend_select") and value is not None:
            for selector in getattr(settings, name) or ():
                rules.resolve(every, selector, f"{where}: {key}")
        elif name == "per_layer_ignores":
            for pattern, selectors in settings.per_layer_ignores.items():
                at = _where(file, text, (*prefix, key, pattern))
                for selector in selectors:
                    rules.resolve(every, selector, f"{at}: {key}.{pattern}")
        elif name == "rules":
            for rule_key, overrides in settings.rules.items():
                at = _where(file, text, (*prefix, key, rule_key))
                rule = _one_rule(every, rule_key, f"{at}: rules")
                for option, number in overrides.items():
                    line = _where(file, text, (*prefix, key, rule_key, option))
                    rule.with_overrides({option: number}, f"{line}: rules.{rule_key}")


def _one_rule(every: Sequence[rules.Rule], key: str, where: str) -> rules.Rule:
    exact = [r for r in every if key in (r.code, r.slug)]
    if exact:
        return exact[0]
    rules.resolve(every, key, where)  # unknown: raises with a suggestion
    raise ConfigError(f"{where}: {key!r} names several rules; give one code or slug")


# -- where a key is ---------------------------------------------------------------------

_KEY_PART = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*""")


def key_line(text: str, keys: Sequence[str]) -> int | None:
    """The 1-based line where the dotted key ``keys`` is defined in TOML ``text``.

    The definition is a table header (``[tool.modelcheck.rules.dead-units]``) or a
    ``key = value`` line under a header, dotted keys included. A key inside an inline
    table or a multi-line value is found as the first ``key =`` after its parent's line.
    Returns None when nothing matches (the caller then names the file alone).
    """
    keys = tuple(keys)
    anchors = list(_anchors(text))
    for path, line in anchors:  # the first definition; [a.b.c] or a.b.c = 1 defines a.b
        if path[: len(keys)] == keys:
            return line
    parents = [(path, line) for path, line in anchors if keys[: len(path)] == path]
    if not parents:
        return None
    path, line = max(parents, key=lambda item: (len(item[0]), item[1]))
    leaf = re.compile(r"""(?:^|[\s{{,.])(?:"{0}"|'{0}'|{0})\s*=""".format(re.escape(keys[-1])))
    lines = text.splitlines()
    for number in range(line, len(lines) + 1):
        content = lines[number - 1]
        if number == line:  # the parent's own line: look inside its value only
            content = content.split("=", 1)[1] if "=" in content else ""
        elif content.lstrip().startswith("["):
            break
        if leaf.search(content):
            return number
    return line


def _anchors(text: str) -> Iterator[tuple[tuple[str, ...], int]]:
    """(full dotted key, line) of every table header and top-level ``key =`` line."""
    table: tuple[str, ...] = ()
    in_string = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        stripped = line.strip()
        header = re.match(r"^\[\[?(.*?)\]\]?\s*(#.*)?$", stripped)
        if header:
            table = _dotted(header.group(1)) or table
            yield table, number
            continue
        if "=" in stripped and not stripped.startswith("#"):
            key = _dotted(stripped.split("=", 1)[0])
            if key:
                yield (*table, *key), number
            value = stripped.split("=", 1)[1]
            for quotes in ('"""', "'''"):
                if value.count(quotes) % 2:
                    in_string = quotes


def _dotted(source: str) -> tuple[str, ...]:
    """The parts of a dotted TOML key, or () if ``source`` is not one."""
    parts, position = [], 0
    while True:
        match = _KEY_PART.match(source, position)
        if not match or match.end() == position:
            return ()
        quoted, literal, bare = match.groups()
        parts.append(
            bare if bare is not None else literal if literal is not None else _unescape(quoted)
        )
        position = match.end()
        if position == len(source):
            return tuple(parts)
        if source[position] != ".":
            return ()
        position += 1


def _unescape(quoted: str) -> str:
    try:
        return json.loads(f'"{quoted}"')
    except json.JSONDecodeError:
        return quoted


# -- showing them -----------------------------------------------------------------------


def describe(configured: Configured, cli: Mapping[str, object] = ()) -> str:
    """The resolved settings as a ``[tool.modelcheck]`` table, each line saying where its
    value came from, so the output can be pasted into a pyproject.toml."""
    cli = dict(cli)
    source = str(configured.path) if configured.path else "none (built-in defaults)"
    lines = [
        f"# Configuration file: {source}",
        "# Precedence: command line > configuration file > built-in defaults",
        "[tool.modelcheck]",
    ]
    for f in fields(Settings):
        value = getattr(configured.settings, f.name)
        key = f.name.replace("_", "-")
        origin = "command line" if f.name in cli else configured.origins.get(f.name, "default")
        text = f"{key} = {_toml(value)}" if value is not None else f"# {key} is not set"
        lines.append(f"{text:<48} # {origin}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items())
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
