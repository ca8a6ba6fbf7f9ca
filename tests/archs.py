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


# -- one small model per architecture, for the formats x architectures table ---------------


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.pool = nn.AvgPool1d(4)
        self.head = nn.Linear(8 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class CNN3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.block1 = Block(16)
        self.block2 = Block(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class Recurrent(nn.Module):
    def __init__(self, kind: str = "LSTM") -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(6, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make_lstm() -> Recurrent:
    return Recurrent("LSTM")


def make_gru() -> Recurrent:
    return Recurrent("GRU")


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(self.norm(x + out).mean(1))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.RMSNorm(16)
        self.fc = nn.Linear(16, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.norm(self.embed(ids)))).mean(1))
