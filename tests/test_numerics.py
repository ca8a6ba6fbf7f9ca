"""Numbers at the edges: magnitudes from 1e-30 to 1e30, constant layers, one sample, and
half-precision models. Every statistic is compared with numpy in float64 on the very
values the layer produced; none may turn into a false NaN, infinity or zero."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import modelcheck


@pytest.fixture(autouse=True)
def _global_rng_left_alone():
    """Models built here draw from torch's global generator; later tests must not notice."""
    with torch.random.fork_rng():
        yield


def scaled_mlp(scale: float, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Linear-Tanh-Linear whose last layer's weights (and so outputs) are ``scale`` large."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model.to(dtype)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each leaf's output on ``x``, as float64 numpy arrays."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.double().numpy()))
        for n, m in model.named_children()
    ]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return seen


def assert_matches_numpy(report, reference: dict[str, np.ndarray], rel: float = 1e-9):
    for name, values in reference.items():
        d = report.layer(name).activation
        assert d.nonfinite == 0, name
        assert d.mean == pytest.approx(values.mean(), rel=rel, abs=0), name
        assert d.std == pytest.approx(values.std(), rel=rel, abs=0), name
        assert d.rms == pytest.approx(np.sqrt((values**2).mean()), rel=rel, abs=0), name
        assert (d.min, d.max) == (values.min(), values.max()), name
        unit_std = values.reshape(-1, values.shape[-1]).std(axis=0)
        np.testing.assert_allclose(d.unit_std, unit_std, rtol=rel, atol=0, err_msg=name)


@pytest.mark.parametrize("scale", [1e30, 1e20, 1e-20, 1e-30], ids=lambda s: f"{s:g}")
def test_extreme_activations_are_summarised_exactly_and_raise_no_false_nonfinite(scale):
    model = scaled_mlp(scale)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=16)
    assert_matches_numpy(report, outputs(model, x), rel=1e-6)
    assert not [f for f in report.findings if f.rule == "nonfinite"]
    json.loads(report.to_json())  # every number JSON can hold


def test_an_extreme_inner_layer_calls_for_float64_squares_on_its_own():
    # Only the first layer is 1e20 large: the Tanh after it brings the output back to ±1,
    # so neither the input's nor the output's summary shows that float32 squares overflow.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        model[0].weight.mul_(1e20)
        model[0].bias.mul_(1e20)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=16)
    assert_matches_numpy(report, outputs(model, x), rel=1e-6)
    assert report.layer("0").parameters[0].std == pytest.approx(
        model[0].weight.detach().double().std(unbiased=False).item(), rel=1e-6
    )


@pytest.mark.parametrize("scale", [1e30, 1e-30], ids=lambda s: f"{s:g}")
def test_extreme_gradients_keep_their_magnitude(scale):
    """Parameter gradients of 1e30 square to 1e60: float32 squares would say inf, and
    those of 1e-30 square to 1e-60, which float32 rounds to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 5))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * scale
    report = modelcheck.check(model, x, batch_size=16, select=["nonfinite"])
    direction = torch.randn(5, generator=torch.Generator().manual_seed(0))
    loss = (model(x) * direction).sum() / 16  # the surrogate loss of a probe without labels
    flat = torch.autograd.grad(loss, model[0].weight)[0].reshape(-1).double().numpy()
    expected = np.sqrt((flat**2).mean())
    assert report.layer("0").param_grad.rms == pytest.approx(expected, rel=1e-6, abs=0)
    assert report.findings == ()


class _TinyGradients(nn.Module):
    """Passes its input on unchanged and scales the gradient flowing back by 1e-30."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-30 + (x - x * 1e-30).detach()


def test_gradients_below_float32_squares_under_normal_activations_keep_their_magnitude():
    """Every activation and weight is ordinary; only the gradients reaching the first layer
    are ~1e-31, whose float32 squares are 0. Their mean magnitude shows it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), _TinyGradients(), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=16, select=["nonfinite"])
    direction = torch.randn(5, generator=torch.Generator().manual_seed(0))
    first = model[0](x)
    loss = (model[1:](first) * direction).sum() / 16  # the surrogate loss of a probe without labels
    at_output, weight, bias = torch.autograd.grad(loss, [first, *model[0].parameters()])
    params = torch.cat([weight.reshape(-1), bias]).double().numpy()
    assert report.layer("0").param_grad.rms == pytest.approx(
        np.sqrt((params**2).mean()), rel=1e-6, abs=0
    )
    outputs = at_output.double().numpy()
    assert report.layer("0").output_grad.rms == pytest.approx(
        np.sqrt((outputs**2).mean()), rel=1e-6, abs=0
    )


def test_constant_layer_has_std_zero_and_undefined_shape_not_nan():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(0.3)  # every output of layer 0 is 0.3
    report = modelcheck.check(model, torch.randn(30, 4), select=["collapsed-output"])
    constant = report.layer("0").activation
    assert constant.std == 0.0 and constant.unit_std == (0.0,) * 6
    assert constant.skewness is None and constant.kurtosis is None
    stats = json.loads(report.to_json())["layers"][0]["stats"]
    assert (stats["std"], stats["skewness"], stats["kurtosis"]) == (0.0, None, None)
    assert [f.rule for f in report.findings] == ["collapsed-output"]  # a finding, no crash


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("value", [3e38, -1e17])
def test_a_constant_layer_of_huge_values_gets_a_histogram_and_a_report(value):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(value)  # lo ± 0.5 is lo itself: numpy's histogram gives up here
    report = modelcheck.check(model, torch.randn(30, 4))
    histogram = report.layer("0").activation.histogram
    edges = np.asarray(histogram.edges)
    assert np.all(np.diff(edges) > 0) and edges[0] < np.float32(value) < edges[-1]
    assert sum(histogram.counts) == 30 * 6
    assert "<svg" in report.to_html()


@pytest.mark.filterwarnings("error")
def test_infinite_outputs_are_reported_without_numpy_warnings():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].bias[:3] = float("inf")
        model[0].bias[3:] = -float("inf")
    report = modelcheck.check(model, torch.randn(30, 4))
    assert report.layer("0").activation.nonfinite == 30 * 6
    assert math.isnan(report.layer("0").activation.std)
    assert "nonfinite" in {f.rule for f in report.findings}
    report.to_html()


def test_single_sample_probe_runs_and_claims_no_spread_across_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    report = modelcheck.check(model, torch.randn(1, 4) * 0.5)
    assert report.probe.samples == 1
    assert "unscaled-input" not in {f.rule for f in report.findings}  # no std from one row
    assert "collapsed-output" not in {f.rule for f in report.findings}
    assert report.layer("0").activation.unit_std == (0.0,) * 8  # exactly, not rounding noise
    json.loads(report.to_json())


class _WithEmptyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.empty = nn.Linear(4, 0)  # e.g. a head configured with no classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.empty(x).sum()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_a_layer_with_empty_outputs_is_listed_without_statistics():
    torch.manual_seed(0)
    report = modelcheck.check(_WithEmptyBranch(), torch.randn(30, 4))
    assert report.layer("empty").activation is None
    assert report.layer("body").activation.count == 30 * 6
    assert not [f for f in report.findings if f.severity == "error"]
    json.loads(report.to_json())


def test_single_sample_batchnorm_in_train_mode_is_one_line_naming_the_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(model, torch.randn(1, 4), train_mode=True)
    message = str(caught.value)
    assert "layer 1 [BatchNorm1d" in message and "\n" not in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_are_summarised_in_float64(dtype):
    model = scaled_mlp(300.0, dtype)  # float16 squares of 300 would overflow (max 65504)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    report = modelcheck.check(model, x, batch_size=8)
    assert report.model.dtype == str(dtype).removeprefix("torch.")
    assert_matches_numpy(report, outputs(model, x), rel=1e-9)
    assert all(math.isfinite(layer.param_grad.rms) for layer in report.layers if layer.param_grad)
    assert not [f for f in report.findings if f.rule == "nonfinite"]


def test_bfloat16_model_with_values_beyond_float32_squares_is_exact():
    model = scaled_mlp(1e30, torch.bfloat16)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    report = modelcheck.check(model, x, batch_size=8)
    assert_matches_numpy(report, outputs(model, x), rel=1e-6)
