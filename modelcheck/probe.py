"""Probe stage: turn probe data into re-iterable batches of model inputs and optional targets.

Later stages only iterate ``Probe.batches``, possibly more than once, so every kind of data is
wrapped in a small iterable that cuts its batches on demand and identically on every pass. A
memory-mapped ``.npy`` file is sliced one batch at a time and never read whole.
"""

from __future__ import annotations

import csv
import math
import operator
import os
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from modelcheck.errors import ConfigError, ProbeError
from modelcheck.settings import DATASETS
from modelcheck.source import refuse_uninitialised, verify_archive

__all__ = [
    "DATASETS",
    "Batch",
    "Inputs",
    "Probe",
    "infer_input_shape",
    "probe_from_data",
    "probe_from_spec",
    "split_batches",
]

_FILE_TYPES = (".pt", ".pth", ".npy", ".npz", ".csv")
_ACCEPTED = (
    "expected a .pt/.pth, .npy, .npz or .csv file, a scikit-learn dataset name "
    "(iris, digits, wine, breast_cancer) or 'random'"
)

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]

# Samples before batching: the leaves are tensors or (possibly memory-mapped) numpy arrays,
# all with one row per sample along their first dimension.
_Array = torch.Tensor | np.ndarray
_Rows = _Array | tuple[_Array, ...] | dict[str, _Array]


@dataclass(frozen=True, slots=True)
class Batch:
    """Model inputs for one batch, and the targets of the real loss when the probe has labels."""

    inputs: Inputs  # positional tensor, tuple of positional tensors, or dict of keyword tensors
    target: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Probe:
    """Batches to run the model on; iterating ``batches`` again yields the same batches."""

    batches: Iterable[Batch]
    source: str  # for the report, e.g. "iris, standardised"
    samples: int | None  # None when a user's iterable does not say how many it holds
    has_labels: bool
    noise: bool = False  # the random probe: seeded N(0, 1) draws, not data


def probe_from_spec(
    spec: str,
    *,
    input_shape: Sequence[int] | None = None,
    target: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    random_samples: int = 256,
) -> Probe:
    """Read a probe named on the command line: a file, a scikit-learn dataset or "random".

    Files are recognised by extension. ``target`` names the label column of a CSV (by header
    name or 0-based index). Datasets are standardised as in the seed article unless
    ``standardize`` is false. "random" draws ``random_samples`` seeded N(0, 1) samples of
    ``input_shape`` from a private generator, so the global RNG is left alone.
    """
    _check_positive(batch_size=batch_size, max_samples=max_samples, random_samples=random_samples)
    spec = os.fspath(spec)
    suffix = os.path.splitext(spec)[1].lower()
    if target is not None and suffix != ".csv":
        raise ProbeError(f"{spec}: a target column ({target!r}) only applies to CSV probes")
    if os.path.isdir(spec):
        raise ProbeError(f"{spec} is a directory; {_ACCEPTED}")
    if os.path.isfile(spec):
        inputs, labels = _read_file(spec, suffix, target)
        inputs = _shaped(inputs, input_shape, spec)
        return _rows_probe(inputs, labels, spec, spec, batch_size, max_samples)
    name = spec.strip().lower()
    if name in DATASETS:
        return _dataset_probe(name, standardize, batch_size, max_samples, input_shape)
    if name == "random":
        return _random_probe(input_shape, random_samples, seed, batch_size, max_samples)
    if suffix in _FILE_TYPES:
        raise ProbeError(f"{spec} does not exist")
    raise ProbeError(f"{spec!r} is not a probe: no such file and not a dataset name; {_ACCEPTED}")


def probe_from_data(
    data: object, labels: object = None, *, batch_size: int = 64, max_samples: int | None = None
) -> Probe:
    """Wrap in-memory probe data given to the Python API.

    ``data`` is a tensor or numpy array of inputs (labels in ``labels``), an ``(x, y)`` pair
    (any 2-tuple or 2-list of arrays is read as a pair, never as two batches; several inputs
    go in a tuple, ``((x1, x2), y)`` with ``y`` None for no labels), a dict with
    ``x`` and optional ``y``, a dict of keyword inputs, or an iterable of batches such as a
    DataLoader. Arrays are cut into ``batch_size`` rows; ready-made batches are used as they come.
    A one-shot iterator or generator is read once, here, and kept in memory so that it can be
    iterated again; a re-iterable (a DataLoader) is iterated afresh on every pass.
    """
    _check_positive(batch_size=batch_size, max_samples=max_samples)
    where = "probe data"
    rows = _as_rows(data, labels, where)
    if rows is not None:
        inputs, target = rows
        source = _describe_rows(inputs, target)
        return _rows_probe(inputs, target, where, source, batch_size, max_samples)
    if labels is not None:
        raise ProbeError(f"{where}: labels= goes with an array of inputs; put targets in batches")
    if not isinstance(data, Iterable):
        raise ProbeError(
            f"{where}: cannot use a {type(data).__name__}; expected a tensor, an "
            "array, an (x, y) pair or an iterable of batches"
        )
    if isinstance(data, Iterator | list | tuple):
        kept = tuple(_normalised(data, max_samples))
        kind = f"{type(data).__name__}, read once" if isinstance(data, Iterator) else "in memory"
        source = f"{len(kept)} batches ({kind})"
        samples = sum(_rows_of(batch.inputs) for batch in kept)
        return Probe(kept, source, samples, kept[0].target is not None)
    stream = _StreamedBatches(data, max_samples)
    # One batch says whether there are labels, and that there is any data at all.
    first = next(iter(stream))
    source = type(data).__name__
    if isinstance(data, torch.utils.data.DataLoader):
        source = f"DataLoader over {type(data.dataset).__name__}"
    return Probe(stream, source, _loader_samples(data, max_samples), first.target is not None)


def split_batches(batches: Iterable[Batch], max_rows: int) -> Iterable[Batch]:
    """The same samples in the same order, in batches of at most ``max_rows`` rows.

    The engine falls back on this when a batch does not fit in memory.
    """
    _check_positive(max_rows=max_rows)
    return _SplitBatches(batches, max_rows)


def infer_input_shape(model: torch.nn.Module, *, option: str = "--input-shape") -> tuple[int, ...]:
    """The shape of one sample, as told by the model's first layer (in registration order).

    Only a Linear says it fully; for other first layers the message says what to pass instead,
    under the caller's name for it: ``option`` is the CLI's flag, or ``input_shape`` for
    ``check()``. An exported program knows the shape it was exported for; a TorchScript
    module keeps its layers' class names.
    """
    exported = _exported_input_shape(model)
    if exported is not None:
        return exported
    refuse_uninitialised(model)  # a lazy layer does not know its input size yet
    cli = option.startswith("--")
    a_probe = "a probe file" if cli else "a probe"
    for name, layer in model.named_modules():
        label = name or type(model).__name__
        kind, torch_kind = _kinds(layer)
        if torch_kind == "Linear" and not isinstance(layer, torch.nn.Linear):
            return _other_linear_input(layer, label, option)
        if isinstance(layer, torch.nn.Linear):
            return (layer.in_features,)
        for convolution, (spatial, example) in _CONVOLUTIONS.items():
            if torch_kind == convolution.__name__:
                channels = layer.in_channels
                raise ProbeError(
                    f"cannot infer the input shape: the first layer {label} is a {kind} with "
                    f"{channels} input channels; pass "
                    f"{_shape_option(option, f'{channels},{example}')} with your real {spatial}"
                )
        if torch_kind in ("Embedding", "EmbeddingBag"):
            ids = "a probe file of ids (e.g. --probe ids.pt)" if cli else "a probe of token ids"
            raise ProbeError(
                f"cannot infer the input shape: the first layer {label} is an {kind}, which "
                f"takes token ids; pass {ids}"
            )
        if torch_kind in ("RNN", "LSTM", "GRU", "RNNBase", "MultiheadAttention"):
            width = getattr(layer, "input_size", None) or layer.embed_dim
            raise ProbeError(
                f"cannot infer the input shape: the first layer {label} is a {kind} over "
                f"sequences of {width} features; pass "
                f"{_shape_option(option, f'SEQ_LEN,{width}')} or {a_probe}"
            )
    raise ProbeError(
        f"cannot infer the input shape of {type(model).__name__}: it has no Linear, Conv or "
        f"Embedding layer of known size; pass {option} or {a_probe}"
    )


def _shape_option(option: str, example: str) -> str:
    """A sample's shape as the caller spells it: ``--input-shape 3,32,32`` on the command
    line, ``input_shape=(3, 32, 32)`` in Python."""
    if option.startswith("--"):
        return f"{option} {example}"
    return f"{option}=({example.replace(',', ', ')})"


def _other_linear_input(layer: torch.nn.Module, label: str, option: str) -> tuple[int, ...]:
    """The input size of a Linear that is not an nn.Linear: a scripted one keeps
    ``in_features``, a traced one only its weight; a quantized one's weight is a method."""
    features = getattr(layer, "in_features", None)
    if isinstance(features, int):
        return (features,)
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return (int(weight.shape[1]),)
    raise ProbeError(
        f"cannot infer the input shape: the first layer {label} is a Linear whose input size "
        f"it does not tell; pass {option}"
    )


def _kinds(layer: torch.nn.Module) -> tuple[str, str]:
    """(the layer's class name, the torch layer it is or derives from, else that name too).
    A TorchScript module is a RecursiveScriptModule that keeps its Python class's name as
    ``original_name``."""
    compiled = getattr(layer, "original_name", None)
    if isinstance(compiled, str):
        return compiled, compiled
    torch_layers = (torch.nn.Linear, *_CONVOLUTIONS, torch.nn.Embedding, torch.nn.EmbeddingBag)
    torch_layers += (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU, torch.nn.RNNBase)
    torch_layers += (torch.nn.MultiheadAttention,)
    name = type(layer).__name__
    return name, next((t.__name__ for t in torch_layers if isinstance(layer, t)), name)


def _exported_input_shape(model: torch.nn.Module) -> tuple[int, ...] | None:
    if not isinstance(model, torch.fx.GraphModule):
        return None
    values = [node.meta.get("val") for node in model.graph.nodes if node.op == "placeholder"]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and not tensors[0].is_floating_point():
        raise ProbeError(
            "cannot infer the input shape: the exported program takes "
            f"{str(tensors[0].dtype).removeprefix('torch.')} inputs (token ids or indices, "
            "which random values are not); pass a probe file of them (e.g. --probe ids.pt)"
        )
    if len(tensors) != 1 or tensors[0].dim() < 2 or not tensors[0].is_floating_point():
        return None
    try:
        return tuple(int(size) for size in tensors[0].shape[1:])
    except TypeError:  # a symbolic (dynamic) size other than the batch
        return None


# --- batch iterables -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _SlicedBatches:
    """Cut rows into batches on demand: only the rows of the current batch are ever copied."""

    inputs: _Rows
    target: _Array | None
    samples: int
    batch_size: int

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, self.samples, self.batch_size):
            rows = slice(start, min(start + self.batch_size, self.samples))
            target = None if self.target is None else _tensor(self.target[rows])
            yield Batch(_take(self.inputs, rows), target)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)


@dataclass(frozen=True, slots=True, eq=False)
class _RandomBatches:
    """Seeded Gaussian batches, drawn afresh from the same seed on every pass."""

    shape: tuple[int, ...]
    samples: int
    batch_size: int
    seed: int

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed)  # never the global generator
        for start in range(0, self.samples, self.batch_size):
            rows = min(self.batch_size, self.samples - start)
            yield Batch(torch.randn((rows, *self.shape), generator=generator), None)

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)


@dataclass(frozen=True, slots=True, eq=False)
class _SplitBatches:
    """Each batch of another iterable, cut into pieces of at most ``max_rows`` rows."""

    batches: Iterable[Batch]
    max_rows: int

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            rows = _rows_of(batch.inputs)
            for start in range(0, rows, self.max_rows):
                piece = slice(start, min(start + self.max_rows, rows))
                target = None if batch.target is None else batch.target[piece]
                yield Batch(_take(batch.inputs, piece), target)


@dataclass(frozen=True, slots=True, eq=False)
class _StreamedBatches:
    """A user's re-iterable (a DataLoader, say), normalised batch by batch as it is iterated."""

    data: Iterable[object]
    max_samples: int | None

    def __iter__(self) -> Iterator[Batch]:
        return _normalised(self.data, self.max_samples)


def _normalised(data: Iterable[object], max_samples: int | None) -> Iterator[Batch]:
    """Turn each user batch into a Batch, stopping once ``max_samples`` rows have been given."""
    seen = 0
    labelled: bool | None = None
    for index, item in enumerate(_without_rng(data)):
        batch = _as_batch(item, f"batch {index}")
        if labelled is None:
            labelled = batch.target is not None
        elif labelled != (batch.target is not None):
            has = "has a target" if batch.target is not None else "has no target"
            raise ProbeError(f"probe data: batch {index} {has}, unlike batch 0")
        rows = _rows_of(batch.inputs)
        if max_samples is not None and seen + rows >= max_samples:
            yield _head(batch, max_samples - seen)
            return
        seen += rows
        yield batch
    if labelled is None:
        raise ProbeError("probe data: the probe is empty (it yielded no batches)")


def _without_rng(data: Iterable[object]) -> Iterator[object]:
    """Iterate user data with the global RNGs restored after every step.

    A DataLoader draws a seed from the global torch generator each time it is iterated (and a
    shuffling one its order too). Restoring the state leaves the user's random numbers as they
    were and makes a shuffling loader yield the same order on every pass.
    """
    with _rng_restored():
        iterator = iter(data)
    while True:
        with _rng_restored():
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


@contextmanager
def _rng_restored() -> Iterator[None]:
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _loader_samples(data: object, max_samples: int | None) -> int | None:
    """How many samples a DataLoader will give, when its sampler says; None otherwise."""
    if not isinstance(data, torch.utils.data.DataLoader) or data.batch_size is None:
        return None
    try:
        samples = len(data.sampler)
    except TypeError:  # an IterableDataset has no length
        return None
    if data.drop_last:
        samples -= samples % data.batch_size
    return samples if max_samples is None else min(samples, max_samples)


# --- normalising batches and rows ------------------------------------------------------------


def _as_batch(item: object, where: str) -> Batch:
    if isinstance(item, Batch):
        inputs, target = item.inputs, item.target
    elif isinstance(item, torch.Tensor | np.ndarray):
        inputs, target = item, None
    elif isinstance(item, Mapping):
        inputs, target = _split_mapping(item)
    elif isinstance(item, tuple | list) and len(item) in (1, 2):
        inputs, target = item[0], item[1] if len(item) == 2 else None
    elif isinstance(item, tuple | list):
        raise ProbeError(
            f"probe data: {where} is a {type(item).__name__} of {len(item)} items; yield "
            "(inputs, target) pairs, with several inputs grouped in a tuple or a dict"
        )
    else:
        raise ProbeError(
            f"probe data: {where} is a {type(item).__name__}; expected a tensor, an "
            "(inputs, target) pair or a dict"
        )
    rows = _as_inputs(inputs, f"probe data: {where}")
    count = _count_rows(rows, f"probe data: {where}")  # checks every leaf before converting it
    if target is not None:
        _check_leaf(target, f"probe data: {where}: the target")
        if len(target) != count:
            raise ProbeError(f"probe data: {where} has {count} samples but {len(target)} targets")
        target = _tensor(target)
    return Batch(_map(rows, _tensor), target)


def _as_rows(data: object, labels: object, where: str) -> tuple[_Rows, object] | None:
    """Split whole-probe data into (inputs, labels); None when it is an iterable of batches."""
    if isinstance(data, str | bytes | os.PathLike):
        raise ProbeError(f"{where}: {data!r} names a file or dataset; use probe_from_spec for it")
    if isinstance(data, torch.Tensor | np.ndarray):
        inputs, target = data, None
    elif isinstance(data, tuple | list) and len(data) == 2 and _is_pair(data):
        inputs, target = data
    elif isinstance(data, Mapping):
        inputs, target = _split_mapping(data)
    else:
        return None
    if labels is not None:
        if target is not None:
            raise ProbeError(f"{where}: labels given twice, in the data and as labels=")
        target = labels
    return _as_inputs(inputs, where), target


def _is_pair(data: Sequence[object]) -> bool:
    # Inputs in a pair are an array or a dict of them, or, in a tuple pair, a tuple of them
    # (several inputs): ((x1, x2), y). A list stays a list of batches: [(x, y), x] is two
    # batches, one without labels, an error to be told as such.
    x, y = data
    if isinstance(x, Mapping):
        parts = list(x.values())
    elif isinstance(x, tuple | list) and isinstance(data, tuple):
        parts = list(x)
    else:
        parts = [x]
    arrays = bool(parts) and all(isinstance(v, torch.Tensor | np.ndarray) for v in parts)
    return arrays and (y is None or isinstance(y, torch.Tensor | np.ndarray))


def _split_mapping(data: Mapping[object, object]) -> tuple[object, object]:
    # {"x": ..., "y": ...} is (inputs, target); any other dict holds keyword inputs.
    if "x" in data and set(data) <= {"x", "y"}:
        return data["x"], data.get("y")
    return dict(data), None


def _as_inputs(inputs: object, where: str) -> _Rows:
    if isinstance(inputs, torch.Tensor | np.ndarray):
        return inputs
    if isinstance(inputs, tuple | list) and inputs:
        return tuple(inputs)
    if isinstance(inputs, Mapping) and inputs:
        if not all(isinstance(key, str) for key in inputs):
            raise ProbeError(f"{where}: keyword inputs need string keys, got {list(inputs)}")
        return dict(inputs)
    empty = " (empty)" if isinstance(inputs, tuple | list | Mapping) else ""
    raise ProbeError(
        f"{where}: inputs must be a tensor or array, a tuple of them or a dict of them; "
        f"got a {type(inputs).__name__}{empty}"
    )


def _rows_probe(
    inputs: _Rows,
    labels: object,
    where: str,
    source: str,
    batch_size: int,
    max_samples: int | None,
) -> Probe:
    samples = _count_rows(inputs, where)
    if labels is not None:
        _check_leaf(labels, f"{where}: the labels")
        if len(labels) != samples:
            raise ProbeError(f"{where}: {samples} samples but {len(labels)} labels")
    if samples == 0:
        raise ProbeError(f"{where}: the probe is empty (0 samples)")
    used = samples if max_samples is None else min(samples, max_samples)
    batches = _SlicedBatches(inputs, labels, used, batch_size)
    return Probe(batches, source, used, labels is not None)


def _count_rows(inputs: _Rows, where: str) -> int:
    """Check every input leaf and return their common number of rows."""
    if isinstance(inputs, dict):
        named = [(f"input '{key}'", leaf) for key, leaf in inputs.items()]
    elif isinstance(inputs, tuple):
        named = [(f"input {i}", leaf) for i, leaf in enumerate(inputs)]
    else:
        named = [("the inputs", inputs)]
    for name, leaf in named:
        _check_leaf(leaf, f"{where}: {name}")
    counts = {name: len(leaf) for name, leaf in named}
    first, rows = named[0][0], len(named[0][1])
    for name, count in counts.items():
        if count != rows:
            raise ProbeError(f"{where}: {name} has {count} rows but {first} has {rows}")
    return rows


def _check_leaf(leaf: object, what: str) -> None:
    if not isinstance(leaf, torch.Tensor | np.ndarray):
        raise ProbeError(f"{what} must be a tensor or a numpy array, not a {type(leaf).__name__}")
    if leaf.ndim == 0:
        raise ProbeError(f"{what} must be at least 1-D (one row per sample), not a scalar")
    numeric = not leaf.is_complex() if isinstance(leaf, torch.Tensor) else leaf.dtype.kind in "biuf"
    if not numeric:
        raise ProbeError(f"{what} must hold real numbers, not dtype {leaf.dtype}")


def _rows_of(inputs: Inputs) -> int:
    leaf = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return len(leaf[0] if isinstance(leaf, tuple) else leaf)


def _head(batch: Batch, rows: int) -> Batch:
    target = None if batch.target is None else batch.target[:rows]
    return Batch(_take(batch.inputs, slice(0, rows)), target)


def _take(inputs: _Rows, rows: slice) -> Inputs:
    return _map(inputs, lambda leaf: _tensor(leaf[rows]))


def _map(inputs: _Rows, function: Callable[[_Array], torch.Tensor]) -> Inputs:
    if isinstance(inputs, dict):
        return {key: function(leaf) for key, leaf in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(function(leaf) for leaf in inputs)
    return function(inputs)


def _tensor(leaf: _Array) -> torch.Tensor:
    """A tensor of the rows, sharing memory with an in-memory array and copying a mapped one."""
    if isinstance(leaf, torch.Tensor):
        return leaf
    if not leaf.flags.writeable or not leaf.dtype.isnative:
        # Read-only rows come from a memory-mapped file: copy them rather than let a tensor
        # alias the file's pages. Non-native byte order is fixed on the way, as torch needs.
        leaf = np.array(leaf, dtype=leaf.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(leaf))


def _describe_rows(inputs: _Rows, labels: object) -> str:
    if isinstance(inputs, dict):
        text = f"keyword inputs {', '.join(inputs)}"
    elif isinstance(inputs, tuple):
        text = f"{len(inputs)} positional inputs"
    elif isinstance(inputs, torch.Tensor):
        text = f"tensor of shape {tuple(inputs.shape)}"
    else:
        text = f"{inputs.dtype} array of shape {inputs.shape}"
    return text + (" with labels" if labels is not None else "")


# --- files, datasets and random data ---------------------------------------------------------


def _read_file(path: str, suffix: str, target: str | None) -> tuple[_Rows, object]:
    if suffix == ".csv":
        return _read_csv(path, target)
    if suffix == ".npy":
        return _read_npy(path), None
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in (".pt", ".pth"):
        return _read_torch(path)
    raise ProbeError(f"{path}: unsupported probe file type '{suffix or path}'; {_ACCEPTED}")


def _read_torch(path: str) -> tuple[_Rows, object]:
    if zipfile.is_zipfile(path):
        verify_archive(path, ProbeError)
    try:
        with warnings.catch_warnings():  # about odd files, before the error that says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        held = f"holds {found.group(1)}, not only tensors" if found else "holds more than tensors"
        raise ProbeError(
            f"{path} {held}; probe files are read without running pickled code: save plain "
            "tensors, e.g. torch.save((x, y), path)"
        ) from None
    except Exception as error:
        raise ProbeError(f"{path} cannot be read by torch.load ({_brief(error)})") from None
    if isinstance(loaded, torch.Tensor):
        return _as_inputs(loaded, path), None
    if _is_batch_list(loaded):
        raise ProbeError(
            f"{path} holds a {type(loaded).__name__} of {len(loaded)} (inputs, labels) batches; "
            "a probe file holds the whole probe as one pair: torch.save((x, y), path), with "
            "the batches joined by torch.cat"
        )
    if isinstance(loaded, tuple | list) and len(loaded) in (1, 2):
        return _as_inputs(loaded[0], path), loaded[1] if len(loaded) == 2 else None
    if isinstance(loaded, Mapping) and "x" in loaded:
        return _as_inputs(loaded["x"], path), loaded.get("y")
    if isinstance(loaded, Mapping) and loaded:  # keyword inputs: input_ids, attention_mask, ...
        return _as_inputs(loaded, path), None
    raise ProbeError(
        f"{path} holds a {type(loaded).__name__}; expected a tensor x, a pair (x, y), a dict "
        "with 'x' and optional 'y', or a dict of keyword inputs (input_ids, attention_mask, ...)"
    )


def _is_batch_list(loaded: object) -> bool:
    """Whether a loaded file is a sequence of (inputs, labels) pairs: labels are never a pair."""
    return (
        isinstance(loaded, tuple | list)
        and len(loaded) >= 2
        and all(isinstance(item, tuple | list) and len(item) == 2 for item in loaded)
    )


def _read_npy(path: str) -> np.ndarray:
    _expect_header(path, (b"\x93NUMPY",), "a NumPy .npy file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise _numpy_error(path, error) from None


def _expect_header(path: str, magics: tuple[bytes, ...], kind: str) -> None:
    # numpy reads any file without its header as a pickle, and then says it holds objects.
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError as error:
        raise ProbeError(f"{path} cannot be read ({error.strerror or error})") from None
    if not head.startswith(magics):
        raise ProbeError(f"{path} is not {kind} (it does not start with the format's header)")


def _read_npz(path: str) -> tuple[_Rows, object]:
    _expect_header(path, (b"PK\x03\x04", b"PK\x05\x06"), "a NumPy .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" in names:
                return archive["x"], archive["y"] if "y" in names else None
            if names and not any(re.fullmatch(r"arr_\d+", name) for name in names):
                # keyword inputs, as np.savez(path, input_ids=..., attention_mask=...)
                return {name: archive[name] for name in names}, None
            raise ProbeError(
                f"{path} holds arrays {names}; expected 'x' and optional 'y' "
                "(np.savez(path, x=..., y=...)) or named keyword inputs (input_ids=..., ...)"
            )
    except ProbeError:
        raise
    except Exception as error:
        raise _numpy_error(path, error) from None


def _numpy_error(path: str, error: Exception) -> ProbeError:
    if "object" in str(error).lower():  # numpy refuses pickled object arrays without pickle
        return ProbeError(f"{path}: probe arrays must hold real numbers, not dtype object")
    return ProbeError(f"{path} cannot be read by numpy ({_brief(error)})")


def _read_csv(path: str, target: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Numeric columns, with an optional header; the target column (if any) becomes the labels.

    A first row with no number in it is the header. Labels that are all whole numbers are class
    indices (int64); otherwise they are regression targets (float32), like the inputs.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            lines = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ProbeError(f"{path} cannot be read as CSV ({_brief(error)})") from None
    header = None
    if lines and not any(_is_number(cell) for cell in lines[0][1]):
        header = [cell.strip() for cell in lines[0][1]]
        lines = lines[1:]
    if not lines:
        raise ProbeError(f"{path}: the probe is empty (no data rows)")
    width = len(header) if header else len(lines[0][1])
    column = _target_column(path, target, header, width)
    values = np.empty((len(lines), width), dtype=np.float64)
    for row, (line, cells) in enumerate(lines):
        if len(cells) != width:
            raise ProbeError(f"{path}: line {line} has {len(cells)} columns, expected {width}")
        for index, cell in enumerate(cells):
            try:
                values[row, index] = float(cell)
            except ValueError:
                name = f"column {index}" + (f" ({header[index]!r})" if header else "")
                raise ProbeError(f"{path}: line {line}, {name}: {cell!r} is not a number") from None
    if column is None:
        return values.astype(np.float32), None
    if width == 1:
        raise ProbeError(f"{path}: no input columns are left besides the target column")
    labels = values[:, column]
    whole = bool(np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))
    inputs = np.delete(values, column, axis=1).astype(np.float32)
    return inputs, labels.astype(np.int64 if whole else np.float32)


def _target_column(
    path: str, target: str | None, header: list[str] | None, width: int
) -> int | None:
    if target is None:
        return None
    name = str(target).strip()
    if header and name in header:
        return header.index(name)
    if name.isdigit() and int(name) < width:
        return int(name)
    columns = f"columns {header}" if header else f"{width} columns and no header"
    raise ProbeError(
        f"{path}: no target column {name!r} ({columns}); give a column name or a 0-based index"
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _dataset_probe(
    name: str,
    standardize: bool,
    batch_size: int,
    max_samples: int | None,
    input_shape: Sequence[int] | None = None,
) -> Probe:
    """A bundled scikit-learn dataset, prepared the way the seed article prepares Iris."""
    from sklearn import datasets  # imported here: scikit-learn takes a while to import
    from sklearn.preprocessing import StandardScaler

    bunch = getattr(datasets, f"load_{name}")()
    inputs = StandardScaler().fit_transform(bunch.data) if standardize else bunch.data
    total = len(inputs)
    used = total if max_samples is None else min(total, max_samples)
    scaling = "standardised" if standardize else "not standardised"
    source = (
        f"{name}, {scaling}" if used == total else f"{name}, first {used} of {total}, {scaling}"
    )
    labels = bunch.target.astype(np.int64)
    inputs = _shaped(inputs.astype(np.float32), input_shape, name)
    return _rows_probe(inputs, labels, name, source, batch_size, max_samples)


def _shaped(inputs: _Rows, input_shape: Sequence[int] | None, where: str) -> _Rows:
    """Each sample of a file or dataset reshaped to ``input_shape`` (digits' 64 features to
    1,8,8 for a convolution), when one is given: the sizes must agree."""
    if input_shape is None:
        return inputs
    shape = tuple(input_shape)
    if not isinstance(inputs, torch.Tensor | np.ndarray) or inputs.ndim == 0:
        raise ProbeError(f"{where}: --input-shape reshapes a probe of one input array only")
    size = math.prod(inputs.shape[1:])
    if size != math.prod(shape):
        dims = ",".join(map(str, shape))
        raise ProbeError(
            f"{where}: its samples hold {size} values each (shape {tuple(inputs.shape[1:])}), "
            f"and --input-shape {dims} holds {math.prod(shape)}"
        )
    return inputs.reshape(len(inputs), *shape)


def _random_probe(
    input_shape: Sequence[int] | None,
    samples: int,
    seed: int,
    batch_size: int,
    max_samples: int | None,
) -> Probe:
    if input_shape is None:
        raise ProbeError(
            "the random probe needs the shape of one sample: pass --input-shape (e.g. 4 or 3,32,32)"
        )
    try:
        shape = tuple(operator.index(size) for size in input_shape)
    except TypeError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise ConfigError(f"input_shape must be positive integers, got {input_shape!r}")
    used = samples if max_samples is None else min(samples, max_samples)
    batches = _RandomBatches(shape, used, batch_size, seed)
    return Probe(batches, f"random N(0,1) of shape {shape} (seed {seed})", used, False, noise=True)


# --- input shapes ----------------------------------------------------------------------------

# What each convolution expects after its channels, and example sizes for the message.
_CONVOLUTIONS: dict[type[torch.nn.Module], tuple[str, str]] = {
    torch.nn.Conv1d: ("length", "32"),
    torch.nn.Conv2d: ("height and width", "32,32"),
    torch.nn.Conv3d: ("depth, height and width", "16,32,32"),
    torch.nn.ConvTranspose1d: ("length", "32"),
    torch.nn.ConvTranspose2d: ("height and width", "32,32"),
    torch.nn.ConvTranspose3d: ("depth, height and width", "16,32,32"),
}


# --- wording ---------------------------------------------------------------------------------


def _brief(error: BaseException) -> str:
    """The first line of an exception's message, cut at its first sentence when very long."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first[: first.index(". ")] if len(first) > 160 and ". " in first else first


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
