"""The benchmark models of issue 6, built here so the benchmark needs nothing but torch.

Each builder returns (model, inputs) under a fixed seed: the seed article's Iris network,
a 20-layer MLP of width 1024, a ResNet-18-shaped CNN and a 6-layer TransformerEncoder.
"""

from __future__ import annotations

import torch
from torch import nn

from modelcheck.demo import IrisFFNN


def _seeded_inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def iris() -> tuple[nn.Module, torch.Tensor]:
    """The seed's 4-64-32-16-3 network (F.relu in forward) on Iris' 150 samples."""
    from sklearn.datasets import load_iris
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(0)
    x = StandardScaler().fit_transform(load_iris().data)
    return IrisFFNN(), torch.tensor(x, dtype=torch.float32)


def mlp(depth: int = 20, width: int = 1024, samples: int = 8192) -> tuple[nn.Module, torch.Tensor]:
    """``depth`` Linear+ReLU blocks of ``width`` features (He init), then a 10-way head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers += [linear, nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers), _seeded_inputs((samples, width))


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18's layout (He et al. 2016): a 7x7 stem, four stages of two blocks, a head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inputs = [], 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1))
            )
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(samples: int = 256, size: int = 64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ResNet18(), _seeded_inputs((samples, 3, size, size))


def transformer(
    layers: int = 6, d_model: int = 512, heads: int = 8, sequence: int = 128, samples: int = 64
) -> tuple[nn.Module, torch.Tensor]:
    """A 6-layer TransformerEncoder (batch first) over seeded token embeddings."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return model, _seeded_inputs((samples, sequence, d_model))
