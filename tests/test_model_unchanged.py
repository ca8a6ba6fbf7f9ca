"""The model is left alone: a property test over generated models and ways a check can end.

Hypothesis builds small MLP, CNN, RNN and attention stacks with BatchNorm, Dropout,
in-place ReLU, frozen layers, pre-existing ``.grad``, user hooks of every kind and buffers
a forward rebinds, gives the module tree mixed train/eval flags, and sometimes plants a
failure half-way through the check (a layer that raises after some batches, a backward
that raises, running out of memory, Ctrl-C). Whatever the outcome, everything the user
owns must come back bit for bit: state_dict, ``.grad``, requires_grad, training flags,
hooks, the probe tensors, the torch/numpy/python RNG states and torch's global modes
(including the attention fast path, which the check turns off while it runs).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as module_globals

import modelcheck
from modelcheck.errors import CaptureError

# -- planted failures ----------------------------------------------------------------------------


class FailsAfter(nn.Module):
    """Passes its input through ``calls`` times, then fails the way ``how`` says."""

    def __init__(self, calls: int, how: str) -> None:
        super().__init__()
        self.calls, self.how = calls, how
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1  # a buffer the forward changes in place
        if self.seen > self.calls:
            if self.how == "raise":
                raise ValueError("planted failure")
            if self.how == "interrupt":
                raise KeyboardInterrupt
            if self.how == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        if self.how == "backward":
            return _RaisesOnBackward.apply(x)
        return x


class _RaisesOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("planted failure in backward")


class OutOfMemoryAbove(nn.Module):
    """Runs out of memory on batches of more than ``rows`` samples."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return x


class Counts(nn.Module):
    """Rebinds its buffer on every call instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return x


class LastStep(nn.Module):
    """A sequence (or an RNN's (sequence, state) tuple) reduced to its last step."""

    def forward(self, out: torch.Tensor | tuple[torch.Tensor, object]) -> torch.Tensor:
        return (out if isinstance(out, torch.Tensor) else out[0])[:, -1]


# -- generated models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kind: str  # mlp | cnn | rnn | attention
    cell: str  # RNN | LSTM | GRU, for kind rnn
    widths: tuple[int, ...]
    activation: str
    batchnorm: bool
    dropout: float
    inplace_first: bool
    counter: bool
    classes: int
    failure: tuple[str, int] | None  # (how, after how many calls)
    oom_above: int | None


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu-inplace": lambda: nn.ReLU(inplace=True),
    "leaky-inplace": lambda: nn.LeakyReLU(0.1, inplace=True),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "gelu": lambda: nn.GELU(),
}


def build(spec: Spec) -> tuple[nn.Module, tuple[int, ...]]:
    """The model a spec describes, and the shape of one input sample."""
    layers: list[nn.Module] = []
    if spec.inplace_first:
        layers.append(nn.ReLU(inplace=True))  # writes into the probe unless it is copied
    if spec.kind == "mlp":
        shape = (spec.widths[0],)
        for a, b in zip(spec.widths, spec.widths[1:]):
            layers += [nn.Linear(a, b)]
            layers += [nn.BatchNorm1d(b)] if spec.batchnorm else []
            layers += [ACTIVATIONS[spec.activation]()]
            layers += [nn.Dropout(spec.dropout)] if spec.dropout else []
        last = spec.widths[-1]
    elif spec.kind == "cnn":
        shape = (spec.widths[0], 4, 4)
        for a, b in zip(spec.widths, spec.widths[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1)]
            layers += [nn.BatchNorm2d(b)] if spec.batchnorm else []
            layers += [ACTIVATIONS[spec.activation]()]
            layers += [nn.Dropout2d(spec.dropout)] if spec.dropout else []
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        last = spec.widths[-1]
    elif spec.kind == "attention":  # the fused fast path is switched off for the check
        width = 2 * spec.widths[0]
        shape = (3, width)
        layers += [
            nn.TransformerEncoderLayer(width, 2, width, spec.dropout, batch_first=True),
            LastStep(),
        ]
        last = width
    else:
        shape = (3, spec.widths[0])
        cell = getattr(nn, spec.cell)
        depth = len(spec.widths) - 1
        layers += [cell(spec.widths[0], spec.widths[1], depth, batch_first=True,
                        dropout=spec.dropout if depth > 1 else 0.0), LastStep()]  # fmt: skip
        last = spec.widths[1]
    if spec.counter:
        layers.append(Counts())
    if spec.failure:  # after every hidden layer: half-way through the check's passes
        layers.append(FailsAfter(spec.failure[1], spec.failure[0]))
    if spec.oom_above is not None:
        layers.insert(0, OutOfMemoryAbove(spec.oom_above))
    layers.append(nn.Linear(last, spec.classes))
    return nn.Sequential(*layers), shape


specs = st.builds(
    Spec,
    kind=st.sampled_from(["mlp", "cnn", "rnn", "attention"]),
    cell=st.sampled_from(["RNN", "LSTM", "GRU"]),
    widths=st.lists(st.integers(2, 5), min_size=2, max_size=4).map(tuple),
    activation=st.sampled_from(list(ACTIVATIONS)),
    batchnorm=st.booleans(),
    dropout=st.sampled_from([0.0, 0.0, 0.5]),
    inplace_first=st.booleans(),
    counter=st.booleans(),
    classes=st.integers(1, 4),
    failure=st.none()
    | st.tuples(st.sampled_from(["raise", "backward", "oom", "interrupt"]), st.integers(0, 2)),
    oom_above=st.none() | st.integers(1, 3),
)


@dataclass(frozen=True)
class UserState:
    """What the user did to the model before handing it over."""

    frozen: tuple[bool, ...]  # per parameter, cycled
    grads: tuple[bool, ...]  # per parameter, cycled: a .grad left from training
    training: tuple[bool, ...]  # per module, cycled
    hooks: int  # user hooks on modules and parameters, spread over the tree


user_states = st.builds(
    UserState,
    frozen=st.lists(st.booleans(), min_size=1, max_size=4).map(tuple),
    grads=st.lists(st.booleans(), min_size=1, max_size=4).map(tuple),
    training=st.lists(st.booleans(), min_size=1, max_size=3).map(tuple),
    hooks=st.integers(0, 6),
)


def _cycle(flags: tuple[bool, ...], i: int) -> bool:
    return flags[i % len(flags)]


def apply_user_state(model: nn.Module, user: UserState, calls: list) -> None:
    for i, p in enumerate(model.parameters()):
        if _cycle(user.grads, i):
            p.grad = torch.randn_like(p)
        p.requires_grad_(not _cycle(user.frozen, i))
    for i, m in enumerate(model.modules()):
        m.training = _cycle(user.training, i)
    modules, params = list(model.modules()), list(model.parameters())
    kinds = ["forward", "pre", "backward", "tensor"]
    for i in range(user.hooks):
        kind, target = kinds[i % 4], modules[i % len(modules)]
        if kind == "forward":
            target.register_forward_hook(lambda m, a, o: calls.append("forward"))
        elif kind == "pre":
            target.register_forward_pre_hook(lambda m, a: calls.append("pre"))
        elif kind == "backward":  # on the output layer: torch forbids in-place ops after one
            model[-1].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
        elif kind == "tensor" and params and params[i % len(params)].requires_grad:
            params[i % len(params)].register_hook(lambda g: calls.append("tensor") or None)


# -- what must come back -------------------------------------------------------------------------

_MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)  # fmt: skip
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
)  # fmt: skip


def _hooks(owner: object, names: tuple[str, ...]) -> dict[str, list]:
    return {n: list(getattr(owner, n).items()) for n in names if hasattr(owner, n)}


def snapshot(model: nn.Module, probe: tuple[torch.Tensor, ...]) -> dict:
    return {
        "state": {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()},
        "parameters": {n: id(p) for n, p in model.named_parameters()},
        "buffers": {n: id(b) for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "module_hooks": {n: _hooks(m, _MODULE_HOOK_DICTS) for n, m in model.named_modules()},
        "tensor_hooks": {
            n: list((p._backward_hooks or {}).items()) for n, p in model.named_parameters()
        },
        "global_hooks": _hooks(module_globals, _GLOBAL_HOOK_DICTS),
        "probe": [t.clone() for t in probe],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "modes": (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.get_default_dtype(),
            torch._C._len_torch_function_stack(),
            torch._C._len_torch_dispatch_stack(),
            torch.backends.mha.get_fastpath_enabled(),
        ),
        "sys_path": list(sys.path),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, (dtype, value) in before["state"].items():
        assert after["state"][key][0] == dtype, key
        assert torch.equal(after["state"][key][1], value), key  # bitwise, BN stats included
    for key in ("parameters", "buffers", "requires_grad", "training", "module_hooks",
                "tensor_hooks", "global_hooks", "python_rng", "modes", "sys_path"):  # fmt: skip
        assert after[key] == before[key], key
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(after["grads"][name], grad), name
    for a, b in zip(before["probe"], after["probe"]):
        assert torch.equal(a, b), "the probe tensors were written into"
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    np_before, np_after = before["numpy_rng"], after["numpy_rng"]
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]


# -- the property ----------------------------------------------------------------------------------


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    spec=specs,
    user=user_states,
    samples=st.integers(1, 9),
    batch_size=st.integers(1, 6),
    labels=st.booleans(),
    train_mode=st.booleans(),
    gradients=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_check_leaves_the_model_and_the_process_as_they_were(
    spec, user, samples, batch_size, labels, train_mode, gradients, seed
):
    outer = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        check_one_example(spec, user, samples, batch_size, labels, train_mode, gradients, seed)
    finally:  # the seeds set below must not leak into the tests that run after this one
        torch.set_rng_state(outer[0])
        np.random.set_state(outer[1])
        random.setstate(outer[2])


def check_one_example(spec, user, samples, batch_size, labels, train_mode, gradients, seed):
    rng = random.Random(seed)  # all randomness of the setup comes from the example
    torch.manual_seed(rng.randrange(2**31))
    random.seed(rng.randrange(2**31))
    model, shape = build(spec)
    calls: list[str] = []
    apply_user_state(model, user, calls)
    x = torch.randn(samples, *shape)
    probe = (x, torch.randint(0, spec.classes, (samples,))) if labels else (x,)
    np.random.seed(rng.randrange(2**31))
    random.seed(rng.randrange(2**31))
    before = snapshot(model, probe)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a busy machine
    try:
        modelcheck.check(
            model,
            probe[0],
            probe[1] if labels else None,
            batch_size=batch_size,
            train_mode=train_mode,
            gradients=gradients,
            loss="cross_entropy" if labels and spec.classes > 1 else "auto",
            select=["nonfinite", "dead-units", "collapsed-output"],
        )
        outcome = "passed"
    except (CaptureError, modelcheck.ProbeError) as error:
        outcome = str(error)
    except KeyboardInterrupt:
        outcome = "interrupted"
    finally:
        torch.set_num_threads(threads)

    assert_same(before, snapshot(model, probe))
    # Without a planted failure the check must run through (so that the property is not
    # only ever tested on early failures); BatchNorm in train mode cannot take 1 sample.
    one_sample_batchnorm = spec.batchnorm and train_mode and "1 value per channel" in outcome
    assert outcome == "passed" or spec.failure or one_sample_batchnorm, outcome


def test_the_property_covers_every_failure_and_every_kind_of_model():
    """Guard on the generator: each failure mode and model kind is reachable by the spec."""
    model, shape = build(
        Spec("rnn", "LSTM", (3, 4, 2), "tanh", False, 0.5, True, True, 3, ("backward", 1), 2)
    )
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FailsAfter", "OutOfMemoryAbove", "Counts", "LastStep"} <= kinds
    assert any(isinstance(m, nn.RNNBase) for m in model.modules())
    x = torch.randn(5, *shape)
    before = snapshot(model, (x,))
    with pytest.raises(CaptureError, match="planted failure in backward"):
        modelcheck.check(model, x, batch_size=2, select=["nonfinite"])
    assert_same(before, snapshot(model, (x,)))
