"""Capture for compiled models, which forward hooks cannot see into: TorchScript modules
(scripted or traced) and ``torch.export`` programs.

A loaded ScriptModule refuses forward hooks, and its interpreter runs ops that no
TorchFunctionMode and no Python frame sees. A TorchDispatchMode would see every aten op,
but not which module ran it: the interpreter's call stack is not exposed to Python. The
graphs themselves know it: every node of a TorchScript inlined graph carries the module
instances it was inlined from (``node.getModuleHierarchy()``), and every node of an
exported program carries ``meta["nn_module_stack"]``. So this module reads the graph,
decides which node outputs are which layer's outputs — a value computed inside a module
and leaving it as its primary output (not as a state returned beside it) is that module's
output; where several branches could produce it, the one that runs claims it — and runs a
copy of the graph in which each such value passes through ``modelcheck::observe``, an
identity op that hands it to the observer. The copy computes with the model's own
parameters; the model is not modified.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import operator
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelcheck.capture import (
    _ELEMENTWISE,
    _SATURATION,
    LayerInfo,
    Observer,
    UnitAxes,
    announce_layer,
    block_layer,
    call_model,
    channel_first_name,
    family_from_type_name,
    first_line,
    owns_tensors,
    pass_on_gradient,
)
from modelcheck.errors import CaptureError

# Activation ops recorded as functional layers when a forward calls them directly.
_ACTIVATION_OPS = {
    "relu": "relu",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "elu": "elu",
    "gelu": "gelu",
    "silu": "silu",
    "softplus": "softplus",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "hardtanh": "hardtanh",
}

# Ops that keep the values and the leading axes of their input.
_SAME_DATA = frozenset({"to", "unsqueeze", "squeeze", "contiguous", "clone", "detach", "_to_copy"})

# The op is global to the process (torch's op registry is); which run it reports to is not.
_ACTIVE: contextvars.ContextVar[GraphRecorder | None] = contextvars.ContextVar(
    "modelcheck_graph_recorder", default=None
)
_LIBRARY = torch.library.Library("modelcheck", "DEF")
_LIBRARY.define("observe(Tensor(a) x, int site) -> Tensor(a)")


def _observe(x: torch.Tensor, site: int) -> torch.Tensor:
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.observe(site, x)
    return x


# CompositeImplicitAutograd: the op runs above autograd, so it sees (and returns) the very
# tensor the graph computed, with its grad_fn, and a hook on it sees its gradient.
_LIBRARY.impl("observe", _observe, "CompositeImplicitAutograd")


def handles(model: nn.Module) -> bool:
    """Whether ``model`` needs this route: a ScriptModule, or an exported program's module."""
    return isinstance(model, torch.jit.ScriptModule) or _is_exported(model)


def _is_exported(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and any(
        "nn_module_stack" in node.meta for node in model.graph.nodes
    )


# -- the plan: which node output is which layer --------------------------------------------


@dataclass(frozen=True, slots=True)
class _Node:
    """One op of a flat graph, in the terms the plan needs (front-end neutral)."""

    scope: tuple[tuple[str, str], ...]  # (module path, class name), outermost first
    op: str  # base op name: "linear", "relu", ...
    source: int | None  # the node whose output is this op's first input, if an op made it
    primary: frozenset[int]  # depths of the modules it leaves as their primary output


@dataclass(frozen=True, slots=True)
class Site:
    """An observed value: the layers it is the output of, and how to find its units."""

    layers: tuple[LayerInfo, ...]
    channel_first: bool
    inherit_from: str | None  # elementwise layers take the unit axis of their input's layer
    op: str  # the op computing the value: of a module's candidate outputs, one op claims it


def plan(
    nodes: Sequence[_Node],
    recorded: Mapping[str, tuple[str, tuple[str, ...]]],
    leaves: frozenset[str],
    saturation: Mapping[str, tuple[float, float]],
) -> dict[int, Site]:
    """Decide the layers each node's output belongs to.

    ``recorded`` maps the paths of recorded modules (leaves, and modules owning parameters
    directly, as in eager capture) to (class name, parameter names). A node's output is a
    module's output when it leaves the module as its primary output (not as a state beside
    it), to a use outside the module or the model's return. An activation op whose
    innermost module is not a recorded leaf is a functional layer, named after the layer that
    produced its input (``fc2.relu``) or, failing that, after its scope, like eager capture.
    """
    sites: dict[int, Site] = {}
    layer_at: dict[int, str] = {}
    seen: dict[str, int] = {}
    for index, node in enumerate(nodes):
        source = node.source
        while source is not None and source not in sites and nodes[source].op in _SAME_DATA:
            source = nodes[source].source  # look through dtype casts and added unit axes
        node = _Node(node.scope, node.op, source, node.primary)
        layers = []
        for depth in sorted(node.primary, reverse=True):
            path, type_name = node.scope[depth - 1]
            if path in recorded and node.op not in _ALLOCATIONS:
                layers.append(_module_layer(path, type_name, recorded[path][1], saturation))
        innermost = node.scope[-1][0] if node.scope else ""
        family = _ACTIVATION_OPS.get(node.op)
        if family is not None and not (innermost in recorded and innermost in leaves):
            producer = layer_at.get(node.source) if node.source is not None else None
            base = f"{producer}.{family}" if producer else (f"{innermost}.{family}".lstrip("."))
            count = seen.get(base, 0)
            seen[base] = count + 1
            name = base if count == 0 else f"{base}_{count}"
            layers.append(LayerInfo(name, f"F.{family}", family, True, _SATURATION.get(family), ()))
        if not layers:
            block = _block_left(node, recorded)
            if block is None:
                continue
            layers.append(block_layer(*block))
        layer_at[index] = layers[0].name
        first = layers[0]
        elementwise = first.family in _ELEMENTWISE
        sites[index] = Site(
            layers=tuple(layers),
            channel_first=not first.functional and channel_first_name(first.type),
            inherit_from=(
                sites[node.source].layers[0].name if elementwise and node.source in sites else None
            ),
            op=node.op,
        )
    return sites


# Ops that make a tensor from nothing: never what a module computed from its input.
_ALLOCATIONS = frozenset({"zeros", "ones", "empty", "full", "zeros_like", "ones_like"})


_CONTAINER_TYPES = frozenset({"Sequential", "ModuleList", "ModuleDict"})


def _block_left(node: _Node, recorded: Mapping[str, object]) -> tuple[str, str] | None:
    """The innermost non-container module a value no layer records leaves: a block whose
    output is a residual sum (eager capture records the same)."""
    for depth in sorted(node.primary, reverse=True):
        path, type_name = node.scope[depth - 1]
        if path not in recorded and type_name not in _CONTAINER_TYPES:
            return path, type_name
    return None


def _module_layer(
    path: str,
    type_name: str,
    parameters: tuple[str, ...],
    saturation: Mapping[str, tuple[float, float]],
) -> LayerInfo:
    family = family_from_type_name(type_name)
    bounds = saturation.get(path, _SATURATION.get(family))
    return LayerInfo(path, type_name, family, False, bounds, parameters)


def _modules_table(
    model: nn.Module, scopes: Sequence[tuple[tuple[str, str], ...]]
) -> tuple[dict[str, tuple[str, tuple[str, ...]]], frozenset[str], dict[str, tuple[float, float]]]:
    """Recorded module paths with their class and parameter names, the leaves, and the
    bounds of any hardtanh layers (read from the module, which the graph does not say)."""
    modules = dict(model.named_modules())
    types = {path: type_name for scope in scopes for path, type_name in scope}
    paths = set(types) | {p for p in modules if p}
    leaves = set()
    for path in paths:
        module = modules.get(path)
        if module is not None:
            if next(module.children(), None) is None:
                leaves.add(path)
        elif not any(other.startswith(path + ".") for other in paths):
            leaves.add(path)  # an exported program keeps only modules owning parameters
    recorded = {}
    saturation = {}
    for path in paths:
        module = modules.get(path)
        owned = (
            () if module is None else tuple(n for n, _ in module.named_parameters(recurse=False))
        )
        if path in leaves or (module is not None and owns_tensors(module)):
            recorded[path] = (types.get(path) or _class_name(module), owned)
        hardtanh = path in recorded and family_from_type_name(recorded[path][0]) == "hardtanh"
        if module is not None and hardtanh:
            saturation[path] = (float(module.min_val), float(module.max_val))
    return recorded, frozenset(leaves), saturation


def _class_name(module: nn.Module | None) -> str:
    return getattr(module, "original_name", None) or type(module).__name__


# -- TorchScript front end -----------------------------------------------------------------

_SEGMENT = re.compile(r"([^.()]+)\(([^()]*)\)")
# Nodes that only pack or unpack values: a use through them is a use by their users.
_TS_TRANSPARENT = frozenset(
    {
        "prim::TupleConstruct",
        "prim::TupleUnpack",
        "prim::TupleIndex",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::DictConstruct",
        "aten::__getitem__",
    }
)


def _script_scope(node: Any, tree: Mapping[str, nn.Module]) -> tuple[tuple[str, str], ...]:
    scope = []
    path = ""
    for name, type_name in _SEGMENT.findall(node.getModuleHierarchy()):
        if name in ("SELF", "UNKNOWN_INSTANCE"):  # a method on self, or a plain function
            continue
        path = _child_path(tree, path, name)
        scope.append((path, type_name))
    return tuple(scope)


def _child_path(tree: Mapping[str, nn.Module], parent: str, name: str) -> str:
    """The module path of ``parent``'s child ``name``. A loop over a ModuleList is unrolled
    in TorchScript and its items appear as children of the list's owner ("encoder.0" for
    "encoder.layers.0"): look through the containers for them."""
    path = f"{parent}.{name}" if parent else name
    if path in tree or parent not in tree:
        return path
    for child_name, child in tree[parent].named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or getattr(
            child, "original_name", ""
        ) in ("ModuleList", "ModuleDict"):
            candidate = f"{parent}.{child_name}.{name}" if parent else f"{child_name}.{name}"
            if candidate in tree:
                return candidate
    return path


def _script_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.nodes():
        for block in node.blocks():
            yield from _script_nodes(block)
        yield node


def _is_tensor(value: Any) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _script_escapes(
    value: Any,
    scope: tuple,
    tree: Mapping[str, nn.Module],
    found: _Escapes,
    visited: set,
    path: tuple[int, ...] = (),
    bound: int | None = None,
) -> None:
    """Follow the uses of ``value`` (computed in ``scope``) through tuples and control flow,
    noting the modules it leaves as their primary output (``found.primary``, by depth): not
    as a later element of a tuple, such as an RNN's state beside its output. ``path`` holds
    the tuple offsets the value is nested at, innermost first; ``bound`` is the depth it has
    already left at as a later element."""
    bound = len(scope) if bound is None else bound
    for use in value.uses():
        user, offset = use.user, use.offset
        if (user, offset, path) in visited:
            continue
        visited.add((user, offset, path))
        kind = user.kind()
        if kind == "prim::Return":
            owner = user.owningBlock().owningNode()
            if owner is None:  # the graph's own return: the value leaves every module
                found.note(0, not any(path) and offset == 0, bound)
            elif owner.kind() == "prim::If":
                after = owner.outputsAt(offset)
                _script_escapes(after, scope, tree, found, visited, path, bound)
            else:  # a loop carries the value into its next iteration and out
                for output in owner.outputs():
                    _script_escapes(output, scope, tree, found, visited, path, bound)
            continue
        shared = _shared(scope, _script_scope(user, tree))
        primary = not any(path) and kind != "prim::SetAttr"  # state kept for the next call
        found.note(shared, primary, bound)
        if not primary:
            bound = min(bound, shared)
        if kind == "prim::TupleConstruct":
            after = user.output()
            _script_escapes(after, scope, tree, found, visited, (offset, *path), bound)
        elif kind in ("prim::TupleIndex", "prim::TupleUnpack") and path:
            if kind == "prim::TupleUnpack":
                after = user.outputsAt(path[0])
                _script_escapes(after, scope, tree, found, visited, path[1:], bound)
            elif _constant(user.inputsAt(1)) in (None, path[0]):
                _script_escapes(user.output(), scope, tree, found, visited, path[1:], bound)
        elif kind in _TS_TRANSPARENT:
            for output in user.outputs():
                _script_escapes(output, scope, tree, found, visited, path, bound)


class _Escapes:
    """How far a value leaves the modules it was computed in (see ``_script_escapes``)."""

    def __init__(self) -> None:
        self.primary: set[int] = set()

    def note(self, shared: int, primary: bool, bound: int) -> None:
        if primary:  # leaves the modules deeper than ``shared`` not yet left otherwise
            self.primary.update(range(shared + 1, bound + 1))


def _constant(value: Any) -> Any:
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def _script_source(
    value: Any, producer: Mapping[Any, int], element: int | None = None
) -> int | None:
    """The op whose output ``value`` (or element ``element`` of the tuple ``value``) is,
    looking through tuples and the branches of an ``if``."""
    if value is None:
        return None
    if element is None and value in producer:
        return producer[value]
    node = value.node()
    kind = node.kind()
    if kind == "prim::TupleUnpack" and element is None:
        return _script_source(node.input(), producer, list(node.outputs()).index(value))
    if kind == "prim::TupleConstruct" and element is not None:
        return _script_source(node.inputsAt(element), producer)
    if kind == "prim::If":
        offset = list(node.outputs()).index(value)
        for block in node.blocks():
            found = _script_source(list(block.outputs())[offset], producer, element)
            if found is not None:
                return found
    return None


def _shared(a: tuple, b: tuple) -> int:
    count = 0
    for x, y in zip(a, b):
        if x[0] != y[0]:
            break
        count += 1
    return count


def _instrument_script(model: torch.jit.ScriptModule) -> tuple[Any, list[_Node], dict]:
    """The inlined forward graph with observe ops after recorded outputs, as a function."""
    graph = model.forward.inlined_graph  # a private copy
    ops = [
        n
        for n in _script_nodes(graph)
        if n.kind().startswith("aten::") and n.outputsSize() and _is_tensor(n.outputsAt(0))
    ]
    producer = {n.outputsAt(0): i for i, n in enumerate(ops)}
    tree = dict(model.named_modules())
    nodes = []
    for n in ops:
        scope = _script_scope(n, tree)
        found = _Escapes()
        for index, out in enumerate(n.outputs()):
            # an op's later outputs (an LSTM cell's c beside h) are not its primary output
            path = () if index == 0 else (index,)
            _script_escapes(out, scope, tree, found, set(), path)
        first = next((v for v in n.inputs() if _is_tensor(v)), None)
        op = n.kind().removeprefix("aten::").rstrip("_")
        source = _script_source(first, producer)
        nodes.append(_Node(scope, op, source, frozenset(found.primary)))
    return graph, ops, nodes


_OBSERVED_FORWARD = "modelcheck_observed_forward"
"""The name of a scripted model's instrumented forward: TorchScript's errors of a call to it
(wrong arguments) begin with it, and say "forward" to the user instead."""


def _script_function(graph: Any, ops: list, sites: Mapping[int, Site]) -> Any:
    for index in sites:
        node = ops[index]
        value = node.outputsAt(0)
        constant = graph.insertConstant(index)
        constant.node().moveBefore(node)
        observe = graph.create("modelcheck::observe", [value, constant])
        observe.insertAfter(node)
        observe.output().setType(value.type())
        value.replaceAllUsesAfterNodeWith(observe, observe.output())
    return torch._C._create_function_from_graph(_OBSERVED_FORWARD, graph)


# -- torch.export front end ----------------------------------------------------------------


def _fx_scope(node: torch.fx.Node) -> tuple[tuple[str, str], ...]:
    stack = node.meta.get("nn_module_stack") or {}
    scope = []
    for path, type_ in stack.values():
        path = re.sub(r"@\d+$", "", path)  # a module's second call is "name@1"
        if not path:
            continue
        name = type_ if isinstance(type_, str) else type_.__qualname__
        scope.append((path, name.rsplit(".", 1)[-1]))
    return tuple(scope)


def _fx_use_scopes(node: torch.fx.Node) -> Iterator[tuple[tuple[str, str], ...]]:
    for user in node.users:
        if user.op == "output":
            yield ()
        elif user.op == "call_function" and user.target is operator.getitem:
            yield from _fx_use_scopes(user)
        else:
            yield _fx_scope(user)


def _fx_value(node: torch.fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _instrument_exported(model: torch.fx.GraphModule) -> tuple[Any, list, list[_Node]]:
    with warnings.catch_warnings():  # torch deprecations raised while copying its pytree specs
        warnings.simplefilter("ignore")
        graph = copy.deepcopy(model.graph)
    ops = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        value = _fx_value(node)
        if node.target is operator.getitem and node.args[1] == 0:
            ops.append(node)  # the first output of a multi-output op (an LSTM's output)
        elif isinstance(value, torch.Tensor) and isinstance(node.target, torch._ops.OpOverload):
            ops.append(node)
    producer = {n: i for i, n in enumerate(ops)}
    nodes = []
    for node in ops:
        op_node = node.args[0] if node.target is operator.getitem else node
        scope = _fx_scope(op_node)
        escape = min((_shared(scope, s) for s in _fx_use_scopes(node)), default=len(scope))
        first = next((a for a in op_node.args if isinstance(a, torch.fx.Node)), None)
        name = getattr(op_node.target, "_opname", str(op_node.target)).rstrip("_")
        left = frozenset(range(escape + 1, len(scope) + 1))
        nodes.append(_Node(scope, name, producer.get(first), left))
    return graph, ops, nodes


def _exported_module(
    model: torch.fx.GraphModule, graph: Any, ops: list, sites: Mapping[int, Site]
) -> torch.fx.GraphModule:
    for index in sites:
        node = ops[index]
        with graph.inserting_after(node):
            observe = graph.call_function(torch.ops.modelcheck.observe.default, (node, index))
        node.replace_all_uses_with(observe, delete_user_cb=_not(observe))
    # Built on the model: parameters and submodules are shared, not copied.
    return torch.fx.GraphModule(model, graph)


def _exported_shapes(model: torch.fx.GraphModule) -> str:
    shapes = [
        tuple(value.shape)
        for node in model.graph.nodes
        if node.op == "placeholder" and isinstance(value := _fx_value(node), torch.Tensor)
    ]
    return ", ".join(str(shape) for shape in shapes) or "of fixed shapes"


def _not(node: torch.fx.Node) -> Any:
    return lambda user: user is not node


# -- the recorder ---------------------------------------------------------------------------


class GraphRecorder:
    """Plays the part of capture's hook recorder for a compiled model: same Observer calls,
    same layer names, seen through ``modelcheck::observe`` in an instrumented graph copy."""

    def __init__(
        self, model: nn.Module, observer: Observer, gradients: bool, axes: UnitAxes
    ) -> None:
        self.model = model
        self.observer = observer
        self.gradients = gradients
        self.axes = axes
        self.stack: list = []  # no module stack to report a failure against
        self.notes: list[str] = []
        self.gradless: dict[str, None] = {}  # see capture.pass_on_gradient
        self.layers: dict[str, LayerInfo] = {}
        self.module_layers: dict[nn.Module, LayerInfo] = {}
        self._dims: dict[str, int] = {}  # unit axis each layer last used, for inheritance
        self._claims: dict[str, str] = {}
        self._tensor_state = [
            (module, name)
            for module, name, value in _script_attributes(model)
            if isinstance(value, torch.Tensor)
        ]
        try:
            self._build(model)
        except CaptureError:
            raise
        except Exception as error:
            raise CaptureError(
                f"cannot read the graph of this {type(model).__name__} to find its layers "
                f"({type(error).__name__}: {str(error).strip().splitlines()[0]})"
            ) from error
        modules = dict(model.named_modules())
        self.recorded = {
            modules[path]: path
            for site in self.sites.values()
            for layer in site.layers
            if not layer.functional and (path := layer.name) in modules
        }

    def _build(self, model: nn.Module) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            graph, ops, nodes = _instrument_script(model)
            self.sites = plan(nodes, *_modules_table(model, [n.scope for n in nodes]))
            function = _script_function(graph, ops, self.sites)
            self._forward = lambda *args, **kwargs: function(model, *args, **kwargs)
            self.notes.append(
                f"TorchScript {_class_name(model)}: layers read from its inlined graph"
            )
        else:
            graph, ops, nodes = _instrument_exported(model)
            self.sites = plan(nodes, *_modules_table(model, [n.scope for n in nodes]))
            self._forward = _exported_module(model, graph, ops, self.sites)
            self.notes.append("torch.export program: layers read from nn_module_stack")

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        token = _ACTIVE.set(self)
        try:
            with _script_state_kept(self.model), torch.jit.optimized_execution(False):
                yield
        finally:
            _ACTIVE.reset(token)

    def __enter__(self) -> GraphRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start_batch(self) -> None:
        self._dims.clear()
        self._claims.clear()
        # Cut the autograd history of state a streaming model carries from one call to the
        # next (truncated backpropagation, as in training): each backward covers one call.
        for module, name in self._tensor_state:
            value = getattr(module, name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                setattr(module, name, value.detach())

    def call(self, model: nn.Module, inputs: Any, extra: Mapping[str, Any]) -> Any:
        try:
            return call_model(_Callable(self._forward), inputs, extra)
        except RuntimeError as error:
            if not str(error).startswith(_OBSERVED_FORWARD):  # not an error of the call itself
                raise
            raise RuntimeError(str(error).replace(_OBSERVED_FORWARD, "forward")) from error
        except AssertionError as error:
            if "Guard failed" not in str(error) or isinstance(model, torch.jit.ScriptModule):
                raise
            raise CaptureError(
                f"the exported program does not accept this batch ({first_line(error)}): "
                f"it was exported for inputs {_exported_shapes(model)}; export it with "
                "dynamic_shapes (e.g. {'x': {0: torch.export.Dim('batch')}}), or pass "
                "--batch-size to match and a probe whose size is a multiple of it"
            ) from None

    def observe(self, index: int, value: torch.Tensor) -> None:
        if not value.is_floating_point():
            return
        site = self.sites[index]
        dim = self._unit_dim(site, value)
        for position, layer in enumerate(site.layers):
            # Several values may leave a module (the fused and the unfused branch of scripted
            # attention): the op that runs first in a forward claims the module, and only
            # that op's values are its outputs (one per call).
            if not layer.functional and self._claims.setdefault(layer.name, site.op) != site.op:
                continue
            if layer.name not in self.layers:
                self._first_sight(layer)
            layer_dim = self.axes.resolve(layer.name, value, dim)
            if position == 0:
                self._dims[layer.name] = layer_dim
            self.observer.on_activation(layer, value, layer_dim)
            if self.gradients and value.requires_grad:
                value.register_hook(
                    lambda g, layer=layer: pass_on_gradient(self.observer, layer, g, self.gradless)
                )

    def _unit_dim(self, site: Site, value: torch.Tensor) -> int:
        if value.dim() <= 1:
            return 0
        if site.channel_first:
            return 1
        if site.inherit_from in self._dims:
            return min(self._dims[site.inherit_from], value.dim() - 1)
        functional = site.layers[0].functional
        return 1 if functional and value.dim() >= 4 else value.dim() - 1

    def _first_sight(self, layer: LayerInfo) -> None:
        self.layers[layer.name] = layer
        module = None if layer.functional else dict(self.model.named_modules()).get(layer.name)
        if module is not None:
            self.module_layers[module] = layer
        announce_layer(self.observer, layer, module)


class _Callable(nn.Module):
    """Lets capture's calling convention (tuple, keywords, one dict) reach the graph copy,
    with the original forward's signature for the dict decision."""

    def __init__(self, forward: Any) -> None:
        super().__init__()
        self._call = forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


def _script_attributes(model: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """The plain attributes of every ScriptModule in ``model``: not submodules, parameters,
    buffers or the training flag."""
    for module in model.modules():
        if not isinstance(module, torch.jit.ScriptModule):
            continue
        owned = set(module._parameters.keys()) | set(module._buffers.keys()) | {"training"}
        table = torch._C._jit_debug_module_iterators(module._c)["named_attributes"]
        for name, value in table:
            if name not in owned and not isinstance(value, torch._C.ScriptModule):
                yield module, name, value


@contextlib.contextmanager
def _script_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore the plain attributes a scripted forward may assign (a streaming model's
    ``self._state``), besides the parameters and buffers ``capture.preserved`` restores."""
    saved = []
    for module, name, value in _script_attributes(model):
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
        elif not isinstance(value, (bool, int, float, str, type(None))):
            continue  # lists and objects cannot be assigned back faithfully: left alone
        saved.append((module, name, value))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
