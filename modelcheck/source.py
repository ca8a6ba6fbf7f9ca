"""Source stage: turn a model file into an ``nn.Module``, or say in one line why it cannot.

The format is read from the file's content, never from its extension. Pickle can run code, so
nothing beyond tensors is unpickled unless the caller says the file is trusted: a state_dict is
loaded with ``weights_only=True`` into a module built by a factory the user names (``--arch``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import pickle
import pickletools
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch

from modelcheck.errors import ConfigError, ModelcheckError, SourceError
from modelcheck.filekind import ARCHIVES, sniff

__all__ = ["LoadedModel", "import_factory", "load_model", "verify_archive"]

# Keys under which training scripts commonly nest the state_dict of a checkpoint.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

_ARCH_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATE_DICT_ROUTE = "save model.state_dict() instead and pass --arch package.module:factory"
_TRUST_HINT = "if you trust this file, pass --trust (trust=True in Python)"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A module ready to be checked, and how it was obtained, for the report."""

    module: torch.nn.Module
    source: str  # the path as the user gave it
    format: str  # "torchscript" | "torch-export" | "safetensors" | "state_dict" | "pickled-module"
    description: str  # one line for the report


def load_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, object] | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load the model in ``path``; raise ``SourceError`` with one line if that is impossible.

    A state_dict needs ``arch`` ("package.module:factory") to build the module it fits, called
    with ``arch_kwargs``. A whole pickled module is only unpickled when ``trust`` is true.
    """
    shown = os.fspath(path)
    kind = sniff(shown)
    if kind in ARCHIVES:
        verify_archive(shown)  # before anything unpickles a record
    if kind == "torchscript":
        return _load_torchscript(shown)
    if kind == "torch-export":
        return _load_exported(shown, trust)
    if kind == "safetensors":
        state = _read_safetensors(shown)
        return _load_state_dict(shown, state, None, arch, arch_kwargs, "safetensors")
    loaded = _load_pickle(shown, trust) if kind == "pickle" else _torch_load(shown, trust)
    payload, wrapper = _unwrap(loaded)
    if isinstance(payload, torch.nn.Module):
        name = f"{type(payload).__module__}.{type(payload).__qualname__}"
        notes = [" (trusted)" if trust else "", "; --arch ignored" if arch else ""]
        return LoadedModel(
            payload, shown, "pickled-module", f"pickled module {name}{''.join(notes)}"
        )
    if not _is_state_dict(payload):
        raise SourceError(f"{shown} holds {_describe(loaded)}, not a model or a state_dict")
    return _load_state_dict(shown, payload, wrapper, arch, arch_kwargs)


def import_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """Import the callable named by "package.module:factory" (the factory may be dotted).

    The current directory is importable, as it is for ``python -m``; ``sys.path`` is restored
    afterwards so that loading a model leaves no trace on the interpreter beyond the import.
    """
    if not isinstance(spec, str) or not _ARCH_SPEC.fullmatch(spec):
        raise SourceError(
            f"--arch {spec!r} is not of the form package.module:factory "
            "(e.g. mypackage.models:make_net)"
        )
    module_name, _, attribute = spec.partition(":")
    module = _import_from_cwd(spec, module_name)
    factory: object = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise SourceError(
                f"--arch {spec}: module '{module_name}' has no attribute '{attribute}'"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise SourceError(
            f"--arch {spec}: '{attribute}' is a {type(factory).__name__}, not callable"
        )
    return factory


def _load_torchscript(path: str) -> LoadedModel:
    # TorchScript archives hold TorchScript code and tensors, read by torch's own loader,
    # not by Python's pickle: no --trust needed.
    try:
        with warnings.catch_warnings():  # torch's advice to move to torch.export, not ours
            warnings.simplefilter("ignore")
            module = torch.jit.load(path, map_location="cpu")
    except Exception as error:
        raise SourceError(
            f"{path} is a TorchScript archive that torch.jit.load cannot read "
            f"({type(error).__name__}: {_brief(error)})"
        ) from None
    name = getattr(module, "original_name", type(module).__name__)
    return LoadedModel(module, path, "torchscript", f"TorchScript module {name}")


def _load_exported(path: str, trust: bool) -> LoadedModel:
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():  # torch's own deprecations
            warnings.simplefilter("ignore")
            with contextlib.nullcontext() if trust else _plain_tensors_only():
                program = torch.export.load(path)
            module = program.module()
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(error)))
        raise _unsafe(path, found.group(1) if found else "a pickled object") from None
    except Exception as error:
        raise SourceError(
            f"{path} is a torch.export program that torch.export.load cannot read "
            f"({type(error).__name__}: {_brief(error)})"
        ) from None
    signature = ", ".join(
        f"{tuple(s.shape)}" for s in _example_inputs(program) if isinstance(s, torch.Tensor)
    )
    shapes = f" exported for inputs {signature}" if signature else ""
    return LoadedModel(module, path, "torch-export", f"torch.export program{shapes}")


@contextmanager
def _plain_tensors_only() -> Iterator[None]:
    """Inside, torch.load reads plain tensors only and pickle.loads refuses.

    torch.export.load unpickles parts of a .pt2 archive with weights_only=False (weights
    and constants marked as pickled, opaque constants) and falls back to it when the
    example inputs fail a weights-only load, so a crafted archive runs code on loading.
    The archive's own format needs neither; its TorchScript objects go through torch's
    C++ unpickler, which resolves no Python globals.
    """
    real_load = torch.load

    def weights_only(*args: object, **kwargs: object) -> object:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*args: object, **kwargs: object) -> object:
        raise pickle.UnpicklingError("the archive holds a pickled object, which could run code")

    with mock.patch.object(torch, "load", weights_only), mock.patch.object(pickle, "loads", refuse):
        yield


@contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    # torch.export.load logs (and, with a malformed log call, prints a traceback) when it
    # falls back to a full unpickling: the one-line error says what matters.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _example_inputs(program: object) -> list[object]:
    example = getattr(program, "example_inputs", None)
    if not example:
        return []
    args, kwargs = example
    return [*args, *kwargs.values()]


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file: a JSON header and raw data, no code to run."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SourceError(
            f"{path} is a safetensors file; reading it needs the safetensors package "
            "(pip install safetensors)"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as error:
        raise SourceError(
            f"{path} is truncated or corrupted (safetensors: {_brief(error)})"
        ) from None


# torch.save stores its records uncompressed; a re-zipped file may deflate them, but a
# ratio beyond this is a decompression bomb, not a model.
_MAX_EXPANSION = 100


def verify_archive(path: str, error: type[ModelcheckError] = SourceError) -> None:
    """Check every record of a zip archive against its CRC-32 before anything unpickles it,
    and refuse a decompression bomb; raise ``error`` with one line if the file fails.

    torch.load reads records without checking their checksums, so a flipped byte in the
    weights would be checked as if it were the model. Reading the file once more costs
    about as much as loading it. The probe stage checks ``.pt`` probes the same way.
    """
    try:
        size = os.stat(path).st_size
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            if declared > _MAX_EXPANSION * size + 2**20:
                raise error(
                    f"{path} declares {declared / 2**30:.1f} GiB of records in a "
                    f"{size / 2**20:.1f} MiB file; refusing to decompress it"
                )
            damaged = archive.testzip()
    except ModelcheckError:
        raise
    except Exception as failure:  # zipfile raises several types for broken records
        raise error(f"{path} is truncated or corrupted ({_brief(failure)})") from None
    if damaged is not None:
        raise error(f"{path} is corrupted: its record {damaged} fails its checksum")


# --- unpickling ------------------------------------------------------------------------------


def _torch_load(path: str, trust: bool) -> object:
    try:
        with warnings.catch_warnings():
            # torch warns about odd files before failing on them; the error says it all.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if trust:
            raise SourceError(f"{path} could not be unpickled ({_brief(error)})") from None
        raise _refusal(path, error) from None
    except (AttributeError, ImportError) as error:
        raise SourceError(
            f"{path} could not be unpickled ({_brief(error)}); the classes it holds must be "
            f"importable here, or {_STATE_DICT_ROUTE}"
        ) from None
    except (EOFError, IndexError, KeyError, struct.error) as error:
        # What the unpickler trips over when the bytes stop or are garbled mid-stream.
        detail = _brief(error, empty="the data ends early")
        raise SourceError(f"{path} is truncated or corrupted ({detail})") from None
    except Exception as error:
        detail = _brief(error)
        if re.search(r"EOF|corrupt|central directory|failed read", detail, re.IGNORECASE):
            raise SourceError(f"{path} is truncated or corrupted ({detail})") from None
        raise SourceError(
            f"{path} could not be loaded by torch.load ({type(error).__name__}: {detail})"
        ) from None


def _refusal(path: str, error: pickle.UnpicklingError) -> SourceError:
    """Explain why the weights-only unpickler stopped, naming the global it was asked for."""
    message = _ANSI.sub("", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", message)
    imported, damage = _scan_pickles(path)
    if found:
        wanted = found.group(1)
        # torch prints builtins unqualified ("exec"); say where they come from.
        return _unsafe(path, wanted if "." in wanted else f"builtins.{wanted}", imported)
    if damage:  # not a security question: --trust would not help
        return SourceError(f"{path} is truncated or corrupted (not a valid pickle: {damage})")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    reason = detail.group(1).strip() if detail else _brief(error)
    return SourceError(
        f"{path} could not be read as plain tensors ({reason}); the file may be corrupted, or "
        f"hold objects whose unpickling could run code: {_TRUST_HINT}"
    )


def _unsafe(path: str, wanted: str | None, found: list[str] | None = None) -> SourceError:
    what = (
        f"needs to unpickle {_worst_first(wanted, found or [])}" if wanted else "is a plain pickle"
    )
    return SourceError(
        f"{path} {what}, and unpickling can run arbitrary code; {_TRUST_HINT}, "
        f"or {_STATE_DICT_ROUTE}"
    )


def _load_pickle(path: str, trust: bool) -> object:
    """A plain pickle (pickle.dump, not torch.save) is code to run: refuse it unless trusted."""
    if not trust:
        imported, damage = _scan_pickles(path)
        if damage:
            raise SourceError(f"{path} is truncated or corrupted (not a valid pickle: {damage})")
        raise _unsafe(path, imported[0] if imported else None, imported)
    try:
        with open(path, "rb") as file:
            return pickle.load(file)
    except Exception as error:
        raise SourceError(
            f"{path} could not be unpickled ({type(error).__name__}: {_brief(error)})"
        ) from None


# Globals a weights-only load of a torch file may need anyway; anything else is named first.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "__builtin__.set")
_SHOWN_GLOBALS = 4


def _worst_first(wanted: str, found: list[str]) -> str:
    """The globals a file imports, the ones that have nothing to do with tensors first:
    deciding whether to pass --trust, ``posix.system`` says more than the model class."""
    names = list(dict.fromkeys([*found, wanted]))
    names.sort(key=lambda name: name.startswith(_TENSOR_GLOBALS))
    shown = ", ".join(names[:_SHOWN_GLOBALS])
    more = len(names) - _SHOWN_GLOBALS
    return shown + (f" (and {more} more)" if more > 0 else "")


def _scan_pickles(path: str) -> tuple[list[str], str | None]:
    """Read a file's pickles as opcodes, without running them: every module-level name
    they import, and why the first one is not a valid pickle (None if it is).

    A zip archive's pickle is its ``data.pkl``; a legacy torch file holds four pickles
    before its raw tensor data, a plain pickle one.
    """
    imported: list[str] = []
    try:
        stream = _pickle_stream(path)
    except Exception as error:
        return imported, _brief(error)
    with stream:
        for index in range(4):
            try:
                imported += _globals(pickletools.genops(stream))
            except Exception as error:  # the end of the pickles, or damage in the first
                if index == 0:
                    return list(dict.fromkeys(imported)), _brief(error)
                break
    return list(dict.fromkeys(imported)), None


def _pickle_stream(path: str) -> io.BufferedIOBase:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return io.BytesIO(archive.read(name))
    return open(path, "rb")  # the caller closes it


def _globals(ops: Iterator[tuple[pickletools.OpcodeInfo, object, int | None]]) -> Iterator[str]:
    # STACK_GLOBAL takes module and name from the stack; protocol 4 pickles memoise those
    # strings and fetch them back, so follow the memo well enough to name what is imported.
    strings: list[str] = []
    memo: dict[object, object] = {}
    top: object = None  # the value on top of the stack, when the last push was a string
    for op, arg, _ in ops:
        name = op.name
        if name == "GLOBAL":
            yield str(arg).replace(" ", ".")
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            yield f"{strings[-2]}.{strings[-1]}"
        if "UNICODE" in name or name.endswith("STRING"):
            top = arg
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = top
            continue
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top
            continue
        else:
            top = None
        if isinstance(top, str):
            strings.append(top)


# --- from the unpickled object to a module ---------------------------------------------------


def _unwrap(loaded: object) -> tuple[object, str | None]:
    """Find the model inside the common checkpoint wrappings; also say which key held it."""
    if isinstance(loaded, torch.nn.Module) or _is_state_dict(loaded):
        return loaded, None
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, torch.nn.Module) or _is_state_dict(inner):
                return inner, key
    return loaded, None


def _is_state_dict(value: object) -> bool:
    """A non-empty mapping of names to tensors (modules' extra state may be any object)."""
    return (
        isinstance(value, Mapping)
        and any(isinstance(v, torch.Tensor) for v in value.values())
        and all(
            isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
            for k, v in value.items()
        )
    )


def _load_state_dict(
    path: str,
    state: Mapping[str, torch.Tensor],
    wrapper: str | None,
    arch: str | None,
    arch_kwargs: Mapping[str, object] | None,
    fmt: str = "state_dict",
) -> LoadedModel:
    kind = "safetensors file" if fmt == "safetensors" else "state_dict"
    details = [f"{len(state)} tensors"]
    if wrapper:
        details.append(f"under the checkpoint key '{wrapper}'")
    if arch is None:
        raise SourceError(
            f"{path} holds a {kind} ({', '.join(details)}); pass --arch package.module:factory "
            "to build the model it belongs to"
        )
    kwargs = dict(arch_kwargs or {})
    call = f"{arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    module = _build(import_factory(arch), call, kwargs)
    state, prefix = _fitting_keys(state, module)
    if prefix:
        details.append(f"keys without the prefix '{prefix}'")
    mismatch = _first_mismatch(state, module.state_dict())
    if mismatch:
        read = f" (its keys read without the prefix '{prefix}')" if prefix else ""
        raise SourceError(f"{path} does not fit --arch {arch}{read}: {mismatch}")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as error:  # e.g. a custom _load_from_state_dict that refuses the values
        raise SourceError(f"{path} does not fit --arch {arch}: {_brief(error)}") from None
    return LoadedModel(module, path, fmt, f"{kind} ({', '.join(details)}) loaded into {call}")


def _fitting_keys(
    state: Mapping[str, torch.Tensor], module: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], str]:
    """The file's state as the module's keys name it, and the prefix removed for that.

    A model saved from inside a wrapper has every key under the wrapper's attribute:
    'module.' (DataParallel, DistributedDataParallel), '_orig_mod.' (torch.compile). Of the
    keys as they are and without each run of leading components they all share, the ones
    with the fewest mismatches are taken, so an error names the keys the model knows.
    Checkpoints written before a buffer became non-persistent still hold it (Hugging Face
    BERT's embeddings.position_ids): the module rebuilds it, so the file's copy is dropped.
    """
    model_state, dropped = module.state_dict(), _non_persistent_buffers(module)
    best = {k: v for k, v in state.items() if k not in dropped}
    best_prefix, fewest = "", len(_mismatches(best, model_state))
    keys, prefix = list(state), ""
    while fewest and (head := _shared_head(keys)):
        prefix += head
        keys = [key.removeprefix(head) for key in keys]
        stripped = {k: v for k, v in zip(keys, state.values()) if k not in dropped}
        count = len(_mismatches(stripped, model_state))
        if count < fewest:
            best, best_prefix, fewest = stripped, prefix, count
    return best, best_prefix


def _shared_head(keys: list[str]) -> str | None:
    """The first component of every key, with its dot, when all keys have that one."""
    heads = {key.partition(".")[0] + "." for key in keys}
    return heads.pop() if len(heads) == 1 and all("." in key for key in keys) else None


def _non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        for name in getattr(sub, "_non_persistent_buffers_set", ())
    }


def _build(factory: Callable[..., object], call: str, kwargs: dict[str, object]) -> torch.nn.Module:
    try:
        module = factory(**kwargs)
    except Exception as error:
        raise SourceError(
            f"--arch {call}: the factory raised {type(error).__name__}: {_brief(error)}"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise SourceError(
            f"--arch {call}: the factory returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module


def _first_mismatch(
    file_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> str | None:
    """Describe the first key that stops a strict load, in the model's order, then the file's.

    Checked before load_state_dict because its own error lists every key over many lines.
    """
    problems = _mismatches(file_state, model_state)
    if not problems:
        return None
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more mismatched key{'s' * (more > 1)})" if more else "")


def _mismatches(
    file_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
) -> list[str]:
    problems = []
    for key, wanted in model_state.items():
        if key not in file_state:
            problems.append(f"key '{key}' {_shape(wanted)} is in the model but not in the file")
        elif _has_shape(wanted) and file_state[key].shape != wanted.shape:
            problems.append(
                f"key '{key}' has shape {tuple(file_state[key].shape)} in the file "
                f"but {tuple(wanted.shape)} in the model"
            )
    problems += [
        f"key '{key}' {_shape(value)} is in the file but not in the model"
        for key, value in file_state.items()
        if key not in model_state
    ]
    return problems


# --- importing the factory -------------------------------------------------------------------


def _import_from_cwd(spec: str, module_name: str) -> object:
    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()  # a module written since the last import must be seen
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name + ".").startswith(error.name + "."):
            raise SourceError(
                f"--arch {spec}: cannot import module '{module_name}' ({error}); it must be "
                "importable from the current directory or an installed package"
            ) from None
        raise SourceError(f"--arch {spec}: importing '{module_name}' failed: {error}") from None
    except Exception as error:
        raise SourceError(
            f"--arch {spec}: importing '{module_name}' raised {type(error).__name__}: "
            f"{_brief(error)}"
        ) from None
    finally:
        sys.path[:] = saved


# --- wording ---------------------------------------------------------------------------------


def _brief(error: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message, cut at its first sentence when very long."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if not lines:
        return empty or type(error).__name__
    first = lines[0]
    if len(first) > 160 and ". " in first:
        first = first[: first.index(". ")]
    return first


def _has_shape(value: object) -> bool:
    # Lazy parameters get their shape from the load; extra state (get_extra_state) has none.
    return isinstance(value, torch.Tensor) and not torch.nn.parameter.is_lazy(value)


def _shape(value: object) -> str:
    return f"(shape {tuple(value.shape)})" if _has_shape(value) else "(not a tensor)"


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        keys = list(value)[:5]
        if not keys:
            return "an empty mapping"
        return f"a {type(value).__name__} with keys {keys}{' ...' if len(value) > 5 else ''}"
    return f"a {type(value).__name__}"


def refuse_uninitialised(module: torch.nn.Module) -> None:
    """Stop at a lazy module that has not run yet: its weights have no shape until its first
    call, and a check that made that call would hand back a changed model."""
    for name, m in module.named_modules():
        tensors = (*m.parameters(recurse=False), *m.buffers(recurse=False))
        if any(torch.nn.parameter.is_lazy(t) for t in tensors):
            raise ConfigError(
                f"'{name or type(module).__name__}' ({type(m).__name__}) is not "
                "initialised yet: a lazy module takes its shapes from its first call; run the "
                "model once on a batch (or load its trained weights) before checking it"
            )
