"""Models the tests check: healthy ones, trained briefly, and ones built to have a fault."""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelcheck.demo import IrisFFNN, iris_split, train_seed_network


def seeded(seed: int):
    """Build a model under a fixed seed without disturbing the caller's RNG."""

    def wrap(build):
        @functools.wraps(build)
        def inner(*args, **kwargs):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return build(*args, **kwargs)

        return inner

    return wrap


# -- data ----------------------------------------------------------------------------------


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits, standardised per pixel, as (N, 1, 8, 8) images and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.from_numpy(x).reshape(-1, 1, 8, 8), torch.from_numpy(data.target)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr=1e-2) -> nn.Module:
    """A few epochs of Adam on cross-entropy, mini-batches of 128, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(128):
                optimizer.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
        model.eval()
        for p in model.parameters():
            p.grad = None
    finally:
        torch.set_num_threads(threads)
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# -- healthy models --------------------------------------------------------------------------


@functools.cache
def trained_seed_network() -> tuple[IrisFFNN, torch.Tensor, torch.Tensor]:
    split = iris_split()
    return train_seed_network(split), split.x_test, split.y_test


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class RowLSTM(nn.Module):
    """Reads a digit row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(-1, 8, 8))
        return self.head(out[:, -1])


class RowTransformer(nn.Module):
    """A small TransformerEncoder over the rows of a digit."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(-1, 8, 8))).mean(1))


@functools.cache
@seeded(0)
def trained_digits_cnn() -> DigitsCNN:
    x, y = digits()
    return fit(DigitsCNN(), x, y, epochs=3)


@functools.cache
@seeded(0)
def trained_lstm() -> RowLSTM:
    x, y = digits()
    return fit(RowLSTM(), x, y, epochs=4)


@functools.cache
@seeded(0)
def trained_transformer() -> RowTransformer:
    x, y = digits()
    return fit(RowTransformer(), x, y, epochs=3, lr=3e-3)


# -- faulty models ---------------------------------------------------------------------------


def mlp(widths: list[int], activation: type[nn.Module] = nn.ReLU, last_activation=False):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


@seeded(1)
def dead_relu_model(dead_share: float = 0.75) -> nn.Sequential:
    """Layer 2's ReLU has most units pushed far negative by their bias."""
    model = mlp([8, 32, 32, 4])
    with torch.no_grad():
        model[2].bias[: int(32 * dead_share)] = -100.0
    return model


@seeded(2)
def saturated_tanh_model() -> nn.Sequential:
    """The tanh after layer 1 sees pre-activations ~500x too large."""
    model = mlp([8, 32, 16, 4], activation=nn.Tanh)
    with torch.no_grad():
        model[0].weight.mul_(500.0)
    return model


@seeded(3)
def scaled_chain(scale: float, depth: int = 8, width: int = 32) -> nn.Sequential:
    """Linear layers whose weights are ``scale`` times a variance-preserving init."""
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(depth)))
    with torch.no_grad():
        for layer in model:
            nn.init.normal_(layer.weight, std=scale / width**0.5)
    return model


class SparsifyingNet(nn.Module):
    """ReLU layers with ever more negative biases: activations sparser and heavier-tailed
    with depth, so excess kurtosis rises steadily."""

    def __init__(self, width: int = 64, depth: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        # Its own generator: the trend's strength must not depend on which tests ran before.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                q, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
                layer.weight.copy_(q * (1.0 + i))  # keeps scale as units drop out
                layer.bias.fill_(-0.6 * i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


@seeded(4)
def sigmoid_stack(depth: int = 10) -> nn.Sequential:
    """A deep sigmoid MLP: each layer scales gradients by at most 1/4."""
    return mlp([16] * (depth + 1) + [4], activation=nn.Sigmoid)


class ScaleInvariantStack(nn.Module):
    """Linear+LayerNorm blocks with tiny weights: LayerNorm undoes the forward scale,
    and the backward pass divides by it, so early weights get huge gradients."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        blocks = []
        for _ in range(depth):
            linear = nn.Linear(width, width)
            with torch.no_grad():
                linear.weight.mul_(1e-4)
                linear.bias.zero_()
            blocks += [linear, nn.LayerNorm(width, eps=1e-12)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


@seeded(5)
def nan_in_second_layer() -> nn.Sequential:
    model = mlp([8, 16, 16, 4])
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    return model


@seeded(6)
def badly_initialised(scale: float = 20.0) -> nn.Sequential:
    model = mlp([8, 64, 64, 4])
    with torch.no_grad():
        model[2].weight.mul_(scale)
    return model


@seeded(7)
def symmetric_model() -> nn.Sequential:
    model = mlp([8, 16, 16, 4])
    with torch.no_grad():
        model[2].weight.fill_(0.05)
    return model


@seeded(8)
def constant_output_model() -> nn.Sequential:
    """Its hidden layer is dead, so the output is the last layer's bias whatever the input."""
    model = mlp([8, 16, 4])
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    return model


@seeded(9)
def majority_class_model() -> nn.Sequential:
    """Outputs vary with the input, but class 0's bias always wins."""
    model = mlp([8, 16, 4])
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    return model


def gaussian(n: int = 256, features: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


# -- zero-initialised layers, by design and by mistake -------------------------------------


class LoRALinear(nn.Module):
    """A Linear with a low-rank adapter whose B starts at zero, as in LoRA and PEFT."""

    def __init__(self, width: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.lora_A = nn.Linear(width, rank, bias=False)
        self.lora_B = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class ZeroGainBlock(nn.Module):
    """A residual block whose last BatchNorm gain starts at zero (torchvision's
    zero_init_residual): the block starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class AdaLNZeroBlock(nn.Module):
    """DiT's adaLN-Zero: a zeroed Linear computes shift, scale and a gate for the MLP branch,
    before the branch runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.modulation = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(x).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class ZeroProjectionGPT(nn.Module):
    """A GPT whose attention and MLP output projections and head start at zero, as in
    modded-nanogpt: every block starts as the identity and the logits as 0."""

    def __init__(self, vocab: int = 50, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, vocab)
        for block in self.blocks:
            for projection in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(projection.weight)
                nn.init.zeros_(projection.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class LayerScaleBlock(nn.Module):
    """A ConvNeXt block: its branch is scaled by a learnt gamma that starts at 1e-6."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ReZeroBlock(nn.Module):
    """ReZero: the branch is multiplied by a learnt scalar that starts at 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.branch(x)


@seeded(11)
def lora_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.ReLU(),
        LoRALinear(32),
        nn.ReLU(),
        LoRALinear(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@seeded(12)
def zero_gain_resnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        ZeroGainBlock(16),
        ZeroGainBlock(16),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


@seeded(13)
def adaln_zero_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), AdaLNZeroBlock(32), AdaLNZeroBlock(32), nn.Linear(32, 4))


@seeded(17)
def layer_scale_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 2, stride=2),
        LayerScaleBlock(16),
        LayerScaleBlock(16),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


@seeded(18)
def rezero_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), ReZeroBlock(32), ReZeroBlock(32), nn.Linear(32, 4))


@seeded(14)
def zero_projection_gpt() -> ZeroProjectionGPT:
    return ZeroProjectionGPT()


@seeded(15)
def all_zero_model() -> nn.Sequential:
    """Every parameter zeroed, the classic mistake: nothing but the last bias ever learns."""
    model = mlp([8, 32, 32, 4])
    for p in model.parameters():
        nn.init.zeros_(p)
    return model


@seeded(16)
def zero_pair_model() -> nn.Sequential:
    """Two zeroed Linears in a row in a random MLP: each holds the other at zero."""
    model = nn.Sequential(
        nn.Linear(8, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    for layer in (model[2], model[3]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


class SelfAttention(nn.Module):
    """Multi-head self-attention with its query, key and value projections as separate
    Linears, under the names a library gives them (BERT's query/key/value by default)."""

    def __init__(self, width: int, names: tuple[str, str, str], heads: int = 4) -> None:
        super().__init__()
        self.names, self.heads = names, heads
        for name in names:
            self.add_module(name, nn.Linear(width, width))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            getattr(self, name)(x).view(b, t, self.heads, -1).transpose(1, 2) for name in self.names
        )
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class EncoderBlock(nn.Module):
    """A post-norm transformer block, as in BERT."""

    def __init__(self, width: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.attention = SelfAttention(width, names)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn(x))


class BertInitEncoder(nn.Module):
    """A small BERT over sequences of feature vectors, initialised as BERT is (normal weights
    of std 0.02, zero biases), classifying from its first position."""

    def __init__(
        self, names: tuple[str, str, str], features: int = 8, width: int = 64, blocks: int = 2
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, width), nn.LayerNorm(width))
        self.blocks = nn.Sequential(*(EncoderBlock(width, names) for _ in range(blocks)))
        self.head = nn.Linear(width, 3)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x))[:, 0])


@seeded(19)
def bert_init_encoder(
    names: tuple[str, str, str] = ("query", "key", "value"), blocks: int = 2
) -> BertInitEncoder:
    return BertInitEncoder(names, blocks=blocks)


@seeded(23)
def sigmoid_block_stack(blocks: int = 8, width: int = 16) -> nn.Sequential:
    """Blocks of Linear and Sigmoid under one name each (``blocks.N.fc``), then a head:
    gradients shrink about ×4 at every block."""
    stack = nn.Sequential(
        *(
            nn.Sequential(OrderedDict(fc=nn.Linear(width, width), act=nn.Sigmoid()))
            for _ in range(blocks)
        )
    )
    return nn.Sequential(OrderedDict(blocks=stack, head=nn.Linear(width, 3)))


@seeded(22)
def t5_init_encoder() -> BertInitEncoder:
    """The encoder at width 256 (heads of 64) initialised as T5 is: every weight at LeCun's
    std, but the query at 1 / sqrt(width × head size), the scores' scaling folded into it."""
    model = BertInitEncoder(("q", "k", "v"), width=256)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_in = module.in_features * (64 if name.endswith(".q") else 1)
            nn.init.normal_(module.weight, std=fan_in**-0.5)
    return model


@seeded(20)
def sigmoid_fronted_encoder() -> nn.Sequential:
    """The encoder behind a deep sigmoid stack: gradients vanish before they reach it."""
    return nn.Sequential(
        mlp([8] * 11, activation=nn.Sigmoid, last_activation=True), bert_init_encoder()
    )


def sequences(
    n: int = 64, length: int = 16, features: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random feature sequences and three-way labels."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, length, features, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class NanoGPTBlock(nn.Module):
    """A pre-norm GPT block as nanoGPT writes it: each residual branch ends in a c_proj."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict(
            {
                "c_attn": nn.Linear(width, 3 * width),
                "c_proj": nn.Linear(width, width),
                "resid_dropout": nn.Dropout(0.0),
            }
        )
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.mlp.add_module("dropout", nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            part.view(b, t, self.heads, -1).transpose(1, 2)
            for part in self.attn["c_attn"](self.ln_1(x)).split(w, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.attn["c_proj"](y.transpose(1, 2).reshape(b, t, w))
        x = x + self.attn["resid_dropout"](y)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's initialisation: normal weights of std 0.02, and each residual branch's
    c_proj at 0.02 / sqrt(``branches`` × blocks), GPT-2's scaling with depth (branches 2)."""

    def __init__(
        self, branches: int = 2, depth: int = 4, width: int = 256, vocab: int = 64
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(16, width)
        self.h = nn.ModuleList(NanoGPTBlock(width) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = 0.02 / (branches * depth) ** 0.5 if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@seeded(21)
def nano_gpt(branches: int = 2) -> NanoGPT:
    return NanoGPT(branches)
