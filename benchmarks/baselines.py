"""What a check is measured against: the floor, and the two naive ways of doing its job.

- ``plain``: one forward (and backward) pass per probe batch with nothing attached; the
  backward starts from the same surrogate loss modelcheck uses without labels.
- ``seed_prefix``: the seed article's method, one forward pass of the network's prefix per
  recorded layer (``nn.Sequential(*children[:i+1])`` generalised to any model by stopping
  the forward at the layer), then numpy histograms and scipy moments of what came out.
- ``collect_all``: keep every activation and output gradient on the host, then compute
  the statistics with numpy/scipy at the end.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.stats
import torch
from torch import nn

from modelcheck.capture import first_tensor, recorded_modules


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


def collect_all(model: nn.Module, batches: list[torch.Tensor]) -> list[dict[str, float]]:
    """Keep every activation and output gradient of every batch, then numpy/scipy."""
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
    try:
        direction = None
        for x in batches:
            out = model(x)
            direction = _direction(out) if direction is None else direction
            torch.autograd.grad((out * direction).sum() / out.shape[0], params)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for name, chunks in activations.items():
        stats = _numpy_stats(np.concatenate([c.reshape(-1) for c in chunks]))
        grads = gradients.get(name)
        if grads:
            flat = np.concatenate([g.reshape(-1) for g in grads]).astype(np.float64)
            stats["grad_rms"] = float(np.sqrt(np.mean(flat**2)))
        results.append(stats)
    return results
