"""Small model factories for tests that pass ``--arch`` (spec ``tests.archs:<name>``).

Run from the repository root, ``tests.archs`` imports as a namespace package; the tests
themselves import this file as ``archs``.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """The seed's Iris network, shrunk: Linear-ReLU blocks down to the class scores."""

    def __init__(self, in_features: int = 4, hidden: int = 16, out_features: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def make_mlp() -> MLP:
    """The no-argument factory."""
    return MLP()


def make_mlp_sized(*, in_features: int = 4, hidden: int = 16, out_features: int = 3) -> MLP:
    """A factory that takes keyword arguments (--arch-kwargs)."""
    return MLP(in_features=in_features, hidden=hidden, out_features=out_features)


def make_failing() -> MLP:
    raise RuntimeError("this factory always fails")


def make_not_a_module() -> str:
    return "not a module"


NOT_CALLABLE = 42


def minilm_bert(path: str) -> nn.Module:
    """all-MiniLM-L6-v2's BertModel, built from the config shipped beside its weights."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(path))
