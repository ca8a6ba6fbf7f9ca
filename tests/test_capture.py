"""What the capture stage records, and that the model comes back exactly as it was given."""

from __future__ import annotations

import dataclasses
import random
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from models import DigitsCNN, RowLSTM, RowTransformer, gaussian, trained_seed_network
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modelcheck
from modelcheck import capture, kernel
from modelcheck.demo import IrisFFNN
from modelcheck.errors import ConfigError


def layer_names(report) -> list[str]:
    return [layer.name for layer in report.layers]


def test_seed_network_layers_are_seen_with_their_functional_relus():
    model, x, y = trained_seed_network()
    report = modelcheck.check(model, x, y, loss="mse")
    assert layer_names(report) == [
        "fc1", "fc1.relu", "fc2", "fc2.relu", "fc3", "fc3.relu", "fc4",
    ]  # fmt: skip
    assert report.layer("fc2.relu").type == "F.relu"
    assert report.layer("fc2.relu").family == "relu"


def test_a_loss_asked_for_without_labels_is_noted_as_not_used():
    model, x, y = trained_seed_network()

    def loss_notes(*args, **kwargs) -> list[str]:
        report = modelcheck.check(model, *args, **kwargs)
        return [n for n in report.probe.notes if n.startswith("loss ")]

    (note,) = loss_notes(x, loss="mse")
    assert note.startswith("loss 'mse' needs labels and the probe has none")
    assert loss_notes(x) == [] and loss_notes(x, y, loss="mse") == []
    assert loss_notes(x, loss="mse", gradients=False) == []


def test_seed_layer_two_is_exactly_relu_of_fc2_of_relu_of_fc1():
    model, x, _ = trained_seed_network()
    model = model.double()  # exact comparison in float64
    report = modelcheck.check(model, x.double())
    with torch.no_grad():
        expected = F.relu(model.fc2(F.relu(model.fc1(x.double())))).numpy().ravel()
    stats = report.layer("fc2.relu").activation
    assert stats.count == expected.size
    assert stats.mean == pytest.approx(expected.mean(), rel=1e-12)
    assert stats.std == pytest.approx(expected.std(), rel=1e-12)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(expected), rel=1e-9)
    assert stats.zero_fraction == pytest.approx(np.mean(expected == 0))
    assert stats.max == pytest.approx(expected.max(), rel=1e-12)


class _Wrapped(nn.Module):
    """A model with a forward of its own around a Sequential: the function mode watches it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_relu_modules_are_recorded_once_not_again_through_the_function_mode():
    model = _Wrapped(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    report = modelcheck.check(model, gaussian(features=4))
    assert layer_names(report) == ["inner.0", "inner.1", "inner.2"]
    assert report.layer("inner.1").family == "relu"


class _ModeSeen(nn.Module):
    """A leaf that notes how many torch function modes are active in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[int] = []

    def forward(self, x):
        self.modes.append(torch._C._len_torch_function_stack())
        return torch.tanh(x)


class _SequentialWithForward(nn.Sequential):
    def forward(self, x):
        return F.relu(super().forward(x))


@pytest.mark.parametrize(
    ("container", "watched", "layers"),
    [
        (nn.Sequential, False, ["0", "1"]),
        (_SequentialWithForward, True, ["0", "1", "1.relu"]),
    ],
)
def test_the_function_mode_watches_only_models_that_may_call_functions_between_leaves(
    container, watched, layers
):
    seen = _ModeSeen()
    model = container(nn.Linear(4, 4), seen)
    report = modelcheck.check(model, gaussian(features=4))
    assert set(seen.modes) == {1 if watched else 0}
    assert layer_names(report) == layers


def test_a_sequential_model_has_the_statistics_it_has_under_the_function_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())
    x = gaussian(features=4)
    plain, watched = modelcheck.check(model, x), modelcheck.check(_Wrapped(model), x)
    for name in layer_names(plain):
        ours, theirs = plain.layer(name), watched.layer(f"inner.{name}")
        assert ours.activation == theirs.activation
        assert ours.output_grad == theirs.output_grad


def test_activation_applied_to_an_unrecorded_tensor_is_named_after_its_scope():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(x + self.fc(x)) + torch.tanh(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Residual()

        def forward(self, x):
            return self.block(x)

    report = modelcheck.check(Net(), gaussian(features=4))
    # the block's own output, a sum no layer produced, is recorded at block level
    assert layer_names(report) == ["block.fc", "block.tanh", "block.tanh_1", "block"]
    assert report.layer("block").family == "block"
    assert report.layer("block.tanh").activation.saturated_fraction is not None


def test_in_place_relu_sees_the_values_after_the_layer_before_it():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True), nn.Linear(16, 2))
    x = gaussian(features=4).double()
    model = model.double()
    report = modelcheck.check(model, x)
    with torch.no_grad():
        pre = model[0](x)
    assert report.layer("0").activation.min == pytest.approx(float(pre.min()))
    assert report.layer("1").activation.min == 0.0


def _statistics(report) -> list[dict]:
    return [dataclasses.asdict(layer) for layer in report.layers]


@pytest.mark.parametrize("held_at_most", [64 << 20, 3 * 16 * 32 * 4])
def test_outputs_summarised_after_the_forward_give_the_statistics_of_summarising_at_once(
    monkeypatch, held_at_most
):
    # Small CPU outputs wait for the end of each forward; when their total outgrows the
    # cap (here after three 16x32 float32 outputs), the rest are summarised at once.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
        nn.Sigmoid(), nn.Linear(32, 3),
    )  # fmt: skip
    x = gaussian(n=160, features=8)
    monkeypatch.setattr(capture, "_DEFER_TOTAL_BYTES", held_at_most)
    held = modelcheck.check(model, x, batch_size=16)
    monkeypatch.setattr(capture, "_DEFER_BYTES", 0)
    at_once = modelcheck.check(model, x, batch_size=16)
    np.testing.assert_equal(_statistics(held), _statistics(at_once))


def test_an_output_a_later_layer_changes_in_place_is_summarised_before_the_change():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 24), nn.BatchNorm1d(24), nn.ReLU(inplace=True), nn.Linear(24, 2)
    ).double()
    x = gaussian(n=128, features=6).double()
    report = modelcheck.check(model, x, batch_size=16)
    with torch.no_grad():
        normed = model.eval()[1](model[0](x)).numpy()
    norm = report.layer("1").activation
    assert norm.min == pytest.approx(normed.min()) and norm.min < 0
    assert norm.mean == pytest.approx(normed.mean(), abs=1e-12)
    assert not [note for note in report.probe.notes if "in place" in note]


class _ClampsFromTheSecondBatch(nn.Module):
    """Changes its input in place from its second call on: the first batch cannot show it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            x.clamp_(min=0)
        return x * 2


def test_an_in_place_change_the_first_batch_did_not_show_is_named_in_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _ClampsFromTheSecondBatch(), nn.Linear(8, 2))
    x = gaussian(n=96, features=4)
    report = modelcheck.check(model, x, batch_size=16, gradients=False)
    notes = [note for note in report.probe.notes if "changed in place" in note]
    assert len(notes) == 1 and notes[0].startswith("0: ")
    # Only the second batch was seen changed; from the third on the layer is summarised
    # as it returned its output.
    with torch.no_grad():
        out = model[0](x)
    out[16:32].clamp_(min=0)
    assert report.layer("0").activation.min == pytest.approx(float(out.min()))
    assert report.layer("0").activation.mean == pytest.approx(float(out.mean()), abs=1e-6)


def test_outputs_made_under_inference_mode_are_summarised_too():
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return torch.relu(self.fc(x))

    model = nn.Sequential(Frozen(), nn.Linear(8, 2))
    x = gaussian(n=64, features=4)
    report = modelcheck.check(model, x, batch_size=16, gradients=False)
    with torch.no_grad():
        expected = model[0].fc(x)
    assert report.layer("0.fc").activation.count == 64 * 8
    assert report.layer("0.fc").activation.mean == pytest.approx(float(expected.mean()), abs=1e-6)


def test_a_module_called_twice_is_recorded_once_with_both_calls_merged():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.shared(x))

    x = gaussian(n=32, features=4)
    report = modelcheck.check(Twice(), x, batch_size=32)
    shared = report.layer("shared")
    assert shared.calls == 2
    assert shared.activation.count == 2 * 32 * 4


def test_output_and_parameter_gradients_match_autograd():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = gaussian(n=20, features=3).double()
    y = torch.randint(0, 2, (20,))
    report = modelcheck.check(model, x, y, batch_size=20, loss="cross_entropy")
    hidden = model[0](x)
    hidden.retain_grad()
    loss = F.cross_entropy(model[2](torch.tanh(hidden)), y)
    grads = torch.autograd.grad(loss, [hidden, model[0].weight, model[0].bias])
    out_grad = report.layer("0").output_grad
    assert out_grad.rms == pytest.approx(float(grads[0].pow(2).mean().sqrt()), rel=1e-9)
    params = torch.cat([grads[1].ravel(), grads[2].ravel()])
    assert report.layer("0").param_grad.rms == pytest.approx(
        float(params.pow(2).mean().sqrt()), rel=1e-9
    )
    assert report.probe.loss == "cross_entropy"


def test_whole_float_labels_are_class_indices_to_the_automatic_loss():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = gaussian(n=20, features=3).double()
    y = torch.randint(0, 2, (20,))
    as_floats = modelcheck.check(model, x, y.double())  # labels read from a float array
    as_indices = modelcheck.check(model, x, y, loss="cross_entropy")
    assert as_floats.probe.loss == "cross_entropy"
    assert as_floats.layer("0").output_grad == as_indices.layer("0").output_grad
    with pytest.raises(modelcheck.ProbeError, match="cannot choose a loss"):
        modelcheck.check(model, x, y.double() + 0.5)  # not indices: no loss fits


def test_without_labels_a_seeded_surrogate_loss_drives_the_backward_pass():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    first = modelcheck.check(model, gaussian(features=3), seed=3)
    again = modelcheck.check(model, gaussian(features=3), seed=3)
    other = modelcheck.check(model, gaussian(features=3), seed=4)
    assert first.probe.loss == "surrogate"
    assert first.layer("0").output_grad.rms == again.layer("0").output_grad.rms
    assert first.layer("0").output_grad.rms != other.layer("0").output_grad.rms


@pytest.mark.parametrize("caller", [torch.no_grad, torch.inference_mode], ids=lambda c: c.__name__)
def test_a_check_called_with_autograd_off_still_takes_its_gradients(caller):
    model, x = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), gaussian(features=3)
    expected = modelcheck.check(model, x)
    with caller():
        report = modelcheck.check(model, x)
    assert report.layer("0").output_grad == expected.layer("0").output_grad
    assert report.layer("2").param_grad == expected.layer("2").param_grad
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_forward_only_mode_records_no_gradients():
    report = modelcheck.check(IrisFFNN(), gaussian(features=4), gradients=False)
    assert all(layer.output_grad is None and layer.param_grad is None for layer in report.layers)
    assert report.probe.loss == "none (forward only)"


# -- nothing waits for the device until the end ------------------------------------------------

aten = torch.ops.aten
_WAITS_FOR_THE_DEVICE = {
    aten._local_scalar_dense.default,  # item(), float(), bool() of a tensor
    aten.is_nonzero.default,
    aten.equal.default,
    # Shapes that depend on the values: the host must read them before going on.
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
_HOST_COPIES = ("cpu", "tolist", "numpy", "item")


class _HostReads(TorchDispatchMode):
    """Records every operation that would make the host wait for a GPU; the host copies
    of a CPU tensor reach no dispatcher, so those methods are watched as well."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = 0
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        if func in _WAITS_FOR_THE_DEVICE:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def watching(self, name: str):
        method = getattr(torch.Tensor, name)

        def watched(tensor, *args, **kwargs):
            self.reads.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)

        return watched


def _reads_while_running(monkeypatch, model, x, **options) -> _HostReads:
    """The host reads made inside ``capture.run`` (hooks, statistics, backward) during
    a check on PyTorch's operations: the path GPUs take."""
    monkeypatch.setattr(kernel, "LIBRARY", None)
    watch, run = _HostReads(), capture.run

    def watched_run(*args, **kwargs):
        with pytest.MonkeyPatch.context() as patch, watch:
            for name in _HOST_COPIES:
                patch.setattr(torch.Tensor, name, watch.watching(name))
            return run(*args, **kwargs)

    monkeypatch.setattr(capture, "run", watched_run)
    modelcheck.check(model, x, **options)
    return watch


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))
        h = torch.tanh(h + self.conv(x))  # a residual sum, a functional activation
        return self.head(h.flatten(1))


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, still checked
@pytest.mark.parametrize("form", ["module", "traced", "exported"])
def test_batches_make_the_host_wait_for_nothing(monkeypatch, form):
    """Issue 6: a GPU check reads its summaries back once, at the end. Ten batches with
    gradients: the slots fold, and the conv's samples are folded in, during the run.
    Traced and exported models go through capture_graph's recorder instead of hooks."""
    torch.manual_seed(0)
    x, y = torch.randn(160, 3, 16, 16), torch.randint(0, 5, (160,))
    model = _Residual().eval()
    if form == "traced":
        model = torch.jit.trace(model, x[:16])
    elif form == "exported":
        model = torch.export.export(model, (x[:16],))

    watch = _reads_while_running(monkeypatch, model, (x, y), batch_size=16)

    assert watch.operations > 1000  # the mode saw the run
    assert watch.reads == []


class _ReadsItsOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        self.last = float(out.detach().mean())
        self.copy = out.detach().cpu()
        return out


def test_a_host_read_inside_the_run_is_seen(monkeypatch):
    """The watch above can fail: a model's own reads, once per batch, are all seen."""
    watch = _reads_while_running(
        monkeypatch, _ReadsItsOutput(), gaussian(features=4), batch_size=64
    )

    assert watch.reads.count(str(aten._local_scalar_dense.default)) == 4  # one per batch
    assert set(watch.reads) == {str(aten._local_scalar_dense.default), "Tensor.cpu"}


# -- the model comes back as it was given ------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key  # bitwise
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(grad, after["grads"][name]), name
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.bad = nn.Linear(5, 2)  # expects 5 features, gets 4

    def forward(self, x):
        return self.bad(self.bn(self.fc(x)))


def with_user_state(model: nn.Module) -> nn.Module:
    """Pre-existing .grad on some parameters, a frozen one, a user hook, train mode."""
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)
    params[-1].requires_grad_(False)
    model.register_forward_hook(lambda m, i, o: None)
    model.train()
    return model


MODEL_KINDS = {
    "mlp-with-dropout": (
        lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)),
        (64,),
    ),
    "cnn-with-batchnorm": (DigitsCNN, (1, 8, 8)),
    "lstm": (RowLSTM, (1, 8, 8)),
    "transformer": (RowTransformer, (1, 8, 8)),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_and_rng_state_are_unchanged_after_a_check(kind, train_mode):
    build, shape = MODEL_KINDS[kind]
    model = with_user_state(build())
    x = torch.randn(48, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
    random.random(), np.random.rand()
    before = snapshot(model)
    report = modelcheck.check(model, x, y, train_mode=train_mode, batch_size=16)
    assert report.layers
    assert_unchanged(before, snapshot(model))


def test_model_is_unchanged_when_its_forward_raises():
    model = with_user_state(Raises())
    before = snapshot(model)
    with pytest.raises(modelcheck.CaptureError, match=r"layer bad \[Linear\(in_features=5"):
        modelcheck.check(model, gaussian(features=4), train_mode=True)
    assert_unchanged(before, snapshot(model))


def test_forward_failure_names_the_layer_and_the_shapes():
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(IrisFFNN(), gaussian(features=5))
    message = str(caught.value)
    assert "layer fc1" in message and "(64, 5)" in message and "in_features=4" in message
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_failure_shows_the_error_raised_inside_it():
    # TorchScript puts its tracebacks first and the error itself last.
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(scripted, gaussian(features=5))
    message = str(caught.value)
    assert message.endswith(
        "raised RuntimeError: mat1 and mat2 shapes cannot be multiplied (64x5 and 4x8)"
    )
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_call_error_names_the_forward_the_user_wrote():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    inputs = {"a": torch.randn(8, 4), "b": torch.randn(8, 4)}  # keyword inputs it lacks
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(scripted, inputs)
    message = str(caught.value)
    assert "forward() expected at most 2 argument(s) but received 3" in message
    assert "modelcheck" not in message


class _Argmax(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        classes = self.fc(x).argmax(1)
        return {"classes": classes} if self.as_dict else classes


def test_an_integer_output_says_what_to_return_instead():
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(_Argmax(as_dict=False), gaussian(features=4))
    assert str(caught.value) == (
        "the model's output holds int64 values, not floating-point ones; "
        "return the scores they come from (logits, not their argmax)"
    )
    with pytest.raises(modelcheck.CaptureError, match="returned no floating-point tensor"):
        modelcheck.check(_Argmax(as_dict=True), gaussian(features=4))


class _Spectrum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(self.fc(x))


def test_a_complex_output_is_told_to_return_real_values():
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(_Spectrum(), gaussian(features=4))
    message = str(caught.value)
    assert "holds complex64 values" in message and ".abs()" in message
    assert "argmax" not in message


def _dynamically_quantized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, not gone
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@pytest.mark.filterwarnings("error")
def test_layers_behind_an_operator_with_no_backward_are_noted_without_gradients():
    # quantized::linear_dynamic has no backward: the outputs of '0' and '1' get None.
    report = modelcheck.check(_dynamically_quantized(), gaussian())
    assert report.layer("0").output_grad is None and report.layer("1").output_grad is None
    assert report.layer("2").output_grad is not None
    assert report.layer("1").activation.count == 256 * 16
    (note,) = [n for n in report.probe.notes if "no gradient" in n]
    assert note.startswith("no gradient reached the outputs of '0', '1': ")


def _fresh_batch_norm_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3)
    )


def _fresh_norm_notes(report) -> list[str]:
    return [n for n in report.probe.notes if "never saw a batch" in n]


def test_batch_norms_that_never_saw_a_batch_are_noted_in_eval_mode():
    # In eval mode they normalise with mean 0 and variance 1: a fresh model's check then
    # describes activations no training step sees (a fresh U-Net got two errors from it).
    model, images = _fresh_batch_norm_net(), torch.randn(16, 3, 8, 8)
    (note,) = _fresh_norm_notes(modelcheck.check(model, images))
    assert note.startswith("1 batch norm layer ('1') never saw a batch: in eval mode")
    assert "--train-mode" in note
    assert _fresh_norm_notes(modelcheck.check(model, images, train_mode=True)) == []


def test_batch_norms_with_statistics_of_data_are_not_noted():
    model, images = _fresh_batch_norm_net(), torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        model.train()(images * 3 + 1)  # one training-mode forward updates the statistics
    assert _fresh_norm_notes(modelcheck.check(model.eval(), images)) == []


def test_a_lazy_module_that_never_ran_is_refused_with_what_to_do():
    # Its weights have no shape yet: the check stopped on 'uninitialized parameter' from
    # inside PyTorch, and running it to find out would have changed the model.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LazyLinear(3))
    with pytest.raises(ConfigError, match=r"'2' \(LazyLinear\) is not initialised yet") as raised:
        modelcheck.check(model, gaussian())
    assert "run the model once on a batch" in str(raised.value)
    model(gaussian(n=2))  # its first call gives it its shapes
    assert modelcheck.check(model, gaussian()).layer("2").parameters


def test_a_quantized_model_counts_the_weights_it_packs():
    # A quantized Linear's weight() and bias() are methods: parameters() saw none of them.
    report = modelcheck.check(_dynamically_quantized(), gaussian())
    assert report.model.parameters == (8 * 16 + 16) + (16 * 3 + 3)
    assert report.model.trainable_parameters == 0


@pytest.mark.filterwarnings("ignore:`torch.jit")  # torch.compile imports deprecated modules
def test_a_compiled_model_is_checked_through_its_original_module():
    model, x, y = trained_seed_network()
    compiled = torch.compile(model)  # compiles on its first call, which never comes
    report = modelcheck.check(compiled, x, y, loss="mse")
    eager = modelcheck.check(model, x, y, loss="mse")
    assert layer_names(report) == layer_names(eager)
    assert report.layer("fc2.relu").activation == eager.layer("fc2.relu").activation
    assert report.model.type == "IrisFFNN"
    assert report.probe.notes[0].startswith("torch.compile'd model: its original module")
    assert compiled._orig_mod is model


@pytest.mark.filterwarnings("ignore:`torch.jit")  # torch.compile imports deprecated modules
def test_a_data_parallel_model_is_checked_under_its_own_layer_names():
    model, x, y = trained_seed_network()
    report = modelcheck.check(nn.DataParallel(torch.compile(model)), x, y, loss="mse")
    eager = modelcheck.check(model, x, y, loss="mse")
    assert layer_names(report) == layer_names(eager)  # 'fc1', not 'module.fc1'
    assert report.layer("fc3.relu").activation == eager.layer("fc3.relu").activation
    assert [n.split(":")[0] for n in report.probe.notes[:2]] == [
        "DataParallel wrapper",
        "torch.compile'd model",
    ]


@pytest.mark.parametrize("train_mode", [False, True])
def test_parametrized_weights_are_their_layers_parameters_not_layers(train_mode):
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(8, 32)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(32, 32)),  # its power iteration moves buffers
        nn.ReLU(),
        nn.Linear(32, 3),
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = modelcheck.check(model, gaussian(n=128), train_mode=train_mode)
    assert layer_names(report) == ["0", "1", "2", "3", "4"]  # no parametrization "layers"
    weight = report.layer("0").parameters[-1]
    assert (weight.name, weight.shape) == ("weight", (32, 8))  # the weight it computes with
    assert weight.std == pytest.approx(float(model[0].weight.detach().double().std(correction=0)))
    per_batch = 32 + 32 * 1 + 32 * 8  # bias, then weight_norm's magnitude and direction
    assert report.layer("0").param_grad.count == 2 * per_batch
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_old_weight_norm_is_judged_on_the_weight_it_computes():
    torch.manual_seed(0)
    with warnings.catch_warnings():  # deprecated for the parametrization, still in use
        warnings.simplefilter("ignore")
        normed = nn.utils.weight_norm(nn.Linear(8, 32))
    model = nn.Sequential(normed, nn.ReLU(), nn.Linear(32, 3))
    report = modelcheck.check(model, gaussian(n=128))
    assert [p.name for p in report.layer("0").parameters] == ["bias", "weight"]
    assert [f.rule for f in report.findings] == []  # weight_g, a (32, 1) magnitude, is no weight
    assert report.layer("0").param_grad.count == 2 * (32 + 32 + 32 * 8)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2 and its kin): a Linear that stores its weight (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(
            *x.shape[:-1], self.nf
        )


def test_a_weight_stored_inputs_first_has_its_fan_in_on_dim_0():
    # GPT-2's MLP: c_fc (64 -> 256) and c_proj (256 -> 64), weights (64, 256) and (256, 64),
    # at std 0.02. As a Linear's, c_proj's fan-in was read as 64 and c_fc's as 256: the
    # warning fell on c_proj (x0.16) instead of c_fc (x0.11 of He's gain before a GELU).
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(256, 64), nn.GELU(), Conv1D(64, 256))
    report = modelcheck.check(model, torch.randn(8, 16, 64))
    fan_ins = [report.layer(name).parameters[0].fan_in for name in ("0", "2")]
    assert fan_ins == [64, 256]
    assert {report.layer(name).family for name in ("0", "2")} == {"linear"}
    assert report.layer("0").activation.units == 256  # features last, not a channel axis
    init = [(f.layer, f.severity) for f in report.findings if f.rule == "poor-initialization"]
    assert init == [("0", "warning")]


@pytest.mark.parametrize(("kernel", "stride"), [(4, 2), (3, 1), (2, 2)])
def test_a_transposed_convolutions_fan_in_counts_the_inputs_one_output_takes(kernel, stride):
    # torch.nn.init reads (in, out / groups, *kernel) as fan-in out * kernel: a DCGAN's last
    # layer, 32 -> 3 channels at std 0.02, was x0.14 of its gain on 48 "inputs"; each output
    # takes 32 channels x 16 / 4 positions, 128.
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 3, kernel, stride=stride, padding=kernel // 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        taken = layer(torch.ones(1, 8, 16, 16))[0, 0, 8, 8]  # an interior output
    report = modelcheck.check(nn.Sequential(layer, nn.Tanh()), torch.randn(4, 8, 16, 16))
    assert report.layer("0").parameters[0].fan_in == int(taken)


def test_a_dcgan_generators_last_layer_is_judged_on_its_real_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1, bias=False), nn.Tanh())
    nn.init.normal_(model[0].weight, 0.0, 0.02)
    report = modelcheck.check(model, torch.randn(16, 32, 8, 8))
    assert report.layer("0").parameters[0].fan_in == 128
    assert [f.rule for f in report.findings] == []


def test_multihead_attention_computes_with_its_output_projection():
    # out_proj's weight goes into a functional call and out_proj itself never runs: its
    # weight was judged by no rule, and its gradient went to no layer.
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with torch.no_grad():
        model.self_attn.out_proj.weight.mul_(100.0)
    report = modelcheck.check(model, torch.randn(8, 5, 16))
    attention = report.layer("self_attn")
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert [p.name for p in attention.parameters] == names
    assert attention.param_grad.count == sum(p.numel() for p in model.self_attn.parameters())
    assert "out_proj" not in layer_names(report)
    [finding] = [f for f in report.findings if f.rule == "poor-initialization"]
    assert (finding.layer, finding.severity) == ("self_attn", "error")
    assert "'self_attn.out_proj.weight'" in finding.message


@pytest.mark.parametrize(("low", "high"), [(0, 499), (-5, 49)], ids=["beyond", "negative"])
def test_ids_an_embedding_has_no_row_for_are_named_with_its_size(low, high):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(40, 3))
    ids = torch.randint(low, high, (64, 5))
    ids[0, :2] = torch.tensor([low, high])
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(model, ids)
    assert str(caught.value).endswith(
        f"index out of range in self (the ids run from {low} to {high}; its table has rows 0 to 99)"
    )


def test_float_ids_for_an_embedding_are_told_to_be_saved_as_integers():
    # A CSV probe is read as floats: PyTorch names only the dtypes it expected.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(40, 3))
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(model, torch.randint(0, 100, (64, 5)).float())
    assert str(caught.value).endswith(
        "(save the ids as integers in a .npy or .pt file: a CSV is read as floats)"
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_integer_images_for_a_float_layer_are_told_to_be_saved_as_floats(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    images = torch.randint(0, 2 if dtype == torch.bool else 256, (16, 3, 8, 8)).to(dtype)
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(model, images)
    name = str(dtype).removeprefix("torch.")
    assert str(caught.value).endswith(
        f"(it was given {name} values: save the probe as floating point, scaled as the model "
        "saw it in training)"
    )


def test_batchnorm_running_statistics_do_not_move_in_train_mode():
    model = DigitsCNN()
    mean_before = model.features[1].running_mean.clone()
    modelcheck.check(model, torch.randn(32, 1, 8, 8) * 3 + 2, train_mode=True)
    assert torch.equal(model.features[1].running_mean, mean_before)
    assert model.features[1].num_batches_tracked.item() == 0
