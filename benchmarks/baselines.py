"""What a check is measured against: the floor, and the two naive ways of doing its job.

- ``plain``: one forward (and backward) pass per probe batch with nothing attached; the
  backward starts from the same surrogate loss modelcheck uses without labels.
- ``seed_prefix``: the seed article's method, one forward pass of the network's prefix per
  recorded layer (``nn.Sequential(*children[:i+1])`` generalised to any model by stopping
  the forward at the layer), then numpy histograms and scipy moments of what came out.
- ``capture_only``: modelcheck's own forward (and backward) pass, hooks and all, with an
  observer that keeps nothing: what a check costs before it computes any statistic.
- ``collect_all``: keep every activation and output gradient on the host, then compute
  what a modelcheck report holds with numpy/scipy at the end: the layer's moments,
  extremes, zero fraction, histogram and quantiles, per-unit means, spreads and activity,
  output-gradient rms; parameter gradients (each as large as its weight, every batch) are
  reduced to their rms and mean magnitude with numpy as they come.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.stats
import torch
from torch import nn

from modelcheck import capture
from modelcheck.capture import first_tensor, recorded_modules
from modelcheck.probe import Batch


def _direction(output: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(output.shape[1:], generator=gen, dtype=output.dtype)


def plain(model: nn.Module, batches: list[torch.Tensor], gradients: bool = True) -> None:
    """Forward (and backward through every trainable parameter) over the batches."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    direction = None
    for x in batches:
        if not gradients:
            with torch.no_grad():
                model(x)
            continue
        out = model(x)
        direction = _direction(out) if direction is None else direction
        loss = (out * direction).sum() / out.shape[0]
        torch.autograd.grad(loss, params)


def _numpy_stats(values: np.ndarray) -> dict[str, float]:
    flat = values.astype(np.float64, copy=False).ravel()
    counts, _ = np.histogram(flat, bins=50)
    return {
        "mean": flat.mean(),
        "std": flat.std(),
        "min": flat.min(),
        "max": flat.max(),
        "skewness": scipy.stats.skew(flat),
        "kurtosis": scipy.stats.kurtosis(flat),
        "zero_fraction": np.mean(flat == 0),
        "peak_bin": int(counts.argmax()),
    }


def _per_unit_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-unit mean, spread and activity, units on axis 1 of images, last otherwise."""
    axis = 1 if values.ndim in (4, 5) else values.ndim - 1
    units = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis]).astype(np.float64)
    return {
        "unit_mean": units.mean(axis=0),
        "unit_std": units.std(axis=0),
        "unit_active": (units > 0).mean(axis=0),
        "quantiles": np.quantile(units, np.linspace(0, 1, 101)),
    }


def _gradient_rms(chunks: list[np.ndarray]) -> float:
    flat = np.concatenate([c.reshape(-1) for c in chunks]).astype(np.float64)
    return float(np.sqrt(np.mean(flat**2)))


class _Ignore(capture.Observer):
    """An observer of ``capture.run`` that keeps nothing: the protocol's empty methods."""


def capture_only(model: nn.Module, batches: list[torch.Tensor], gradients: bool = True) -> None:
    """A check's passes over the batches, hooks included, with no statistics taken."""
    capture.run(model, [Batch(x, None) for x in batches], _Ignore(), gradients=gradients)


class _Stop(Exception):
    """Raised by a hook to end the forward at the layer being read (the prefix)."""


def seed_prefix(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per layer: run the forward up to that layer on every batch, then numpy/scipy."""
    model.eval()
    results = []
    for _, module in recorded_modules(model):
        outputs: list[np.ndarray] = []

        def grab(_module, _args, output, outputs=outputs):
            outputs.append(first_tensor(output).detach().numpy().copy())
            raise _Stop

        handle = module.register_forward_hook(grab)
        try:
            with torch.no_grad():
                for x in batches:
                    with contextlib.suppress(_Stop):
                        model(x)
        finally:
            handle.remove()
        if outputs:  # a module whose forward the model never calls has no output
            results.append(_numpy_stats(np.concatenate(outputs)))
    return results


def collect_all(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, object]]:
    """Keep every activation and gradient of every batch, then numpy/scipy."""
    model.eval()
    activations: dict[str, list[np.ndarray]] = {}
    gradients: dict[str, list[np.ndarray]] = {}

    def keep(name):
        def hook(_module, _args, output):
            output = first_tensor(output)
            activations.setdefault(name, []).append(output.detach().numpy().copy())
            if output.requires_grad:
                output.register_hook(
                    lambda g: gradients.setdefault(name, []).append(g.numpy().copy())
                )

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in recorded_modules(model)]
    params = [p for p in model.parameters() if p.requires_grad]
    param_sums = np.zeros((len(params), 3))  # sum of squares, sum of magnitudes, count
    try:
        direction = None
        for x in batches:
            out = model(x)
            direction = _direction(out) if direction is None else direction
            grads = torch.autograd.grad((out * direction).sum() / out.shape[0], params)
            for sums, g in zip(param_sums, grads):
                flat = g.numpy().astype(np.float64).ravel()
                sums += (np.dot(flat, flat), np.abs(flat).sum(), flat.size)
    finally:
        for handle in handles:
            handle.remove()
    results: list[dict[str, object]] = []
    for name, chunks in activations.items():
        values = np.concatenate(chunks)
        stats: dict[str, object] = {**_numpy_stats(values), **_per_unit_stats(values)}
        if name in gradients:
            stats["output_grad_rms"] = _gradient_rms(gradients[name])
        results.append(stats)
    sumsq, sumabs, count = param_sums.T
    results.append(
        {"param_grad_rms": np.sqrt(sumsq / count), "param_grad_mean_abs": sumabs / count}
    )
    return results
