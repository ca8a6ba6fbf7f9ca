"""Named metrics that rules are written in, derived from the run's statistics.

Part of the rules stage: it turns RunStats into flat mappings of plain values, one
for the model, one per layer and one per weight tensor. Every name a rule may use is
declared here with one line of documentation; a rule naming anything else fails to
load. Values are None where they do not apply (a Linear layer has no dead units).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelcheck.families import ACTIVATION_FAMILIES

if TYPE_CHECKING:  # the types only: rules load without torch
    from modelcheck.stats import Distribution, LayerStats, ParameterStats, RunStats

# He gain for the ReLU family, LeCun (1) otherwise: std * sqrt(fan_in) a layer should start at.
_HE_FAMILIES = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu"})
_PASS_THROUGH = frozenset({"dropout", "other", "pool", "block"})
_WEIGHTED_FAMILIES = frozenset({"linear", "conv", "rnn", "attention"})
# A learnt scale of one value this close to 0 starts its branch near zero (LayerScale: 1e-6
# in ConvNeXt, 1e-5 in CaiT, 1e-4 in DeiT III).
_NEAR_ZERO = 0.01
# A block's index in a module name: transformer.h.3.attn.c_proj.
_BLOCK_INDEX = re.compile(r"\.\d+\.")
# Repeated blocks from which a layer's gradient is judged against its own kind in the last
# block rather than against the head (see _add_gradient_ratios).
_STACK_BLOCKS = 4
# How near a weight's std must come to 1/sqrt(N) or 1/sqrt(2N) of the others' to be taken
# as scaled with depth on purpose (a std over a few thousand values is far closer).
_DEPTH_SCALE_TOLERANCE = 0.1
# The value projection's token beside each query or key projection's token.
_VALUE_OF = {"q": "v", "k": "v", "query": "value", "key": "value", "wq": "wv", "wk": "wv"}
# Layers that pass a near-zero output on unchanged or smaller (dropout, identity, ReLU).
_CARRIERS = frozenset({"dropout", "other", *ACTIVATION_FAMILIES})

MODEL_METRICS: Mapping[str, str] = {
    "parameters": "number of parameter values in the model",
    "samples": "number of probe samples",
    "output_rows": "output vectors the output rules compare: one per sample, or per sample "
    "and position where the output has a position axis",
    "outputs": "those in words: '30 samples', or '512 positions of 32 samples'",
    "probe_noise": "the probe is the random one: seeded N(0, 1) draws, not data",
    "layers": "number of recorded layers",
    "loss": "loss the backward pass used ('surrogate' without labels)",
    "input_float": "the probe input is floating point",
    "input_mean_abs": "median over input features of |feature mean|",
    "input_std": "median over input features of the feature std",
    "input_features": "number of input features (channels for images)",
    "input_nonfinite": "NaN or Inf values in the probe input",
    "forward_nonfinite": "NaN or Inf values in any layer's output, parameters or buffers",
    "output_units": "size of the output's last dimension",
    "output_nonfinite": "NaN or Inf values in the model output",
    "output_rel_std": "largest per-unit std of the output over samples, relative to its rms",
    "output_classes_predicted": "output units that are the argmax for at least one sample",
    "output_top_class_fraction": "share of samples whose argmax is the most common one",
    "hidden_kurtosis": "excess kurtosis of each hidden activation layer, in depth order",
    "hidden_layers": "names of the hidden activation layers, in depth order",
    "kurtosis_rho": "Spearman correlation of hidden_kurtosis with depth",
    "kurtosis_first": "excess kurtosis of the shallowest hidden activation layer",
    "kurtosis_last": "excess kurtosis of the deepest hidden activation layer",
    "first_hidden_layer": "name of the shallowest hidden activation layer",
    "last_hidden_layer": "name of the deepest hidden activation layer",
    "near_zero_init_layers": "names of the layers that are near_zero_init",
    "last_layer": "name of the last layer to run",
    "output_near_zero_init": "the last layer's output is near_zero_output",
}

LAYER_METRICS: Mapping[str, str] = {
    "name": "module name, or producer.function for functional activations",
    "type": "module class name, or F.<function>",
    "family": "activation or layer family (relu, tanh, linear, conv, norm, ...)",
    "depth": "position in execution order, from 0",
    "functional": "the layer is a functional activation called in a forward",
    "is_activation": "the layer is an activation function",
    "is_last": "the layer is the last one executed",
    "calls": "how many times the layer ran over the probe",
    "count": "number of output values seen",
    "units": "units of the output (features, channels)",
    "mean": "mean output value",
    "std": "standard deviation of the output values",
    "rms": "root mean square of the output values",
    "min": "smallest output value",
    "max": "largest output value",
    "skewness": "skewness of the output values",
    "kurtosis": "excess kurtosis of the output values (0 for a Gaussian)",
    "zero_fraction": "share of output values exactly zero",
    "nonfinite": "NaN or Inf output values",
    "dead_fraction": "share of units active (> 0) on under 1% of positions (ReLU, GELU, SiLU)",
    "dead_units": "number of such dead units",
    "saturated_fraction": "share of units in the flat region on at least 95% of positions",
    "saturated_units": "number of such saturated units",
    "saturated_value_fraction": "share of output values in the flat region",
    "unit_active_fraction": "per unit: share of positions where it is > 0 (ReLU, GELU, SiLU)",
    "unit_saturated_fraction": "per unit: share of positions in the flat region",
    "unit_std": "per unit: standard deviation over positions",
    "unit_mean": "per unit: mean over positions",
    "rms_ratio": "output rms relative to the first layer with weights (None before it)",
    "reference_layer": "the layer rms_ratio is relative to",
    "grad_rms": "rms of the gradient of the loss with respect to the layer output",
    "param_grad_rms": "rms of the gradients of the layer's own parameters",
    "param_grad_mean_abs": "mean |gradient| of the layer's own parameters",
    "param_grad_ratio": "param_grad_rms relative to the last weight layer's (linear, conv, ...)",
    "grad_reference_layer": "the layer param_grad_ratio is relative to",
    "param_grad_depth_ratio": "param_grad_rms relative to the same layer in the last of the "
    "blocks it repeats in (at least 4 of them: encoder.layer.N.output.dense), else "
    "param_grad_ratio: how gradients change with depth, apart from the head",
    "grad_depth_reference_layer": "the layer param_grad_depth_ratio is relative to",
    "param_nonfinite": "NaN or Inf values in the layer's parameters",
    "buffer_nonfinite": "NaN or Inf values in the layer's buffers",
    "grad_nonfinite": "the layer's output or parameter gradients hold NaN or Inf",
    "has_norm_before": "a normalisation layer ran just before this one",
    "has_norm_after": "a normalisation layer runs just after this one, on its output",
    "has_parameters": "the layer computes with weights of its own",
    "is_query_or_key": "an attention's query or key projection, named beside its value "
    "projection (query/key/value, q_proj/k_proj/v_proj, to_q/to_k/to_v, ...)",
    "near_zero_init": "a weight all 0, or a scale of one value within 0.01 of 0, by design: "
    "the layer's input varies and other layers are random (LoRA's B, LayerScale)",
    "init_scale_param": "the parameter that makes the layer near_zero_init",
    "init_scale": "its value",
    "near_zero_output": "near_zero_init, or no larger holding or passing on such an output",
    "near_zero_gradient": "the gradient passes through a near_zero_init layer (inside it, or "
    "earlier in its module), or is exactly 0 with a zeroed layer elsewhere",
}

PARAMETER_METRICS: Mapping[str, str] = {
    "param": "parameter name within its layer (weight, weight_ih_l0, ...)",
    "param_mean": "mean of the parameter values",
    "param_std": "standard deviation of the parameter values",
    "param_numel": "number of values in the parameter",
    "fan_in": "inputs feeding one output unit",
    "all_equal": "every value of the parameter is the same",
    "next_activation": "family of the activation that follows the layer ('linear' if none)",
    "init_gain": "std * sqrt(fan_in) expected for that activation (He sqrt(2), else 1)",
    "init_ratio": "std * sqrt(fan_in) relative to init_gain",
    "depth_scaled_init": "the std is the model's other weights' median std over sqrt(2N) or "
    "sqrt(N), N the blocks the layer repeats in: a residual branch's output layer scaled with "
    "depth (GPT-2, nanoGPT, Megatron)",
}


@dataclass(frozen=True, slots=True)
class Metrics:
    """Everything rules can read, in execution order."""

    model: Mapping[str, object]
    layers: tuple[Mapping[str, object], ...]
    parameters: tuple[Mapping[str, object], ...]


def derive(
    run: RunStats, *, parameters: int, loss: str, samples: int, noise: bool = False
) -> Metrics:
    layers = [_layer_metrics(layer, i, len(run.layers)) for i, layer in enumerate(run.layers)]
    _add_relative(layers, "rms", "rms_ratio", "reference_layer", first=True)
    _add_gradient_ratios(layers)
    _add_context(layers, run.layers)
    _add_near_zero_init(layers, run)
    model = _model_metrics(
        run, layers, parameters=parameters, loss=loss, samples=samples, noise=noise
    )
    params = []
    for i, (layer, stats) in enumerate(zip(layers, run.layers)):
        params += _parameter_metrics(layer, stats, _next_activation(layers, i))
    _add_depth_scaled(params)
    return Metrics(model=model, layers=tuple(layers), parameters=tuple(params))


def _array(values: Sequence[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)


def _distribution_metrics(d: Distribution | None) -> dict[str, object]:
    if d is None:
        keys = (
            "count",
            "units",
            "mean",
            "std",
            "rms",
            "min",
            "max",
            "skewness",
            "kurtosis",
            "zero_fraction",
            "nonfinite",
            "dead_fraction",
            "dead_units",
            "saturated_fraction",
            "saturated_units",
            "saturated_value_fraction",
            "unit_active_fraction",
            "unit_saturated_fraction",
            "unit_std",
            "unit_mean",
        )
        return dict.fromkeys(keys)
    return {
        "count": d.count,
        "units": d.units,
        "mean": d.mean,
        "std": d.std,
        "rms": d.rms,
        "min": d.min,
        "max": d.max,
        "skewness": d.skewness,
        "kurtosis": d.kurtosis,
        "zero_fraction": d.zero_fraction,
        "nonfinite": d.nonfinite,
        "dead_fraction": d.dead_fraction,
        "dead_units": _units(d.dead_fraction, d.units),
        "saturated_fraction": d.saturated_fraction,
        "saturated_units": _units(d.saturated_fraction, d.units),
        "saturated_value_fraction": d.saturated_value_fraction,
        "unit_active_fraction": _array(d.unit_active_fraction),
        "unit_saturated_fraction": _array(d.unit_saturated_fraction),
        "unit_std": _array(d.unit_std),
        "unit_mean": _array(d.unit_mean),
    }


def _units(fraction: float | None, units: int) -> int | None:
    return None if fraction is None else round(fraction * units)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _layer_metrics(layer: LayerStats, depth: int, total: int) -> dict[str, object]:
    out_grad, param_grad = layer.output_grad, layer.param_grad
    grad_nonfinite = any(
        g is not None and (g.nonfinite > 0 or not _finite(g.rms)) for g in (out_grad, param_grad)
    )
    metrics = {
        "name": layer.name,
        "type": layer.type,
        "family": layer.family,
        "depth": depth,
        "functional": layer.functional,
        "is_activation": layer.family in ACTIVATION_FAMILIES,
        "is_last": depth == total - 1,
        "calls": layer.calls,
        **_distribution_metrics(layer.activation),
        "grad_rms": None if out_grad is None else out_grad.rms,
        "param_grad_rms": None if param_grad is None else param_grad.rms,
        "param_grad_mean_abs": None if param_grad is None else param_grad.mean_abs,
        "param_nonfinite": sum(p.nonfinite for p in layer.parameters),
        "buffer_nonfinite": layer.buffer_nonfinite,
        "grad_nonfinite": grad_nonfinite,
        "has_parameters": bool(layer.parameters),
    }
    return metrics


def _add_relative(layers: list[dict], key: str, ratio: str, reference: str, *, first: bool):
    """Divide ``key`` by the first (or last) layer's positive finite value of it.

    The first layer with weights of its own is preferred: a padding or reshaping layer in
    front of it carries the scale of the raw input (audio at 0.07 rms), not of the network,
    and gets no ratio, since growth is measured from the reference on.
    """
    candidates = [m for m in layers if _finite(m[key]) and m[key] > 0]
    weighted = [m for m in candidates if m["has_parameters"]]
    candidates = weighted if first and weighted else candidates
    ref = (candidates[0] if first else candidates[-1]) if candidates else None
    for m in layers:
        if ref is None or m[key] is None or (first and m["depth"] < ref["depth"]):
            m[ratio], m[reference] = None, None
        else:
            m[ratio], m[reference] = m[key] / ref[key], ref["name"]


def reference_values(layers: Sequence[LayerStats]) -> tuple[float | None, float | None]:
    """The output rms and the parameter-gradient rms that the depth rules divide by: the first
    layer with weights (else the first layer) and the last weight layer. Renderers that draw
    the rules' thresholds use these, so their lines match the findings."""
    rms = [
        (bool(layer.parameters), layer.activation.rms)
        for layer in layers
        if layer.activation is not None
        and _finite(layer.activation.rms)
        and layer.activation.rms > 0
    ]
    first = next((v for weighted, v in rms if weighted), rms[0][1] if rms else None)
    grads = [
        layer.param_grad.rms
        for layer in layers
        if layer.family in _WEIGHTED_FAMILIES
        and layer.param_grad is not None
        and _finite(layer.param_grad.rms)
        and layer.param_grad.rms > 0
    ]
    return first, grads[-1] if grads else None


def _add_gradient_ratios(layers: list[dict]) -> None:
    """Divide each weight layer's parameter-gradient rms by the last weight layer's, and
    by the same layer's in the last of its repeated blocks.

    Only layers with weight matrices or kernels are compared: a norm gain's gradient sums over
    every position and an embedding's falls on the few rows a probe uses, so neither is on
    the same scale (in all-MiniLM-L6-v2 the last LayerNorm's is ×14 the last Linear's, and
    the word embeddings' ×0.004).

    The depth ratio judges a stack of repeated blocks by itself. A classification head can
    hold gradients ×100 those of every block behind it, whatever the depth: in a freshly
    initialised BERT-base the classifier reads one position through a pooler, and every
    encoder layer gets ×0.008-0.014 of its gradient, the first block as much as the last.
    """
    weighted = [m for m in layers if m["family"] in _WEIGHTED_FAMILIES]
    _add_relative(
        weighted, "param_grad_rms", "param_grad_ratio", "grad_reference_layer", first=False
    )
    for m in layers:
        if m["family"] not in _WEIGHTED_FAMILIES:
            m["param_grad_ratio"], m["grad_reference_layer"] = None, None
        m["param_grad_depth_ratio"] = m["param_grad_ratio"]
        m["grad_depth_reference_layer"] = m["grad_reference_layer"]
    for stack in _repeated([m["name"] for m in weighted], _STACK_BLOCKS):
        _add_relative(
            [weighted[i] for i in stack],
            "param_grad_rms",
            "param_grad_depth_ratio",
            "grad_depth_reference_layer",
            first=False,
        )


def _repeated(names: Sequence[str], at_least: int = 2) -> list[list[int]]:
    """Where the names that differ only in a block index are (``transformer.h.N.attn``), a
    group of at least ``at_least`` positions per name with its index masked."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        masked = _BLOCK_INDEX.sub(".#.", name)
        if masked != name:
            groups.setdefault(masked, []).append(i)
    return [group for group in groups.values() if len(group) >= at_least]


def has_gradient_stacks(layers: Sequence[LayerStats]) -> bool:
    """Whether vanishing-gradients judges some weight layer against its own kind in the last
    of its repeated blocks, rather than against the last weight layer."""
    weighted = [layer.name for layer in layers if layer.family in _WEIGHTED_FAMILIES]
    return bool(_repeated(weighted, _STACK_BLOCKS))


def _add_context(layers: list[dict], stats: Sequence[LayerStats]) -> None:
    names = {m["name"] for m in layers}
    for i, m in enumerate(layers):
        m["has_norm_before"] = i > 0 and layers[i - 1]["family"] == "norm"
        # Not a norm of a sum the output is part of (a pre-norm block's next norm, after the
        # residual add): that one does not divide this layer's scale out.
        m["has_norm_after"] = (
            i + 1 < len(layers)
            and layers[i + 1]["family"] == "norm"
            and stats[i + 1].input_from == m["name"]
        )
        m["is_query_or_key"] = m["family"] == "linear" and _is_query_or_key(m["name"], names)


def _is_query_or_key(name: str, names: set[str]) -> bool:
    """Whether ``name`` is a query or key projection: swapping its query or key token for the
    value token names a sibling layer (BERT's ``query``/``value``, LLaMA's ``q_proj``/``v_proj``,
    T5's ``q``/``v``, DistilBERT's ``q_lin``/``v_lin``, diffusers' ``to_q``/``to_v``,
    Meta's ``wq``/``wv``)."""
    parent, _, leaf = name.rpartition(".")
    tokens = leaf.split("_")
    for i, token in enumerate(tokens):
        value = _VALUE_OF.get(token)
        if value is not None:
            sibling = "_".join([*tokens[:i], value, *tokens[i + 1 :]])
            if (f"{parent}.{sibling}" if parent else sibling) in names:
                return True
    return False


def _add_near_zero_init(layers: list[dict], run: RunStats) -> None:
    """Mark the layers that start their branch at or near zero by design, and what is small
    because of them.

    Zeroing a branch's last layer, or scaling it by a tiny learnt factor, makes a residual
    block start as the identity: LoRA's B, the last norm gain of a block (zero_init_residual),
    DiT's adaLN-Zero, modded-nanogpt's output projections and head, ReZero's alpha, Flamingo's
    gates, LayerScale (CaiT, DeiT III, ConvNeXt: 1e-6). Until training grows that weight, the
    layer's output is small, and so are the gradients of the layers behind it: the depth rules
    would call that vanishing. Such a weight is taken as by design when other weight layers are
    random (zeroing every layer is the classic bug) and the layer that ran before it, standing
    in for its input, varies: two zeroed layers in a row can hold each other at zero.
    """
    stats = run.layers
    random_weights = any(
        s.family in _WEIGHTED_FAMILIES
        and any(p.fan_in is not None and p.min != p.max for p in s.parameters)
        for s in stats
    )
    inputs = [run.input, *(s.activation for s in stats[:-1])]
    scales = [
        _near_zero_scale(s) if random_weights and _varies(x) else None
        for s, x in zip(stats, inputs)
    ]
    scaled = [(j, s.name, p.max == 0) for j, (s, p) in enumerate(zip(stats, scales)) if p]
    carried = -1.0  # a dropout or activation after a near-zero output, no larger, is one too
    for i, (m, s, scale) in enumerate(zip(layers, stats, scales)):
        rms = _finite_rms(s.activation)
        held = [
            _finite_rms(stats[j].activation) or 0.0
            for j, name, _ in scaled
            if _inside(name, s.name)
        ]
        m["near_zero_init"] = scale is not None
        m["init_scale_param"] = None if scale is None else scale.name
        m["init_scale"] = None if scale is None else scale.max
        limit = max([*held, carried if s.family in _CARRIERS else -1.0])
        m["near_zero_output"] = scale is not None or (rms is not None and rms <= limit)
        carried = rms if m["near_zero_output"] and rms is not None else -1.0
        # A gate computed before the branch it multiplies (adaLN-Zero) is not behind it in the
        # forward's order; but its zeros leave gradients of exactly 0, which a gradient that
        # vanishes with depth never is.
        exact_zero = s.param_grad is not None and s.param_grad.rms == 0
        m["near_zero_gradient"] = s.param_grad is not None and any(
            _behind(s.name, i, name, j) or (exact_zero and zero and j != i)
            for j, name, zero in scaled
        )


def _near_zero_scale(layer: LayerStats) -> ParameterStats | None:
    """The parameter that makes the layer's output start at or near zero: a weight of all
    zeros, or a scale (a vector or scalar) of one value within 0.01 of zero. A constant
    matrix other than 0 is the symmetry fault poor-initialization reports; an activation's
    parameter (PReLU's slope) scales no branch."""
    if layer.family in ACTIVATION_FAMILIES:
        return None
    for p in layer.parameters:
        if "bias" in p.name or p.nonfinite or p.min != p.max:
            continue
        if (len(p.shape) <= 1 and abs(p.max) <= _NEAR_ZERO) or (
            p.max == 0 and p.name.endswith("weight")
        ):
            return p
    return None


def _inside(name: str, module: str) -> bool:
    return name.startswith(f"{module}.")


def _behind(name: str, depth: int, scaled: str, scaled_depth: int) -> bool:
    """Whether a layer's gradient passes through the scaled layer: it is inside it, or it
    ran before it in the same module (the branch the scaled layer ends, as LoRA's A before
    its B, an attention before its LayerScale)."""
    if _inside(name, scaled):
        return True
    parent = scaled.rpartition(".")[0]
    return depth < scaled_depth and (not parent or _inside(name, parent))


def _varies(d: Distribution | None) -> bool:
    return d is not None and not d.nonfinite and max(d.unit_std, default=0.0) > 0


def _finite_rms(d: Distribution | None) -> float | None:
    return d.rms if d is not None and not d.nonfinite and math.isfinite(d.rms) else None


def _next_activation(layers: Sequence[Mapping[str, object]], index: int) -> str:
    for m in layers[index + 1 :]:
        family = m["family"]
        if family in ACTIVATION_FAMILIES:
            return str(family)
        if family not in _PASS_THROUGH:
            return "linear"
    return "linear"


def _parameter_metrics(
    layer: Mapping[str, object], stats: LayerStats, activation: str
) -> list[dict]:
    if stats.family not in _WEIGHTED_FAMILIES:
        return []
    found = []
    for p in stats.parameters:
        if p.fan_in is None:
            continue
        gain = math.sqrt(2.0) if activation in _HE_FAMILIES else 1.0
        scale = p.std * math.sqrt(p.fan_in)
        found.append(
            {
                **layer,
                "param": p.name,
                "param_mean": p.mean,
                "param_std": p.std,
                "param_numel": math.prod(p.shape),
                "fan_in": p.fan_in,
                "all_equal": p.max == p.min and math.prod(p.shape) > 1,
                "next_activation": activation,
                "init_gain": gain,
                "init_ratio": scale / gain,
            }
        )
    return found


def _add_depth_scaled(params: list[dict]) -> None:
    """Mark the weights initialised smaller with depth, as GPT-2 does the output layer of
    each residual branch (std 0.02 / sqrt(2 × blocks), so that the residual stream does not
    grow with depth): the same weight in each of N repeated blocks (names that differ only
    in their block index), at the std of the model's other weights over sqrt(2N) or sqrt(N).
    """
    for p in params:
        p["depth_scaled_init"] = False
    stds = np.array([p["param_std"] for p in params], dtype=np.float64)
    # ':' before the parameter: a layer named for its index (net.3) is no block.
    for members in _repeated([f"{p['name']}:{p['param']}" for p in params]):
        blocks = len(members)
        if blocks == len(params):
            continue
        common = float(np.median(np.delete(stds, members)))
        for i in members:
            params[i]["depth_scaled_init"] = common > 0 and any(
                abs(stds[i] / common * math.sqrt(branches) - 1) <= _DEPTH_SCALE_TOLERANCE
                for branches in (blocks, 2 * blocks)
            )


def _model_metrics(
    run: RunStats, layers: list[dict], *, parameters: int, loss: str, samples: int, noise: bool
) -> dict:
    rows = None if run.output is None else run.output.count // max(run.output.units, 1)
    hidden = [m for m in layers if m["is_activation"] and not m["is_last"]]
    hidden = [m for m in hidden if m["kurtosis"] is not None]
    kurtosis = np.asarray([m["kurtosis"] for m in hidden], dtype=np.float64)
    return {
        "parameters": parameters,
        "samples": samples,
        "output_rows": rows,
        "outputs": _outputs(rows, samples),
        "probe_noise": noise,
        "layers": len(layers),
        "loss": loss,
        "forward_nonfinite": sum(
            (m["nonfinite"] or 0) + m["param_nonfinite"] + m["buffer_nonfinite"] for m in layers
        ),
        **_input_metrics(run.input),
        **_output_metrics(run.output, run.output_argmax),
        "hidden_kurtosis": kurtosis,
        "hidden_layers": tuple(m["name"] for m in hidden),
        "kurtosis_rho": _depth_correlation(kurtosis),
        "kurtosis_first": float(kurtosis[0]) if kurtosis.size else None,
        "kurtosis_last": float(kurtosis[-1]) if kurtosis.size else None,
        "first_hidden_layer": hidden[0]["name"] if hidden else None,
        "last_hidden_layer": hidden[-1]["name"] if hidden else None,
        "near_zero_init_layers": tuple(m["name"] for m in layers if m["near_zero_init"]),
        "last_layer": layers[-1]["name"] if layers else None,
        "output_near_zero_init": bool(layers) and layers[-1]["near_zero_output"],
    }


def _outputs(rows: int | None, samples: int) -> str | None:
    if rows is None:
        return None
    if rows == samples:
        return f"{rows} samples"
    return f"{rows} {'positions' if rows > samples else 'outputs'} of {samples} samples"


def _depth_correlation(values: np.ndarray) -> float | None:
    """Spearman's rho of values against their depth order; None if undefined."""
    if values.size < 3 or np.ptp(values) == 0:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(np.arange(values.size), values).statistic
    return float(rho) if math.isfinite(rho) else None


def _input_metrics(d: Distribution | None) -> dict[str, object]:
    if d is None:
        return {
            "input_float": False,
            "input_mean_abs": None,
            "input_std": None,
            "input_features": None,
            "input_nonfinite": 0,
        }
    # A feature seen once has no spread to measure (one sample of a vector probe).
    spread = d.count // max(d.units, 1) >= 2
    return {
        "input_float": True,
        "input_mean_abs": float(np.median(np.abs(d.unit_mean))),
        "input_std": float(np.median(d.unit_std)) if spread else None,
        "input_features": d.units,
        "input_nonfinite": d.nonfinite,
    }


def _output_metrics(d: Distribution | None, argmax: tuple[int, ...] | None) -> dict:
    if d is None or d.nonfinite:
        # NaN outputs are the nonfinite rule's business; their spread means nothing.
        return {
            "output_units": None if d is None else d.units,
            "output_nonfinite": 0 if d is None else d.nonfinite,
            "output_rel_std": None,
            "output_classes_predicted": None,
            "output_top_class_fraction": None,
        }
    rel = max(d.unit_std) / d.rms if d.rms > 0 else 0.0
    wins = np.asarray(argmax) if argmax is not None else None
    return {
        "output_units": d.units,
        "output_nonfinite": 0,
        "output_rel_std": rel if math.isfinite(rel) else None,
        "output_classes_predicted": None if wins is None else int((wins > 0).sum()),
        "output_top_class_fraction": (
            None if wins is None or wins.sum() == 0 else float(wins.max() / wins.sum())
        ),
    }
