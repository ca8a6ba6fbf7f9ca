"""Named metrics that rules are written in, derived from the run's statistics.

Part of the rules stage: it turns RunStats into flat mappings of plain values, one
for the model, one per layer and one per weight tensor. Every name a rule may use is
declared here with one line of documentation; a rule naming anything else fails to
load. Values are None where they do not apply (a Linear layer has no dead units).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelcheck.families import ACTIVATION_FAMILIES

if TYPE_CHECKING:  # the types only: rules load without torch
    from modelcheck.stats import Distribution, LayerStats, RunStats

# He gain for the ReLU family, LeCun (1) otherwise: std * sqrt(fan_in) a layer should start at.
_HE_FAMILIES = frozenset({"relu", "relu6", "leaky_relu", "elu", "gelu", "silu"})
_PASS_THROUGH = frozenset({"dropout", "other", "pool", "block"})
_WEIGHTED_FAMILIES = frozenset({"linear", "conv", "rnn", "attention"})
# The weights, or norm gains, that scale a layer's output: all 0, the output is constant.
_OUTPUT_WEIGHTS = frozenset({"weight", "out_proj.weight"})

MODEL_METRICS: Mapping[str, str] = {
    "parameters": "number of parameter values in the model",
    "samples": "number of probe samples",
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
    "zero_initialised_layers": "names of the zero-initialised layers (see zero_initialised)",
    "last_layer": "name of the last layer to run",
    "output_zero_initialised": "the last layer's output is zero_init_output: constant for now",
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
    "param_nonfinite": "NaN or Inf values in the layer's parameters",
    "buffer_nonfinite": "NaN or Inf values in the layer's buffers",
    "grad_nonfinite": "the layer's output or parameter gradients hold NaN or Inf",
    "has_norm_before": "a normalisation layer ran just before this one",
    "has_parameters": "the layer computes with weights of its own",
    "zero_initialised": "its weight is all 0 by design, its input varying, other layers random",
    "zero_init_output": "zero_initialised, or outputs 0 holding or following such a layer",
    "zero_init_gradient": "parameter gradients exactly 0, with another layer zero_initialised",
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
}


@dataclass(frozen=True, slots=True)
class Metrics:
    """Everything rules can read, in execution order."""

    model: Mapping[str, object]
    layers: tuple[Mapping[str, object], ...]
    parameters: tuple[Mapping[str, object], ...]


def derive(run: RunStats, *, parameters: int, loss: str) -> Metrics:
    layers = [_layer_metrics(layer, i, len(run.layers)) for i, layer in enumerate(run.layers)]
    _add_relative(layers, "rms", "rms_ratio", "reference_layer", first=True)
    _add_gradient_ratios(layers)
    _add_context(layers)
    _add_zero_init(layers, run)
    model = _model_metrics(run, layers, parameters=parameters, loss=loss)
    params = []
    for i, (layer, stats) in enumerate(zip(layers, run.layers)):
        params += _parameter_metrics(layer, stats, _next_activation(layers, i))
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
    """Divide each weight layer's parameter-gradient rms by the last weight layer's.

    Only layers with weight matrices or kernels are compared: a norm gain's gradient sums over
    every position and an embedding's falls on the few rows a probe uses, so neither is on
    the same scale (in all-MiniLM-L6-v2 the last LayerNorm's is ×14 the last Linear's, and
    the word embeddings' ×0.004).
    """
    weighted = [m for m in layers if m["family"] in _WEIGHTED_FAMILIES]
    _add_relative(
        weighted, "param_grad_rms", "param_grad_ratio", "grad_reference_layer", first=False
    )
    for m in layers:
        if m["family"] not in _WEIGHTED_FAMILIES:
            m["param_grad_ratio"], m["grad_reference_layer"] = None, None


def _add_context(layers: list[dict]) -> None:
    for i, m in enumerate(layers):
        m["has_norm_before"] = i > 0 and layers[i - 1]["family"] == "norm"


def _add_zero_init(layers: list[dict], run: RunStats) -> None:
    """Mark the layers that start at zero by design, and what is zero because of them.

    Zeroing a branch's last layer makes the branch start as nothing, a block as the identity:
    LoRA's B, the last norm gain of a residual block (zero_init_residual), DiT's adaLN-Zero,
    the output projections and head of modded-nanogpt. Until the first update such a layer
    outputs a constant, and the layers whose gradient passes only through it get exactly 0:
    the depth rules would call that vanishing. A zero weight is taken as by design when other
    weight layers are random (zeroing every layer is the classic bug) and the layer that ran
    before it, standing in for its input, varies: two zeroed layers in a row can hold each
    other at zero. Gradients of exactly 0 are put down to such a layer, in any layer but
    itself: a gradient that vanishes with depth is small, not 0.
    """
    stats = run.layers
    random_weights = any(
        s.family in _WEIGHTED_FAMILIES
        and any(p.fan_in is not None and p.min != p.max for p in s.parameters)
        for s in stats
    )
    inputs = [run.input, *(s.activation for s in stats[:-1])]
    zeroed = [
        random_weights and _zero_weight(s) and _varies(before) for s, before in zip(stats, inputs)
    ]
    names = tuple(s.name for s, z in zip(stats, zeroed) if z)
    after_zeroed = False
    for i, (m, s) in enumerate(zip(layers, stats)):
        holds_one = any(name.startswith(f"{s.name}.") for name in names)
        m["zero_initialised"] = zeroed[i]
        # A dropout or activation that passes a zeroed output on is 0 for the same reason.
        m["zero_init_output"] = zeroed[i] or (
            (holds_one or after_zeroed) and _exactly_zero(s.activation)
        )
        after_zeroed = m["zero_init_output"]
        # The order of the forward does not tell which layers a gradient passes: a gate is
        # computed before the branch it multiplies (adaLN-Zero).
        m["zero_init_gradient"] = (
            s.param_grad is not None and s.param_grad.rms == 0 and len(names) > zeroed[i]
        )


def _zero_weight(layer: LayerStats) -> bool:
    weights = [p for p in layer.parameters if p.name in _OUTPUT_WEIGHTS]
    return bool(weights) and all(p.min == p.max == 0 and not p.nonfinite for p in weights)


def _varies(d: Distribution | None) -> bool:
    return d is not None and not d.nonfinite and max(d.unit_std, default=0.0) > 0


def _exactly_zero(d: Distribution | None) -> bool:
    return d is not None and not d.nonfinite and d.min == d.max == 0


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


def _model_metrics(run: RunStats, layers: list[dict], *, parameters: int, loss: str) -> dict:
    hidden = [m for m in layers if m["is_activation"] and not m["is_last"]]
    hidden = [m for m in hidden if m["kurtosis"] is not None]
    kurtosis = np.asarray([m["kurtosis"] for m in hidden], dtype=np.float64)
    return {
        "parameters": parameters,
        "samples": None if run.output is None else run.output.count // max(run.output.units, 1),
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
        "zero_initialised_layers": tuple(m["name"] for m in layers if m["zero_initialised"]),
        "last_layer": layers[-1]["name"] if layers else None,
        "output_zero_initialised": bool(layers) and layers[-1]["zero_init_output"],
    }


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
