"""The seed article's Iris network, trained exactly as the article does, then checked.

``modelcheck demo`` runs this: a 4-64-32-16-3 feed-forward network with ``F.relu``
between its layers, trained for 500 full-batch epochs with Adam (lr 1e-3) on MSE
against one-hot labels, on the standardised Iris features (80/20 split, random_state
42), and checked on the 30 test samples with that same loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelcheck.engine import check
from modelcheck.probe import probe_from_data
from modelcheck.report import Report


class IrisFFNN(nn.Module):
    """The seed article's network: its ReLUs are F.relu calls, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 16)
        self.fc4 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        return self.fc4(x)


@dataclasses.dataclass(frozen=True, slots=True)
class IrisSplit:
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor  # one-hot, as the article trains on
    y_test: torch.Tensor


def iris_split() -> IrisSplit:
    """Standardise, one-hot encode and split Iris as the seed article does."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    iris = datasets.load_iris()
    x = StandardScaler().fit_transform(iris.data)
    y = np.eye(3)[iris.target]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=42)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return IrisSplit(*(as_tensor(a) for a in (x_train, x_test, y_train, y_test)))


def train_seed_network(split: IrisSplit, *, epochs: int = 500, seed: int = 0) -> IrisFFNN:
    """Train as the article does; the global RNG and thread count are left as they were."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        # A 4-64-32-16-3 network is far too small to gain from threads; on a busy
        # machine they only wait for each other.
        torch.set_num_threads(1)
        try:
            torch.manual_seed(seed)
            model = IrisFFNN()
            optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
            criterion = nn.MSELoss()
            for _ in range(epochs):
                optimizer.zero_grad()
                loss = criterion(model(split.x_train), split.y_train)
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
    return model


def run_demo(**options: object) -> tuple[IrisFFNN, Report]:
    """Train the seed network and check it on the test split."""
    split = iris_split()
    model = train_seed_network(split)
    probe = probe_from_data((split.x_test, split.y_test))
    probe = dataclasses.replace(probe, source="iris test split (standardised)")
    options.setdefault("loss", "mse")
    return model, check(model, probe, **options)
