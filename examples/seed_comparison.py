"""What the seed article's histograms show, next to what the network really computes.

The article's ``get_activations`` builds ``nn.Sequential(*children[:i+1])``. The
network's ReLUs are ``F.relu`` calls in ``forward``, not children, so that Sequential
is a stack of Linear layers with no activation between them: its "layer 3" is
``fc3(fc2(fc1(x)))``. modelcheck records the real hidden activations,
``relu(fc3(relu(fc2(relu(fc1(x))))))``. Run: ``python examples/seed_comparison.py``.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch
from torch import nn

import modelcheck
from modelcheck.demo import iris_split, train_seed_network


def seed_get_activations(model: nn.Module, layer_indices, input_data):
    """The article's function, verbatim in behaviour."""
    activations = []
    for index in layer_indices:
        activation_model = nn.Sequential(*(list(model.children())[: index + 1]))
        activations.append(activation_model(input_data))
    return activations


def describe(values: np.ndarray) -> str:
    return (
        f"zero {np.mean(values == 0):6.1%}  min {values.min():7.2f}  max {values.max():6.2f}  "
        f"excess kurtosis {scipy.stats.kurtosis(values):6.2f}"
    )


def main() -> None:
    split = iris_split()
    model = train_seed_network(split)
    with torch.no_grad():
        seed = seed_get_activations(model, [0, 1, 2], split.x_test)
    report = modelcheck.check(model, (split.x_test, split.y_test), loss="mse")
    print("The seed article's 'activations' (Linear layers composed without ReLU):")
    for i, act in enumerate(seed, start=1):
        print(f"  layer {i}: {describe(act.numpy().ravel())}")
    print("What the network computes (recorded by modelcheck, after each F.relu):")
    for i, name in enumerate(["fc1.relu", "fc2.relu", "fc3.relu"], start=1):
        d = report.layer(name).activation
        print(
            f"  layer {i}: zero {d.zero_fraction:6.1%}  min {d.min:7.2f}  max {d.max:6.2f}  "
            f"excess kurtosis {d.kurtosis:6.2f}  dead units {d.dead_fraction:.0%}"
        )


if __name__ == "__main__":
    main()
