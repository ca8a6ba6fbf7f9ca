"""The ``modelcheck`` command: flags mapped onto ``modelcheck.check()``, linter-style.

Exit codes: 0 nothing at or above ``--fail-on``; 1 findings at or above it; 2 the check
could not run (one line on stderr, a traceback only with ``--debug``); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). A run that does not finish writes no file.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from modelcheck import __version__, config
from modelcheck import rules as rules_module
from modelcheck.errors import CaptureError, ConfigError, ModelcheckError
from modelcheck.filekind import sniff
from modelcheck.renderers import (
    FORMATS,
    STATISTICS_FORMATS,
    format_number,
    printable,
    render,
    render_statistics,
)
from modelcheck.report import Report, write_atomic
from modelcheck.settings import LOSS_CHOICES, SEVERITY_CHOICES, Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modelcheck.probe import Probe

COMMANDS = ("demo", "rules", "rule", "metrics")
DEMO_HTML = "modelcheck-demo.html"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit code 2, like any bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


class _Terminated(BaseException):
    """SIGTERM (a cancelled CI job), raised like Ctrl-C so that clean-up code runs."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with _termination_raises():
            if argv and argv[0] in COMMANDS:
                return _COMMANDS[argv[0]](argv[1:])
            return _check_command(argv)
    except ModelcheckError as error:
        return _fail(f"error: {error}", debug)
    except KeyboardInterrupt:
        print("modelcheck: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("modelcheck: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # stdout closed early (`modelcheck ... | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a bug of ours: still one line, and exit 2 (no verdict)
        return _fail(
            f"internal error: {type(error).__name__}: {error} (a bug in modelcheck; "
            "--debug shows the traceback to report)",
            debug,
        )


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    # Messages quote file contents (keys, module names): escape control characters, so
    # that the line stays one line and cannot drive the terminal or a CI log parser.
    print(f"modelcheck: {printable(message)}", file=sys.stderr)
    return 2


@contextmanager
def _termination_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- modelcheck MODEL ------------------------------------------------------------------------


def _output_options(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS, default="text", help="output format")
    out.add_argument(
        "--statistics", action="store_true", help="count findings per rule instead of listing"
    )
    out.add_argument("-o", "--output", metavar="FILE", help="write the output to FILE")
    out.add_argument("--html", metavar="PATH", help="also write the HTML report to PATH")
    out.add_argument("--show-fixes", action="store_true", help="list fixes under each finding")
    out.add_argument("--exit-zero", action="store_true", help="exit 0 even with findings")
    out.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _rule_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rules")
    group.add_argument("--select", metavar="RULES", help="comma-separated codes, prefixes, slugs")
    group.add_argument("--ignore", metavar="RULES", help="rules not to check")
    group.add_argument("--extend-select", metavar="RULES", help="rules to add to --select")
    group.add_argument(
        "--fail-on",
        choices=SEVERITY_CHOICES,
        help="lowest severity that makes the exit code 1 (default: error)",
    )


def _check_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="modelcheck",
        description="Lint a PyTorch model's health: dead units, saturation, exploding and "
        "vanishing signals. Other commands: `modelcheck demo`, `modelcheck rules`, "
        "`modelcheck rule CODE`.",
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="model file: TorchScript, torch.export (.pt2), a state_dict or safetensors file "
        "(with --arch), or a pickled module (with --trust); recognised by content",
    )
    parser.add_argument("--version", action="version", version=f"modelcheck {__version__}")
    settings = parser.add_argument_group("settings")
    settings.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from FILE (default: [tool.modelcheck] of the nearest pyproject.toml)",
    )
    settings.add_argument(
        "--show-settings", action="store_true", help="print the resolved settings and exit"
    )
    source = parser.add_argument_group("model")
    source.add_argument(
        "--arch",
        metavar="MODULE:FACTORY",
        help="factory that builds the module a state_dict belongs to",
    )
    source.add_argument("--arch-kwargs", metavar="JSON", help="keyword arguments for --arch")
    source.add_argument(
        "--trust",
        action="store_true",
        help="allow unpickling a whole module (runs code from the file)",
    )
    probe = parser.add_argument_group("probe")
    probe.add_argument(
        "--probe",
        metavar="SPEC",
        help="file (.pt .npy .npz .csv), dataset (iris digits wine "
        "breast_cancer) or 'random' (default)",
    )
    probe.add_argument("--target", metavar="COLUMN", help="label column of a CSV probe")
    probe.add_argument(
        "--no-standardize", action="store_true", help="keep dataset features as they are"
    )
    probe.add_argument(
        "--input-shape",
        metavar="DIMS",
        help="shape of one sample: 3,32,32 (random probes draw it; a file's or dataset's "
        "samples are reshaped to it: digits to 1,8,8)",
    )
    probe.add_argument("--batch-size", type=int)
    probe.add_argument("--max-samples", type=int)
    probe.add_argument("--seed", type=int)
    run = parser.add_argument_group("run")
    run.add_argument("--loss", choices=LOSS_CHOICES, help="loss with labels (default: auto)")
    run.add_argument("--train-mode", action="store_true", help="run in train mode")
    run.add_argument("--no-gradients", action="store_true", help="forward pass only")
    run.add_argument(
        "--output-key",
        metavar="KEY",
        help="part of the model's output to check: a key, attribute or index (default: logits, "
        "sentence_embedding or last_hidden_state, else the first float tensor)",
    )
    run.add_argument(
        "--forward-kwargs",
        metavar="JSON",
        help="keyword arguments for every forward call, e.g. '{\"sr\": 16000}'",
    )
    run.add_argument(
        "--unit-axis",
        metavar="PATTERN=AXIS",
        action="append",
        help="axis of the units of layers matching PATTERN (repeatable), e.g. 'rnn*=-1'",
    )
    run.add_argument(
        "--device",
        metavar="DEVICE",
        help="run the check on this device (cpu, cuda, cuda:1); default: where the model is",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    _rule_options(parser)
    _output_options(parser)
    return parser


def _cli_values(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as flags: these override the configuration file."""
    values: dict[str, object] = {}
    for name in ("select", "ignore", "extend_select"):
        if getattr(args, name, None):
            values[name] = getattr(args, name)
    for name in ("fail_on", "loss", "batch_size", "max_samples", "seed"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if getattr(args, "train_mode", False):
        values["train_mode"] = True
    if getattr(args, "no_gradients", False):
        values["gradients"] = False
    if getattr(args, "output_key", None) is not None:
        values["output_key"] = args.output_key
    if getattr(args, "forward_kwargs", None) is not None:
        values["forward_kwargs"] = _json_object(args.forward_kwargs, "--forward-kwargs")
    if getattr(args, "unit_axis", None):
        values["unit_axes"] = dict(_unit_axis(text) for text in args.unit_axis)
    if getattr(args, "quiet", False):
        values["progress"] = False
    return values


def _settings_from(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    return (base or Settings()).updated(_cli_values(args), "command line")


def _unit_axis(text: str) -> tuple[str, int]:
    pattern, _, axis = text.rpartition("=")
    try:
        return pattern, int(axis)
    except ValueError:
        raise ConfigError(
            f"--unit-axis {text!r} must be PATTERN=AXIS, e.g. 'encoder.*=-1'"
        ) from None


def _check_command(argv: list[str]) -> int:
    parser = _check_parser()
    args = parser.parse_args(argv)
    configured = config.load(args.config)
    settings = _settings_from(args, configured.settings)
    if args.show_settings:
        cli = _cli_values(args)
        shown = config.Configured(settings, configured.path, configured.origins)
        sys.stdout.write(config.describe(shown, cli))
        return 0
    if args.model is None:
        parser.error("the following arguments are required: model")
    _check_output_flags(args)
    spec = args.probe or settings.probe or "random"
    rule_files = (f for pattern in settings.extend_rules for f in glob.glob(pattern))
    inputs = [args.model, spec, *rule_files, configured.path and str(configured.path)]
    _check_output(args.output, inputs)  # before the work, not after it
    _check_html_path(args.html, [*inputs, args.output])
    sniff(args.model)  # a path that holds no model is refused before torch's start-up
    # Only here, where a model runs, are torch and the stages imported (~1.5 s): --help,
    # --show-settings and `modelcheck rule` answer without them.
    from modelcheck.distributed import launched

    with launched(_device(args.device)) as device:  # under torchrun: one rank each
        return _check_file(args, settings, spec, inputs, device)


def _check_file(
    args: argparse.Namespace,
    settings: Settings,
    spec: str,
    inputs: list[str | None],
    device: torch.device | None,
) -> int:
    from modelcheck.engine import check
    from modelcheck.probe import infer_input_shape, probe_from_spec
    from modelcheck.source import load_model

    loaded = load_model(
        args.model, arch=args.arch, arch_kwargs=_json_kwargs(args.arch_kwargs), trust=args.trust
    )
    if device is not None:
        loaded.module.to(device)  # the CLI loaded this model: moving it is ours to do
    if args.arch:
        inputs.append(getattr(sys.modules.get(args.arch.partition(":")[0]), "__file__", None))
    args.inputs = inputs
    shape = _shape(args.input_shape)
    if spec == "random" and shape is None:
        shape = infer_input_shape(loaded.module)
    probe = probe_from_spec(
        spec,
        input_shape=shape,
        target=args.target,
        batch_size=settings.batch_size,
        max_samples=settings.max_samples,
        seed=settings.seed,
        standardize=not args.no_standardize,
    )
    try:
        report = check(loaded, probe, settings=settings)
    except CaptureError as error:
        hint = _probe_hint(spec, args.target, loaded.module, probe)
        if not hint:
            raise
        raise CaptureError(f"{error}; {hint}") from error
    # The format found, first, where a reader (not a parser) reads the output.
    readable = args.format == "text" and not args.statistics
    return _emit(report, args, f"{args.model}: {loaded.description}\n" if readable else "")


def _probe_hint(spec: str, target: str | None, module: nn.Module, probe: Probe) -> str:
    """Advice for a forward that failed on a probe file whose labels may have gone in as
    inputs: a CSV read without --target that has one column more than the model's first
    Linear takes, or a file of named arrays, which go to forward by name."""
    from modelcheck.probe import infer_input_shape

    first = next(iter(probe.batches))
    if isinstance(first.inputs, Mapping) and first.target is None:
        names = ", ".join(map(repr, first.inputs))
        return (
            f"{spec}'s arrays {names} went to the model as named inputs; to give inputs and "
            "labels, name them x and y"
        )
    if target is not None or not spec.lower().endswith(".csv"):
        return ""
    try:
        (features,) = infer_input_shape(module)
    except (ModelcheckError, ValueError):  # no Linear first, or a multi-axis sample
        return ""
    columns = first.inputs.shape[-1]
    if columns != features + 1:
        return ""
    return (
        f"all {columns} columns of {spec} went in as inputs and the model takes {features}: "
        "if one is the label, name it with --target"
    )


def _check_output_flags(args: argparse.Namespace) -> None:
    if args.statistics and args.format not in STATISTICS_FORMATS:
        raise ConfigError(
            f"--statistics works with --format {', '.join(STATISTICS_FORMATS)}, not {args.format}"
        )


def _emit(report: Report, args: argparse.Namespace, preface: str = "") -> int:
    from modelcheck.distributed import current_group

    group = current_group()
    if group is not None and group.rank != 0:  # under torchrun, rank 0 alone writes
        return 0 if report.ok or args.exit_zero else 1
    if args.statistics:
        text = render_statistics(report, args.format)
    else:
        text = render(report, args.format, show_fixes=args.show_fixes)
    inputs = getattr(args, "inputs", ())  # with the --arch module, known only now
    _check_output(args.output, inputs)
    _check_html_path(args.html, [*inputs, args.output])
    if args.html:
        try:
            report.write_html(args.html)
        except OSError as error:
            raise ConfigError(f"--html {args.html}: cannot write it ({error.strerror})") from None
    if args.output:
        try:
            write_atomic(args.output, text)
        except OSError as error:
            raise ConfigError(
                f"--output {args.output} could not be written ({error.strerror or error})"
            ) from None
    else:
        sys.stdout.write(preface + text)
    if args.html:
        # Beside the text on a terminal; on stderr when stdout carries JSON or a file does.
        stream = sys.stdout if args.format == "text" and not args.output else sys.stderr
        stream.write(f"HTML report: {Path(args.html).resolve()}\n")
    return 0 if report.ok or args.exit_zero else 1


def _check_html_path(path: str | None, inputs: Sequence[str | None]) -> None:
    """Fail before the run, not after it, when the report could not be written there."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--html {path} is a directory; give a file name like report.html")
    if not target.parent.is_dir():
        raise ConfigError(f"--html {path}: directory {target.parent} does not exist")
    for other in inputs:
        same = other and (
            Path(other).resolve() == target.resolve()
            or (target.exists() and os.path.exists(other) and target.samefile(other))
        )
        if same:
            raise ConfigError(f"--html {path} would overwrite {other}")


def _check_output(output: str | None, inputs: Sequence[str | None]) -> None:
    """Refuse an output path that cannot be written or would replace one of the inputs
    (the model, the probe, the configuration and rule files, the --arch module)."""
    if output is None:
        return
    if os.path.isdir(output):
        raise ConfigError(f"--output {output} is a directory; give a file name")
    parent = os.path.dirname(output) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"--output {output}: the directory {parent} does not exist")
    for path in inputs:
        if (
            path
            and os.path.exists(path)
            and os.path.exists(output)
            and os.path.samefile(output, path)
        ):
            raise ConfigError(f"--output {output} would overwrite the input file {path}")


def _device(text: str | None) -> torch.device | None:
    """The --device to run on, refused early when it cannot be used here."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu" and not _available(device):
        raise ConfigError(f"--device {text}: no {device.type} device is available")
    return device


def _available(device: torch.device) -> bool:
    import torch

    backend = getattr(torch, device.type, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def _json_kwargs(text: str | None) -> dict | None:
    return None if text is None else _json_object(text, "--arch-kwargs")


def _json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{flag} is not valid JSON: {error.msg} at {error.pos}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"width\": 64}}'")
    return value


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    sizes = re.split(r"[,x]", text.strip().removesuffix(","))  # "3,32,32", "3x32x32", "4,"
    dims = tuple(int(size) for size in sizes if size.strip().isdigit())
    if len(dims) != len(sizes) or min(dims, default=0) < 1:
        raise ConfigError(f"--input-shape {text!r} must be positive integers like 3,32,32")
    return dims


# -- modelcheck demo -------------------------------------------------------------------------


def _demo_command(argv: list[str]) -> int:
    parser = _Parser(
        prog="modelcheck demo", description="Train the seed article's Iris network and check it."
    )
    _rule_options(parser)
    _output_options(parser)
    parser.add_argument(
        "--no-html", action="store_true", help=f"do not write the HTML report ({DEMO_HTML})"
    )
    args = parser.parse_args(argv)
    _check_output_flags(args)
    from modelcheck.demo import run_demo

    if args.no_html:
        args.html = None
    elif args.html is None:
        args.html = DEMO_HTML
    _check_html_path(args.html, [args.output])
    settings = _settings_from(args)
    _, report = run_demo(settings=settings)
    preface = (
        "Trained the seed article's Iris network (4-64-32-16-3 with F.relu, MSE on one-hot "
        "labels, Adam lr 1e-3, 500 epochs)\nand checked it on the 30 test samples:\n\n"
    )
    args.show_fixes = args.show_fixes or args.format == "text"
    return _emit(report, args, preface if args.format == "text" and not args.statistics else "")


# -- modelcheck rules / rule CODE -----------------------------------------------------------------


def _rules_command(argv: list[str]) -> int:
    parser = _Parser(
        prog="modelcheck rules",
        description="List the rules: the built-in ones and the project's extend-rules, "
        "with the project's thresholds.",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    _config_option(parser)
    args = parser.parse_args(argv)
    every = rules_module.load_rule_set(config.load(args.config).settings)
    if args.format == "json":
        rows = [
            {
                "code": r.code,
                "slug": r.slug,
                "title": r.title,
                "status": r.status,
                "thresholds": dict(r.thresholds),
            }
            for r in every
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r.slug) for r in every)
    for r in every:
        levels = ", ".join(_level(s, t) for s, t in r.thresholds.items())
        print(f"{r.code}  {r.slug:{width}}  {r.title}" + (f"  [{levels}]" if levels else ""))
    return 0


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file whose extend-rules and thresholds apply (default: the "
        "nearest pyproject.toml with [tool.modelcheck])",
    )


def _metrics_command(argv: list[str]) -> int:
    parser = _Parser(
        prog="modelcheck metrics",
        description="List the names and functions a rule's expressions and messages can use.",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    sections = rules_module.NAMES_BY_SCOPE
    if args.format == "json":
        print(json.dumps({key: dict(names) for key, (_, names) in sections.items()}, indent=2))
        return 0
    for heading, names in sections.values():
        width = max(map(len, names))
        print(heading)
        print("\n".join(f"  {name:{width}}  {doc}" for name, doc in names.items()), end="\n\n")
    print("How a rule file uses them: 'Writing a rule' in modelcheck's README.")
    return 0


def _level(severity: str, threshold: float) -> str:
    """``warning 50``; an unbounded level (info at -inf: whenever the condition holds) is
    its name alone."""
    return f"{severity} {format_number(threshold)}" if math.isfinite(threshold) else severity


def _rule_command(argv: list[str]) -> int:
    parser = _Parser(prog="modelcheck rule", description="Explain one rule.")
    parser.add_argument("rule", help="code (MC101) or slug (dead-units)")
    _config_option(parser)
    args = parser.parse_args(argv)
    every = rules_module.load_rule_set(config.load(args.config).settings)
    matches = [r for r in every if args.rule in (r.code, r.slug)]
    if not matches:
        rules_module.resolve(every, args.rule, "rule")  # raises, with a suggestion
        matches = rules_module.resolve(every, args.rule, "rule")
    for rule in matches:
        print(explain(rule))
    return 0


def explain(rule: rules_module.Rule) -> str:
    """The rule's documentation under fixed headings, as ``modelcheck rule`` prints it."""

    def wrap(text: str, first: str = "  ", rest: str = "  ") -> str:
        return textwrap.fill(
            " ".join(text.split()), 88, initial_indent=first, subsequent_indent=rest
        )

    lines = [
        f"{rule.code} {rule.slug} — {rule.title}",
        "",
        "What it does",
        wrap(rule.what),
        "",
        "Why it matters",
        wrap(rule.why),
        "",
    ]
    if rule.example:
        lines += ["Example", f"  {rule.example}", ""]
    lines.append("How to fix")
    lines += [wrap(f.text, "  - ", "    ") for f in rule.fixes]
    settings = [f"{k} = {format_number(v)}" for k, v in {**rule.thresholds, **rule.params}.items()]
    if settings:
        lines += [
            "",
            "Settings (override in [tool.modelcheck.rules." + rule.slug + "])",
            "  " + ", ".join(settings),
        ]
    if rule.references:
        lines += ["", "References", *(f"  - {r}" for r in rule.references)]
    lines.append(f"\nDefined in {Path(rule.path).name}")
    return "\n".join(lines)


_COMMANDS = {
    "demo": _demo_command,
    "rules": _rules_command,
    "rule": _rule_command,
    "metrics": _metrics_command,
}


if __name__ == "__main__":
    raise SystemExit(main())
