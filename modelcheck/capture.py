"""Run the model over probe batches and report what each layer does: the capture stage.

Forward hooks see every recorded module (leaves, and modules that own parameters
directly), and blocks whose output no recorded layer produced (a residual sum); a
TorchFunctionMode sees the functional activations a ``forward`` calls
(``F.relu(self.fc1(x))`` has no ReLU module to hook). Compiled models, which hooks cannot
see into, are recorded by ``capture_graph`` through the same Observer calls. Tensor hooks
see the gradient of each layer's output, and ``torch.autograd.grad`` returns parameter
gradients without touching ``.grad``. Everything is attached for the run and removed after it;
``preserved`` restores what the run could change. What is seen goes to an Observer (small
CPU outputs when the forward returns, see ``_Recorder``): this stage computes no
statistics itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import math
import random
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from modelcheck.errors import BatchOutOfMemory, CaptureError, ProbeError
from modelcheck.families import ACTIVATION_FAMILIES
from modelcheck.probe import Batch
from modelcheck.settings import LOSS_CHOICES


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """A recorded layer: a module, or a functional activation called inside one."""

    name: str
    type: str
    family: str
    functional: bool
    saturation: tuple[float, float] | None
    parameters: tuple[str, ...]
    fan_ins: tuple[tuple[str, int], ...] = ()  # those a weight's shape does not tell
    input_from: str | None = None  # the layer whose output (or a view of it) it first took in


@dataclass(frozen=True, slots=True)
class CaptureRun:
    """What the run did, apart from the observations themselves."""

    layers: tuple[LayerInfo, ...]
    loss: str
    batches: int
    samples: int
    gradients: bool
    train_mode: bool
    device: str
    dtype: str
    output_key: str = ""  # which part of the model's output the loss used, e.g. "['logits']"
    notes: tuple[str, ...] = ()  # what the run did differently from a plain forward, and why


class Observer(Protocol):
    """Receives every observation of a run; the stats stage implements it."""

    def on_layer(
        self,
        layer: LayerInfo,
        parameters: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
    ) -> None: ...
    def on_activation(self, layer: LayerInfo, output: torch.Tensor, unit_dim: int) -> None: ...
    def on_output_grad(self, layer: LayerInfo, grad: torch.Tensor) -> None: ...
    def on_param_grads(self, layer: LayerInfo, grads: Sequence[torch.Tensor]) -> None: ...
    def on_input(self, inputs: Sequence[torch.Tensor]) -> None: ...
    def on_output(self, output: torch.Tensor) -> None: ...


# -- what kind of layer is this ----------------------------------------------------------

_SATURATION = {"tanh": (-0.99, 0.99), "sigmoid": (0.005, 0.995), "relu6": (-math.inf, 6.0)}

_MODULE_FAMILIES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "leaky_relu"),  # negative slopes learnt or drawn: never dead the ReLU way
    (nn.RReLU, "leaky_relu"),
    (nn.ELU, "elu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Softplus, "softplus"),
    (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Linear, "linear"),
    (nn.Bilinear, "linear"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.modules.batchnorm._NormBase, "norm"),
    (nn.GroupNorm, "norm"),
    (nn.LayerNorm, "norm"),
    (nn.Embedding, "embedding"),
    (nn.RNNBase, "rnn"),
    (nn.RNNCellBase, "rnn"),
    (nn.MultiheadAttention, "attention"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.modules.pooling._MaxPoolNd, "pool"),
    (nn.modules.pooling._AvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "pool"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "softmax"),
)
if hasattr(nn, "RMSNorm"):
    _MODULE_FAMILIES += ((nn.RMSNorm, "norm"),)

# Families whose outputs keep the units of their input (elementwise layers).
_ELEMENTWISE = ACTIVATION_FAMILIES | {"dropout"}
# Families whose unit axis is the channel axis (dim 1) of a (N, C, ...) tensor.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)

_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", torch.Tensor.relu: "relu",
    F.relu_: "relu", torch.relu_: "relu", torch.Tensor.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu",
    F.elu: "elu", F.elu_: "elu",
    F.gelu: "gelu", F.silu: "silu", F.softplus: "softplus",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.tanh: "tanh",
    F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh",
}  # fmt: skip


def module_family(module: nn.Module) -> str:
    if _is_hf_conv1d(module):
        return "linear"
    family = _class_family(type(module))
    return family if family != "other" else family_from_type_name(type(module).__name__)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2 and its kin): a Linear despite its name, computing
    x @ weight + bias with its weight stored (in, out), not nn.Linear's (out, in)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


def _fan_ins(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """The inputs feeding one output of the module's weight, where its shape does not tell
    them as torch.nn.init reads it (dim 1 and on): a weight stored (in, out), and a
    transposed convolution's (in, out / groups, *kernel), where each output takes
    in / groups channels times kernel / stride positions on average."""
    if _is_hf_conv1d(module):
        return (("weight", int(module.weight.shape[0])),)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        spread = math.prod(module.kernel_size) / math.prod(module.stride)
        return (("weight", max(1, round(module.in_channels // module.groups * spread))),)
    return ()


def _class_family(cls: type) -> str:
    return next((family for base, family in _MODULE_FAMILIES if issubclass(cls, base)), "other")


# Name patterns of layers re-implemented outside torch.nn (Hugging Face's GELUActivation,
# LlamaRMSNorm, T5LayerNorm, ...), and of torch.nn layers in compiled models, which keep
# only the class name.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("relu6", "relu6"),
    ("leakyrelu", "leaky_relu"),
    ("prelu", "leaky_relu"),
    ("rrelu", "leaky_relu"),
    ("relu", "relu"),
    # Unbounded, though named after bounded ones: log(sigmoid(x)) <= 0, x - tanh(x).
    ("logsigmoid", "other"),
    ("tanhshrink", "other"),
    ("gelu", "gelu"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("softplus", "softplus"),
    ("tanh", "tanh"),
    ("sigmoid", "sigmoid"),
    ("rmsnorm", "norm"),
    ("layernorm", "norm"),
    ("batchnorm", "norm"),
    ("groupnorm", "norm"),
)


def family_from_type_name(name: str) -> str:
    """The family of a layer known only by its class name."""
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and _class_family(cls) != "other":
        return _class_family(cls)
    lowered = name.lower()
    if lowered.startswith("conv"):
        return "conv"
    return next((family for part, family in _NAME_PATTERNS if part in lowered), "other")


def channel_first_name(name: str) -> bool:
    """Whether a layer class, known by name, has its units on dim 1 of (N, C, ...)."""
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return issubclass(cls, _CHANNEL_FIRST) or _class_family(cls) == "pool"
    lowered = name.lower()
    return lowered.startswith("conv") or "batchnorm" in lowered or "groupnorm" in lowered


def _module_saturation(module: nn.Module, family: str) -> tuple[float, float] | None:
    if family == "hardtanh":
        return (float(module.min_val), float(module.max_val))
    return _SATURATION.get(family)


def _functional_saturation(family: str, args: tuple, kwargs: dict) -> tuple[float, float] | None:
    if family == "hardtanh":
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return (float(low), float(high))
    return _SATURATION.get(family)


def recorded_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose outputs are layers: leaves, and modules owning parameters or
    floating-point buffers directly (MultiheadAttention computes with its own
    in_proj_weight, not with a child; an STFT front end with a fixed basis buffer)."""
    chosen = []
    for name, module in model_modules(model):
        is_leaf = next(module.children(), None) is None
        owns = owns_tensors(module)
        if is_leaf or owns:
            chosen.append((name or type(module).__name__, module))
    return chosen


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _calls_functions_between_leaves(modules: Iterable[nn.Module]) -> bool:
    """Whether a model of these modules may call torch functions outside its leaves (whose
    calls the leaf's own output stands for): any model but nn.Sequential containers of leaves."""
    return any(
        next(module.children(), None) is not None
        and type(module).forward is not nn.Sequential.forward
        for module in modules
    )


def block_layer(name: str, type_name: str) -> LayerInfo:
    """A non-leaf module recorded at block level (family "block")."""
    return LayerInfo(name, type_name, "block", False, None, ())


def owns_tensors(module: nn.Module) -> bool:
    """Whether the module computes with parameters or float buffers of its own (without
    computing a parametrized weight: spectral_norm's updates its buffers in train mode)."""
    return (
        next(module.parameters(recurse=False), None) is not None
        or parametrize.is_parametrized(module)
        or any(b.is_floating_point() for b in module.buffers(recurse=False))
    )


def model_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` but for the parametrizations of parametrized modules
    (weight_norm, spectral_norm): they compute a weight, not an activation."""
    inside = {
        sub
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for sub in module.parametrizations.modules()
    }
    return [(name, module) for name, module in model.named_modules() if module not in inside]


def parameter_names(module: nn.Module) -> tuple[str, ...]:
    """The names of the parameters a module computes with (see ``own_parameters``)."""
    replaced = _replaced(module)
    names = [name for name, _ in module.named_parameters(recurse=False) if name not in replaced]
    return (*names, *_computed(module), *_borrowed(module))


def own_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a module computes with: its own, and in place of the parts a weight is
    computed from (a parametrization's originals, the old weight_norm's ``weight_g`` and
    ``weight_v``) that weight, which initialisation is judged on. Call it only while the
    model's state is kept (``preserved``): a spectral_norm weight computed in train mode
    moves its buffers."""
    replaced = _replaced(module)
    found = {n: p for n, p in module.named_parameters(recurse=False) if n not in replaced}
    with torch.no_grad():
        found.update((name, getattr(module, name)) for name in _computed(module))
    found.update(_borrowed(module))
    return found


def _borrowed(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of a child module that the module computes with itself, the child never
    running: MultiheadAttention's output projection goes into a functional call."""
    if isinstance(module, nn.MultiheadAttention):
        return {f"out_proj.{n}": p for n, p in module.out_proj.named_parameters()}
    return {}


def _computed(module: nn.Module) -> list[str]:
    """Weights the module computes from other parameters as it runs."""
    names = list(module.parametrizations) if parametrize.is_parametrized(module) else []
    return names + [hook.name for hook in _weight_norms(module)]


def _replaced(module: nn.Module) -> set[str]:
    """The module's own parameters that only make up a computed weight."""
    return {f"{hook.name}{part}" for hook in _weight_norms(module) for part in ("_g", "_v")}


def _weight_norms(module: nn.Module) -> list[WeightNorm]:
    """torch.nn.utils.weight_norm's pre-hooks (deprecated for the parametrization, still
    in many checkpoints' code): each computes ``name`` from ``name_g`` and ``name_v``."""
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]


def trained_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters whose gradients are the module's: its own, its parametrizations' and
    those it borrows from a child (see ``_borrowed``)."""
    yield from module.parameters(recurse=False)
    if parametrize.is_parametrized(module):
        yield from module.parametrizations.parameters()
    yield from _borrowed(module).values()


def first_tensor(value: Any) -> torch.Tensor | None:
    """The primary tensor of a module output: itself, or the first in a container."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (tuple, list)):  # tested first: a layer's arguments are a tuple
        if hasattr(value, "to_tuple") and not isinstance(value, Mapping):
            value = value.to_tuple()  # dataclass-like model outputs
        else:
            value = [item for _, item in _items(value)]
    for item in value:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


# Keys that name a model's prediction in the output containers of common libraries, in order
# of preference: Hugging Face puts a loss first when given labels, and a sentence-transformers
# model returns its token ids and mask alongside the embedding.
_PREFERRED_KEYS = ("logits", "sentence_embedding", "last_hidden_state", "prediction_logits")


def select_output(value: Any, key: str | None = None) -> tuple[torch.Tensor | None, str]:
    """The output the loss starts from, and where it was found (``"['logits']"``, ``"[0]"``).

    ``key`` names it: a mapping key or attribute (``logits``), or an index (``0``). Without a
    key: the tensor itself; a preferred key of a mapping or model output; else the first
    floating-point tensor with at least one dimension, depth first.
    """
    if key is not None:
        return _by_key(value, key), _path_text(key)
    if isinstance(value, torch.Tensor):
        return value, ""
    items = _items(value)
    for preferred in _PREFERRED_KEYS:
        for name, item in items:
            if name == preferred and _is_float(item):
                return item, _path_text(name)
    for name, item in items:
        found, inner = select_output(item) if not isinstance(item, torch.Tensor) else (item, "")
        if _is_float(found) and found.dim() > 0:
            return found, _path_text(name) + inner
    return None, ""


def _items(value: Any) -> list[tuple[str | int, Any]]:
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return [("data", value.data)]
    if isinstance(value, Mapping):  # Hugging Face ModelOutput is an OrderedDict too
        return [(k, v) for k, v in value.items() if v is not None]
    if isinstance(value, (tuple, list)):
        return list(enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return [(name, v) for name, v in fields if v is not None]
    return []


def _by_key(value: Any, key: str) -> torch.Tensor:
    item: Any = None
    if isinstance(value, Mapping):
        item = value.get(key)
    elif isinstance(value, (tuple, list)) and key.lstrip("-").isdigit():
        index = int(key)
        item = value[index] if -len(value) <= index < len(value) else None
    if item is None and not key.isdigit():
        item = getattr(value, key, None)
    if isinstance(item, nn.utils.rnn.PackedSequence):
        item = item.data
    if not _is_float(item):
        keys = [name for name, _ in _items(value)]
        what = f"has parts {keys}" if keys else f"is a {type(value).__name__}"
        raise ProbeError(
            f"output key {key!r} does not name a floating-point tensor of the model's output, "
            f"which {what}"
        )
    return item


def _path_text(key: str | int) -> str:
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        return f"[{key}]"
    return f"[{key!r}]"


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


# -- leaving the model as it came -----------------------------------------------------------


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore train/eval flags, buffers and every RNG the run could advance.

    A buffer is restored both in value and in identity: a forward may update it in place
    (BatchNorm) or rebind the name to a new tensor (``self.steps = self.steps + 1``).
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [
        (module, name, b, b.detach().clone())
        for module in model.modules()
        for name, b in module._buffers.items()
        if b is not None
    ]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


# -- the run ------------------------------------------------------------------------------------


_DEFER_BYTES = 1 << 20
"""CPU outputs up to this size are passed on after the forward instead of inside it: on
CPU a matrix product that follows a few hundred microseconds of reductions runs up to
~50% slower (the thread pool has gone to sleep), so small layers' reductions are cheaper
gathered after the forward. Larger outputs go at once, while they are still in cache."""

_DEFER_TOTAL_BYTES = 64 << 20
"""At most this much output is held back per forward (forward-only runs free it
otherwise)."""


class _Recorder(TorchFunctionMode):
    """Hooks and function mode of one run; holds no statistics, only names and order.

    Small outputs of the batches after the first reach the observer when the forward
    has finished (see ``_DEFER_BYTES``). The first batch shows which layers' outputs
    something later changes in place (``ReLU(inplace=True)`` after a norm layer): those
    are always passed on at once, so every layer is seen as it returned its output.
    """

    def __init__(
        self, model: nn.Module, observer: Observer, gradients: bool, axes: UnitAxes | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.observer = observer
        self.gradients = gradients
        self.axes = axes or UnitAxes({})
        self.layers: dict[str, LayerInfo] = {}
        self.module_layers: dict[nn.Module, LayerInfo] = {}
        self.block_layers: dict[nn.Module, LayerInfo] = {}
        self.stack: list[tuple[nn.Module, str, tuple]] = []
        self.producers: dict[int, tuple[weakref.ref, str, int]] = {}
        self.occurrences: dict[str, int] = {}
        self._names = {m: (n or type(m).__name__) for n, m in model_modules(model)}
        self.recorded = {m: n for n, m in recorded_modules(model)}
        self.notes: list[str] = []
        # Held outputs with their version counters: ``deferred`` as (layer, output, unit
        # axis, version), ``audited`` the first batch's, already observed, as (layer name,
        # output, version) to see which ones change in place.
        self.deferred: list[tuple[LayerInfo, torch.Tensor, int, int]] = []
        self.audited: list[tuple[str, torch.Tensor, int]] = []
        self.held_bytes = 0
        self.first_batch = True
        self.changed_in_place: set[str] = set()
        self.gradless: dict[str, None] = {}  # see pass_on_gradient
        self.watches_functions = _calls_functions_between_leaves(self._names)

    def __enter__(self) -> _Recorder:
        # The function mode finds nothing in a model that calls no function outside its
        # leaves, and costs ~8 µs per torch call (a 20x1024 MLP's forward-only check took
        # 1.58x its plain forward with it, 1.50x without).
        return super().__enter__() if self.watches_functions else self

    def __exit__(self, *exc: object) -> None:
        if self.watches_functions:
            super().__exit__(*exc)

    # hooks ------------------------------------------------------------------------

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = []
        try:
            for module in self._names:
                handles.append(module.register_forward_pre_hook(self._enter))
                handles.append(module.register_forward_hook(self._leave))
                if module in self.recorded:
                    handles.append(module.register_forward_hook(self._module_output))
                elif module is not self.model and not isinstance(module, _CONTAINERS):
                    handles.append(module.register_forward_hook(self._block_output))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def call(self, model: nn.Module, inputs: Any, extra: Mapping[str, Any]) -> Any:
        output = call_model(model, inputs, extra)
        with torch._C.DisableTorchFunction():
            self._pass_on_held()
        return output

    def start_batch(self) -> None:
        self.stack.clear()
        self.producers.clear()
        self.occurrences.clear()
        self._release_held()  # left over from a forward that raised

    def _release_held(self) -> None:
        self.deferred.clear()
        self.audited.clear()
        self.held_bytes = 0

    def _pass_on_held(self) -> None:
        for name, out, version in self.audited:
            if out._version != version:
                self.changed_in_place.add(name)
        for layer, out, unit_dim, version in self.deferred:
            if out._version != version:  # a change the first batch did not show
                self.changed_in_place.add(layer.name)
                self.notes.append(
                    f"{layer.name}: its output was changed in place after the layer "
                    "returned it, in a batch after the first; that batch's statistics of "
                    "it describe the changed values"
                )
            self.observer.on_activation(layer, out, unit_dim)
        self.first_batch = False
        self._release_held()

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append((module, self._names[module], args))

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        # A forward that raises never reaches this hook, so after an exception the
        # stack still ends at the module that failed. An exception the model caught
        # itself leaves stale entries above this module: drop them too.
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] is module:
                del self.stack[depth:]
                return

    def _block_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A block whose output no recorded layer produced — the sum of a residual
        connection, typically — is recorded too, so the residual stream shows with depth."""
        tensor, _ = select_output(output)
        if not _is_float(tensor) or self._producer(tensor) is not None:
            return
        layer = self.block_layers.get(module)
        if layer is None:
            layer = block_layer(self._names[module], type(module).__name__)
            self.block_layers[module] = layer
            self._first_sight(layer, None)
        self._observe(layer, tensor, _default_dim(tensor))

    def _module_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        # The hook's own tensor calls (dim, is_floating_point, ...) would otherwise each
        # pass through this recorder's __torch_function__.
        with torch._C.DisableTorchFunction():
            self._record_module_output(module, args, output)

    def _record_module_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        tensor, _ = select_output(output)
        if not _is_float(tensor):
            return
        layer = self.module_layers.get(module)
        if layer is None:
            family = module_family(module)
            layer = LayerInfo(
                name=self.recorded[module],
                type=type(module).__name__,
                family=family,
                functional=False,
                saturation=_module_saturation(module, family),
                parameters=parameter_names(module),
                fan_ins=_fan_ins(module),
                input_from=self._made_by(first_tensor(args)),
            )
            self.module_layers[module] = layer
            self._first_sight(layer, module)
        unit_dim = self._unit_dim(layer.family, tensor, first_tensor(args), module)
        self._observe(layer, tensor, unit_dim)

    # function mode ------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        family = _FUNCTIONS.get(func)
        if family is not None and _is_float(out) and not self._inside_recorded_leaf():
            with torch._C.DisableTorchFunction():
                self._functional_output(family, args, kwargs, out)
        return out

    def _inside_recorded_leaf(self) -> bool:
        # nn.ReLU calls F.relu: the module hook already records that output.
        if not self.stack:
            return False
        module = self.stack[-1][0]
        return module in self.recorded and next(module.children(), None) is None

    def _functional_output(self, family: str, args: tuple, kwargs: dict, out: torch.Tensor):
        source = args[0] if args else None
        producer = self._producer(source)
        if producer is not None:
            base = f"{producer[0]}.{family}"
        else:
            scope = self.stack[-1][1] if self.stack else ""
            base = f"{scope}.{family}" if scope else family
        seen = self.occurrences.get(base, 0)
        self.occurrences[base] = seen + 1
        name = base if seen == 0 else f"{base}_{seen}"
        layer = self.layers.get(name)
        if layer is None:
            layer = LayerInfo(
                name=name,
                type=f"F.{family}",
                family=family,
                functional=True,
                saturation=_functional_saturation(family, args, kwargs),
                parameters=(),
            )
            self._first_sight(layer, None)
        unit_dim = producer[1] if producer and producer[2] == out.dim() else _default_dim(out)
        self._observe(layer, out, unit_dim)

    # shared -------------------------------------------------------------------------

    def _first_sight(self, layer: LayerInfo, module: nn.Module | None) -> None:
        self.layers[layer.name] = layer
        with _normal_mode():
            announce_layer(self.observer, layer, module)

    def _observe(self, layer: LayerInfo, out: torch.Tensor, unit_dim: int) -> None:
        unit_dim = self.axes.resolve(layer.name, out, unit_dim)
        with torch._C.DisableTorchFunction(), _normal_mode():
            held = self._holds(layer, out)
            if held and not self.first_batch:
                self.deferred.append((layer, out, unit_dim, out._version))
            else:
                self.observer.on_activation(layer, out, unit_dim)
                if held:
                    self.audited.append((layer.name, out, out._version))
            if self.gradients and out.requires_grad:
                out.register_hook(lambda g, layer=layer: self._grad(layer, g))
        self.producers[id(out)] = (weakref.ref(out), layer.name, unit_dim)

    def _holds(self, layer: LayerInfo, out: torch.Tensor) -> bool:
        """Whether ``out`` waits for the end of the forward (see ``_DEFER_BYTES``)."""
        size = out.numel() * out.element_size()
        if (
            out.device.type != "cpu"
            or out.is_inference()  # made under torch.inference_mode: no version counter
            or size > _DEFER_BYTES
            or self.held_bytes + size > _DEFER_TOTAL_BYTES
            or layer.name in self.changed_in_place
        ):
            return False
        self.held_bytes += size
        return True

    def _grad(self, layer: LayerInfo, grad: torch.Tensor | None) -> None:
        pass_on_gradient(self.observer, layer, grad, self.gradless)

    def _producer(self, tensor: Any) -> tuple[str, int, int] | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self.producers.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1], entry[2], tensor.dim()

    def _made_by(self, tensor: torch.Tensor | None) -> str | None:
        """The recorded layer that output ``tensor``, or the tensor it is a view of (a
        permute or reshape on the way); None for anything computed after it (a residual sum)."""
        while tensor is not None:
            producer = self._producer(tensor)
            if producer is not None:
                return producer[0]
            tensor = tensor._base
        return None

    def _unit_dim(self, family: str, out: torch.Tensor, source: Any, module: nn.Module) -> int:
        if out.dim() <= 1:
            return 0
        if isinstance(module, _CHANNEL_FIRST) or family == "pool":
            return 1
        if family in _ELEMENTWISE:
            producer = self._producer(source)
            if producer is not None and producer[2] == out.dim():
                return producer[1]
            return _default_dim(out)
        return out.dim() - 1


def pass_on_gradient(
    observer: Observer, layer: LayerInfo, grad: torch.Tensor | None, gradless: dict[str, None]
) -> None:
    """A layer output's gradient to the observer; an operator with no backward (a dynamically
    quantized Linear) gives None, and the layer is noted in ``gradless`` instead."""
    if grad is None:
        gradless[layer.name] = None
    else:
        observer.on_output_grad(layer, grad)


def _gradless_note(layers: Iterable[str], gradless: Mapping[str, None]) -> list[str]:
    names = [name for name in layers if name in gradless]  # in the order of the forward
    if not names:
        return []
    return [
        f"no gradient reached the outputs of {quoted_names(names)}: an operator on the way has "
        "no backward (a dynamically quantized Linear, for one), so those layers have no "
        "gradient statistics"
    ]


def quoted_names(names: Sequence[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 2 more``: the first few names of a note's list."""
    quoted = ", ".join(f"'{name}'" for name in names[:shown])
    return quoted + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _normal_mode() -> AbstractContextManager:
    """Leaves a model's own ``torch.inference_mode``: summaries made in it would be
    inference tensors, which no later batch may update in place."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()


def announce_layer(observer: Observer, layer: LayerInfo, module: nn.Module | None) -> None:
    """Tell the observer of a layer seen for the first time, with the module's own
    parameters and buffers (detached: the observer only reads them)."""
    params = {} if module is None else own_parameters(module)
    buffers = {} if module is None else dict(module.named_buffers(recurse=False))
    observer.on_layer(
        layer,
        {n: p.detach() for n, p in params.items()},
        {n: b.detach() for n, b in buffers.items()},
    )


def _default_dim(out: torch.Tensor) -> int:
    # Without a producer to inherit from, a 4-D or 5-D tensor is taken as (N, C, ...).
    if out.dim() <= 1:
        return 0
    return 1 if out.dim() >= 4 else out.dim() - 1


# -- one batch ---------------------------------------------------------------------------------


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    tensor = next(iter((*model.parameters(), *model.buffers())), None)
    return torch.float32, tensor.device if tensor is not None else torch.device("cpu")


def _prepare(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
        moved = moved.to(dtype) if moved.is_floating_point() else moved
        # A forward may write into its input (ReLU(inplace=True) first): never into the
        # caller's probe data, which the batch may share memory with.
        return moved.clone() if moved is value else moved
    if isinstance(value, tuple):
        return tuple(_prepare(v, dtype, device) for v in value)
    if isinstance(value, dict):
        return {k: _prepare(v, dtype, device) for k, v in value.items()}
    return value


def _float_inputs(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, dict):
        inputs = tuple(inputs.values())
    return [t for t in inputs if _is_float(t)]


def call_model(model: nn.Module, inputs: Any, extra: Mapping[str, Any] | None = None) -> Any:
    """Call the model on one batch: a tuple is positional arguments; a dict is keyword
    arguments, unless the forward takes the whole dict as its one positional argument
    (a sentence-transformers model takes ``{"input_ids": ..., "attention_mask": ...}``).
    ``extra`` keyword arguments go to every call (Silero VAD's ``sr=16000``)."""
    extra = dict(extra or {})
    if isinstance(inputs, dict):
        if _takes_dict_positionally(model, inputs):
            return model(inputs, **extra)
        return model(**inputs, **extra)
    if isinstance(inputs, tuple):
        return model(*inputs, **extra)
    return model(inputs, **extra)


def _takes_dict_positionally(model: nn.Module, inputs: Mapping[str, Any]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or compiled forward says nothing
        return False
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if set(inputs) <= named:
        return False
    required = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) == 1 and required[0].name not in inputs


def compute_loss(
    output: torch.Tensor,
    target: torch.Tensor | None,
    kind: str,
    direction: torch.Tensor | None,
    signs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """The loss the backward pass starts from, and its name for the report.

    Without labels, ``sum(output * v) / batch`` with a fixed random direction ``v``:
    its gradient is a vector-Jacobian product that probes how signal propagates back.
    ``signs`` (+1 or -1 per sample) turn ``v`` for some samples (see ``_sample_signs``).
    """
    if target is None:
        rows = output.shape[0] if output.dim() else 1  # a scalar: a model returning its loss
        if signs is None or not output.dim():
            return (output * direction).sum() / max(rows, 1), "surrogate"
        per_sample = (output * direction).reshape(rows, -1).sum(1)
        return (per_sample * signs).sum() / max(rows, 1), "surrogate"
    kind = _auto_loss(output, target) if kind == "auto" else kind
    if kind == "cross_entropy":
        if target.is_floating_point() and target.shape == output.shape:
            return F.cross_entropy(output, target), kind
        return F.cross_entropy(output, target.long()), kind
    target = target.to(output.dtype)
    if target.numel() != output.numel():
        raise ProbeError(
            f"labels of shape {tuple(target.shape)} do not fit the output of shape "
            f"{tuple(output.shape)} for loss {kind!r}; pass --loss to choose another"
        )
    target = target.reshape(output.shape)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(output, target), kind
    return F.mse_loss(output, target), kind


def _auto_loss(output: torch.Tensor, target: torch.Tensor) -> str:
    classes = output.shape[1] if output.dim() >= 2 else 1
    if not target.is_floating_point():
        if classes > 1 and target.dim() == output.dim() - 1:
            return "cross_entropy"
        if output.numel() == target.numel():
            return "bce"
    elif target.numel() == output.numel():
        return "mse"
    elif classes > 1 and target.dim() == output.dim() - 1 and torch.equal(target, target.round()):
        return "cross_entropy"  # class indices held as floats (a float array's labels)
    raise ProbeError(
        f"cannot choose a loss for labels of shape {tuple(target.shape)} "
        f"({str(target.dtype).removeprefix('torch.')}) and output of shape "
        f"{tuple(output.shape)}; pass --loss cross_entropy|mse|bce"
    )


_SCRIPT_FAILURE = "The following operation failed in the TorchScript interpreter."
"""How a TorchScript module's error begins: two tracebacks follow, and the error raised
inside, as ``RuntimeError: ...``, is its last line."""


def first_line(error: BaseException) -> str:
    """The line of an error's message that says what went wrong."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    if lines[0] == _SCRIPT_FAILURE and len(lines) > 1:
        return lines[-1].removeprefix(f"{type(error).__name__}: ")
    return lines[0]


# How allocators word running out of memory: CUDA and MPS raise torch.OutOfMemoryError,
# the CPU allocator a RuntimeError, Python itself MemoryError.
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def _raise_if_out_of_memory(error: BaseException, inputs: Any, stage: str) -> None:
    """Turn running out of memory into BatchOutOfMemory, which the engine retries smaller."""
    oom = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(w in str(error).lower() for w in _OOM_WORDS)
    )
    if not oom:
        return
    leaf = first_tensor(inputs)
    rows = leaf.shape[0] if leaf is not None and leaf.dim() else 1
    raise BatchOutOfMemory(
        f"the {stage} pass ran out of memory on a batch of {rows} sample{'s' * (rows != 1)}: "
        f"{first_line(error)}",
        rows,
    ) from error


def _loss(
    output: torch.Tensor,
    target: torch.Tensor | None,
    kind: str,
    direction: torch.Tensor | None,
    signs: torch.Tensor | None,
    inputs: Any,
) -> tuple[torch.Tensor, str]:
    try:
        return compute_loss(output, target, kind, direction, signs)
    except ProbeError:
        raise
    except Exception as error:  # e.g. a class index beyond the output's classes
        _raise_if_out_of_memory(error, inputs, "loss")
        if target is None:
            raise CaptureError(
                f"the surrogate loss failed on the output of shape {tuple(output.shape)}: "
                f"{first_line(error)}"
            ) from error
        raise ProbeError(
            f"the labels do not fit the output of shape {tuple(output.shape)} for loss "
            f"{kind!r}: {first_line(error)}"
        ) from error


def _describe_failure(recorder: _Recorder, error: BaseException) -> str:
    cause = first_line(error)
    if not recorder.stack:
        return f"the model's forward raised {type(error).__name__}: {cause}"
    module, name, args = recorder.stack[-1]
    setup = module.extra_repr().splitlines()[0] if module.extra_repr() else ""
    kind = f"{type(module).__name__}({setup})" if setup else type(module).__name__
    given = ", ".join(map(_described, args)) or "no arguments"
    cause += _ids(module, args) or _integer_input(module, args)
    return f"the forward failed at layer {name} [{kind}] given input {given}: {cause}"


def _ids(module: nn.Module, args: tuple) -> str:
    """For an embedding that failed on ids it has no row for, which ids those were: PyTorch
    says only 'index out of range in self'. For one given floats, how to save ids."""
    ids = args[0] if args else None
    rows = getattr(module, "num_embeddings", None)
    if not (isinstance(ids, torch.Tensor) and isinstance(rows, int) and ids.numel()):
        return ""
    if ids.is_floating_point() or ids.is_complex():
        return " (save the ids as integers in a .npy or .pt file: a CSV is read as floats)"
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < rows:
        return ""
    return f" (the ids run from {low} to {high}; its table has rows 0 to {rows - 1})"


def _integer_input(module: nn.Module, args: tuple) -> str:
    """For a layer that computes in floating point and was given integers (a probe of uint8
    images): what to save instead. PyTorch names only the two dtypes."""
    given = args[0] if args else None
    weight = next(module.parameters(recurse=False), None)
    if not (isinstance(given, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return ""
    if hasattr(module, "num_embeddings"):  # takes integer ids
        return ""
    if given.is_floating_point() or given.is_complex() or not weight.is_floating_point():
        return ""
    dtype = str(given.dtype).removeprefix("torch.")
    return (
        f" (it was given {dtype} values: save the probe as floating point, scaled as the "
        "model saw it in training)"
    )


def _described(value: Any) -> str:
    """A layer's argument in a failure line: a tensor's shape, a dict's keys, else its type."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, Mapping):
        return f"a dict of {', '.join(map(repr, value))}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return type(value).__name__


def run(
    model: nn.Module,
    batches: Iterable[Batch],
    observer: Observer,
    *,
    loss: str = "auto",
    train_mode: bool = False,
    gradients: bool = True,
    seed: int = 0,
    output_key: str | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    unit_axes: Mapping[str, int] | None = None,
    recorder_factory: Callable[..., Any] | None = None,
) -> CaptureRun:
    """Run every batch forward (and backward unless ``gradients`` is False).

    The model runs in eval mode unless ``train_mode``; its flags, buffers and the RNG
    states come back as they were, and ``.grad`` is never written. ``output_key`` names
    the part of the output the loss starts from; ``forward_kwargs`` go to every forward
    call; ``unit_axes`` maps layer-name patterns to the axis of their units.
    ``recorder_factory`` builds the recorder for models that forward hooks cannot see into
    (``capture_graph.GraphRecorder`` for TorchScript and torch.export).
    """
    if loss not in LOSS_CHOICES:
        raise ProbeError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_CHOICES)}")
    dtype, device = _model_dtype_device(model)
    axes = UnitAxes(unit_axes or {})
    recorder = (recorder_factory or _Recorder)(model, observer, gradients, axes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    owners = _parameter_owners(recorder)
    n_batches = n_samples = 0
    loss_name = "none"
    output_path = ""
    direction: dict[tuple, torch.Tensor] = {}
    notes: list[str] = []
    empty = True
    with ExitStack() as stack:
        stack.enter_context(preserved(model))
        # The run's own autograd mode, whatever the caller's: a check called inside
        # torch.no_grad() or torch.inference_mode() still takes the gradients it is asked for.
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.set_grad_enabled(gradients))
        _set_mode(model, train_mode)
        if _uses_fast_path(model):
            stack.enter_context(_fast_path_disabled())
            notes.append(FAST_PATH_NOTE)
        stack.enter_context(recorder.attached())
        if gradients:
            stack.enter_context(_quiet_missing_backward())
        for batch in batches:
            recorder.start_batch()
            inputs = _prepare(batch.inputs, dtype, device)
            target = None if batch.target is None else batch.target.to(device)
            leaves = _float_inputs(inputs)
            with torch._C.DisableTorchFunction():
                observer.on_input(leaves)
            need_input_grad = gradients and not trainable
            if need_input_grad:
                inputs, leaves = _grad_leaves(inputs)
            try:
                with recorder:
                    output, output_path = select_output(
                        recorder.call(model, inputs, forward_kwargs or {}), output_key
                    )
            except (KeyboardInterrupt, ProbeError, CaptureError):
                raise
            except Exception as error:
                _raise_if_out_of_memory(error, inputs, "forward")
                raise CaptureError(_describe_failure(recorder, error)) from error
            if not _is_float(output):
                raise CaptureError(_not_checkable(output))
            empty = empty and output.numel() == 0  # a batch may have none (no detections)
            observer.on_output(output.detach())
            n_batches += 1
            n_samples += output.shape[0] if output.dim() else _rows(inputs)
            if gradients:
                wrt = trainable or leaves
                if output.requires_grad and wrt:
                    key = tuple(output.shape[1:])
                    if target is None and key not in direction:
                        direction[key] = _direction(output, seed)
                    signs = _sample_signs(output, seed) if train_mode and target is None else None
                    value, loss_name = _loss(
                        output, target, loss, direction.get(key), signs, inputs
                    )
                    grads = _backward(value, wrt, inputs)
                    if trainable:
                        _report_param_grads(recorder, owners, trainable, grads)
    if n_batches and empty:
        raise CaptureError(_not_checkable(output))
    if loss_name == "surrogate" and loss != "auto":
        notes.append(
            f"loss {loss!r} needs labels and the probe has none: the backward pass started "
            "from the seeded surrogate loss sum(output · v) instead"
        )
    return CaptureRun(
        layers=tuple(recorder.layers.values()),
        loss=loss_name if gradients else "none (forward only)",
        batches=n_batches,
        samples=n_samples,
        gradients=gradients,
        train_mode=train_mode,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        output_key=output_path,
        notes=(*recorder.notes, *_gradless_note(recorder.layers, recorder.gradless), *notes),
    )


def _rows(inputs: Any) -> int:
    """The samples of a batch whose output is a scalar (a model that returns its loss): the
    rows of its first input tensor, else one."""
    first = first_tensor(inputs)
    return first.shape[0] if first is not None and first.dim() else 1


def _not_checkable(output: torch.Tensor | None) -> str:
    """The error line for an output with nothing to check: none found, or not floats."""
    if output is None:
        return (
            "the model returned no floating-point tensor to check; name the output to use "
            "with --output-key (output_key=)"
        )
    dtype = str(output.dtype).removeprefix("torch.")
    if output.numel() == 0:
        return (
            f"the model's output has no values (shape {tuple(output.shape)}); return an output "
            "with some, or name one with --output-key (output_key=)"
        )
    if output.is_complex():
        return (
            f"the model's output holds {dtype} values, not real ones; return real values "
            "(the magnitude with .abs(), or torch.view_as_real)"
        )
    return (
        f"the model's output holds {dtype} values, not floating-point ones; return the scores "
        "they come from (logits, not their argmax)"
    )


def _backward(
    value: torch.Tensor, wrt: Sequence[torch.Tensor], inputs: Any
) -> tuple[torch.Tensor | None, ...]:
    try:
        return torch.autograd.grad(value, wrt, allow_unused=True)
    except Exception as error:
        _raise_if_out_of_memory(error, inputs, "backward")
        raise CaptureError(
            f"the backward pass failed: {type(error).__name__}: {first_line(error)}"
        ) from error


@contextmanager
def _quiet_missing_backward() -> Iterator[None]:
    """PyTorch warns when a backward passes an operator with no autograd kernel; the report
    notes the layers that got no gradient instead (see pass_on_gradient). Set once per run:
    every change to the warning filters makes Python show once-only warnings again."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*an autograd kernel was not registered")
        yield


def _grad_leaves(inputs: Any) -> tuple[Any, list[torch.Tensor]]:
    """Inputs to differentiate with respect to, as (what the model gets, the leaves).

    The model gets a copy of each leaf: autograd forbids writing in place into a leaf
    that requires grad, and a forward may do so (ReLU(inplace=True) first).
    """
    leaves: list[torch.Tensor] = []

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            leaf = value.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()
        if isinstance(value, tuple):
            return tuple(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(inputs), leaves


def _set_mode(model: nn.Module, train_mode: bool) -> None:
    try:
        model.train(train_mode)
    except NotImplementedError:  # a torch.export program keeps the mode it was exported in
        if train_mode:
            raise ProbeError(
                "a torch.export program runs in the mode it was exported in; export it in "
                "train mode, or check it without --train-mode"
            ) from None


FAST_PATH_NOTE = (
    "the fused fast path of nn.TransformerEncoder/MultiheadAttention was turned off for the "
    "check: it computes a whole layer in one kernel that no hook sees into"
)


def _uses_fast_path(model: nn.Module) -> bool:
    kinds = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)
    return any(isinstance(m, kinds) for m in model.modules())


@contextmanager
def _fast_path_disabled() -> Iterator[None]:
    """Make TransformerEncoder(Layer) and MultiheadAttention run their unfused code, whose
    submodules (linear1, norm1, ...) are called and so recorded. The result is the same up
    to rounding."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class UnitAxes:
    """Per-layer overrides of the unit axis: the first glob pattern matching a layer name
    wins; a negative axis counts from the end, as in torch."""

    def __init__(self, patterns: Mapping[str, int]) -> None:
        self.patterns = tuple(patterns.items())
        self._cache: dict[str, int | None] = {}

    def resolve(self, name: str, tensor: torch.Tensor, default: int) -> int:
        if not self.patterns:
            return default
        if name not in self._cache:
            self._cache[name] = next(
                (axis for pattern, axis in self.patterns if fnmatch.fnmatchcase(name, pattern)),
                None,
            )
        axis = self._cache[name]
        if axis is None or tensor.dim() == 0:
            return default
        if not -tensor.dim() <= axis < tensor.dim():
            raise ProbeError(
                f"unit axis {axis} for layer {name} is out of range for its output of shape "
                f"{tuple(tensor.shape)}"
            )
        return axis % tensor.dim()


def _direction(output: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=output.device).manual_seed(seed)
    return torch.randn(output.shape[1:], generator=gen, device=output.device, dtype=output.dtype)


def _sample_signs(output: torch.Tensor, seed: int) -> torch.Tensor | None:
    """+1 for half a batch's samples and -1 for the others, in a seeded order, for the
    surrogate loss in train mode. With one direction for every sample, a pooled output sends
    the same gradient back to every sample and position of a channel, and a train-mode batch
    norm, whose backward takes out the batch mean, cancels it: everything before the last
    norm of a MobileNet got gradients of ~1e-13."""
    if output.dim() == 0:
        return None
    # Drawn where the output is, as the direction is: a copy to the device every batch
    # would make the host wait for the GPU.
    gen = torch.Generator(device=output.device).manual_seed(seed)
    order = torch.randperm(output.shape[0], generator=gen, device=output.device)
    return torch.where(order % 2 == 0, 1.0, -1.0).to(output.dtype)


def _parameter_owners(recorder: _Recorder) -> dict[int, nn.Module]:
    """Each parameter's recorded owner module (the first one, for tied weights)."""
    owners: dict[int, nn.Module] = {}
    for module in recorder.recorded:
        for p in trained_parameters(module):
            owners.setdefault(id(p), module)
    return owners


def _report_param_grads(
    recorder: _Recorder,
    owners: dict[int, nn.Module],
    trainable: list[torch.nn.Parameter],
    grads: Sequence[torch.Tensor | None],
) -> None:
    by_module: dict[nn.Module, list[torch.Tensor]] = {}
    for p, g in zip(trainable, grads):
        module = owners.get(id(p))
        if module is not None and g is not None:
            by_module.setdefault(module, []).append(g)
    for module, module_grads in by_module.items():
        layer = recorder.module_layers.get(module)
        if layer is not None:
            recorder.observer.on_param_grads(layer, module_grads)
