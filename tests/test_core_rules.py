"""Each core rule fires on a model built to have its fault, at the right layer and
severity, and stays quiet (no errors) on healthy trained models."""

from __future__ import annotations

import pytest
import torch
from models import (
    LoRALinear,
    ScaleInvariantStack,
    SparsifyingNet,
    adaln_zero_model,
    all_zero_model,
    badly_initialised,
    constant_output_model,
    dead_relu_model,
    digits,
    gaussian,
    layer_scale_convnet,
    lora_model,
    majority_class_model,
    mlp,
    nan_in_second_layer,
    rezero_model,
    saturated_tanh_model,
    scaled_chain,
    sigmoid_stack,
    symmetric_model,
    trained_digits_cnn,
    trained_lstm,
    trained_seed_network,
    trained_transformer,
    zero_gain_resnet,
    zero_pair_model,
    zero_projection_gpt,
)
from torch import nn

import modelcheck
from modelcheck.probe import probe_from_spec
from modelcheck.renderers import finding_line, format_number


def findings_of(report, rule: str):
    return [f for f in report.findings if f.rule == rule]


def only(report, rule: str):
    found = findings_of(report, rule)
    assert len(found) == 1, [f"{f.layer} {f.rule} {f.severity}" for f in report.findings]
    return found[0]


def test_dead_units_fire_at_the_relu_whose_units_died():
    report = modelcheck.check(dead_relu_model(0.75), gaussian())
    finding = only(report, "dead-units")
    assert (finding.layer, finding.severity, finding.code) == ("3", "error", "MC101")
    assert finding.value == pytest.approx(0.75)
    assert finding.threshold == 0.5
    assert "24 of 32 units" in finding.message
    assert any("He" in fix for fix in finding.fixes)


def test_dead_units_between_thresholds_are_a_warning():
    report = modelcheck.check(dead_relu_model(0.375), gaussian())
    assert only(report, "dead-units").severity == "warning"


def test_saturated_tanh_units_fire_at_the_tanh():
    report = modelcheck.check(saturated_tanh_model(), gaussian())
    finding = only(report, "saturation")
    assert (finding.layer, finding.severity) == ("1", "error")
    assert finding.value > 0.5


def test_exploding_activations_report_once_at_the_first_layer_that_crosses():
    report = modelcheck.check(scaled_chain(4.0), gaussian(features=32))
    finding = only(report, "exploding-activations")
    rms = [layer.activation.rms / report.layers[0].activation.rms for layer in report.layers]
    first = next(i for i, r in enumerate(rms) if r > 100)
    assert finding.layer == str(first)
    assert finding.severity == "error"
    assert finding.deeper == sum(r > 100 for r in rms) - 1 > 0
    assert finding.value == pytest.approx(max(rms))


def test_vanishing_activations_report_once_at_the_first_layer_that_crosses():
    report = modelcheck.check(scaled_chain(0.25), gaussian(features=32))
    finding = only(report, "vanishing-activations")
    rms = [layer.activation.rms / report.layers[0].activation.rms for layer in report.layers]
    assert finding.layer == str(next(i for i, r in enumerate(rms) if r < 0.01))
    assert finding.severity == "error"


def test_kurtosis_growth_is_information_at_the_deepest_hidden_layer():
    report = modelcheck.check(SparsifyingNet(), gaussian(features=64))
    finding = only(report, "kurtosis-growth")
    assert finding.severity == "info"
    assert finding.layer == "layers.3.relu"  # the last relu feeds the output: not hidden
    line = finding_line(finding)
    assert f"info  {format_number(finding.value)} — excess kurtosis rises" in line, line


def test_kurtosis_growth_beyond_fifty_is_a_warning():
    report = modelcheck.check(
        SparsifyingNet(), gaussian(features=64), rules={"kurtosis-growth": {"warning": 10}}
    )
    assert only(report, "kurtosis-growth").severity == "warning"


def test_vanishing_gradients_in_a_deep_sigmoid_stack_fire_at_the_first_layer():
    report = modelcheck.check(sigmoid_stack(), gaussian(features=16))
    finding = only(report, "vanishing-gradients")
    assert (finding.layer, finding.severity) == ("0", "error")
    assert finding.value < 1e-3


def test_in_train_mode_the_surrogate_gradient_survives_a_norm_before_pooling():
    # MobileNet's linear bottleneck: a batch norm, then global pooling, then the head. With
    # one surrogate direction for every sample, the norm's backward (batch mean taken out)
    # cancelled the gradient: the first convolution got ~1e-10 of the head's, an error.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    report = modelcheck.check(model, images(), train_mode=True)
    ratio = report.layer("0").param_grad.rms / report.layer("7").param_grad.rms
    assert ratio > 1e-2
    assert findings_of(report, "vanishing-gradients") == []


def test_exploding_gradients_fire_where_scale_invariant_weights_are_tiny():
    report = modelcheck.check(ScaleInvariantStack(), gaussian(features=32))
    finding = only(report, "exploding-gradients")
    assert (finding.layer, finding.severity) == ("blocks.0", "error")


def test_nonfinite_parameter_is_reported_where_nan_first_appears():
    report = modelcheck.check(nan_in_second_layer(), gaussian())
    finding = only(report, "nonfinite")
    assert (finding.layer, finding.severity) == ("2", "error")
    assert "1 parameter values" in finding.message
    assert report.layer("2").activation.nonfinite == 256 * 16 // 16  # one row of weights


def test_nan_in_the_probe_is_a_finding_without_a_layer():
    x = gaussian()
    x[5, 3] = float("nan")
    report = modelcheck.check(mlp([8, 16, 4]), x)
    finding = only(report, "nonfinite")
    assert finding.layer is None and finding.value == 1
    assert findings_of(report, "collapsed-output") == []


@pytest.mark.parametrize("where", ["weight", "probe"])
def test_nan_everywhere_is_not_also_reported_as_dead_units(where):
    model, x = mlp([8, 16, 16, 4]), gaussian()
    with torch.no_grad():
        if where == "weight":
            model[0].weight[0, 0] = float("nan")  # unit 0 of '0', then every unit of '2'
        else:
            x[:, 0] = float("nan")  # every sample
    report = modelcheck.check(model, x)
    assert report.layer("3").activation.nonfinite > 0
    assert findings_of(report, "dead-units") == []
    assert len(findings_of(report, "nonfinite")) == 1


def test_nan_gradients_from_a_finite_forward_are_found_at_the_deepest_layer():
    class SqrtOfZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.sqrt(torch.relu(self.fc(x)) * 0))  # d sqrt(0) = inf

    report = modelcheck.check(SqrtOfZero(), gaussian())
    finding = only(report, "nonfinite")
    assert finding.severity == "error"
    assert "gradients turn NaN/Inf" in finding.message


def test_poorly_scaled_weights_warn_with_the_expected_gain():
    report = modelcheck.check(badly_initialised(20.0), gaussian())
    finding = only(report, "poor-initialization")
    assert (finding.layer, finding.severity) == ("2", "warning")
    assert "relu" in finding.message
    assert any("kaiming_normal_" in fix for fix in finding.fixes)


@pytest.mark.parametrize(
    ("scale", "expected"), [(0.1, []), (1e-3, [("1", "error")])], ids=["x0.1", "x0.001"]
)
def test_a_layer_right_before_a_norm_is_judged_beyond_x50_only(scale, expected):
    # The LayerNorm divides the Linear's scale out of the forward pass (ConvNeXt's depthwise
    # convolutions start at ×0.14 before theirs); ×1e-3, far enough for its epsilon to take
    # over, is still an error.
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    report = modelcheck.check(model, gaussian())
    assert [(f.layer, f.severity) for f in findings_of(report, "poor-initialization")] == expected


class _ConvThenNorm(nn.Module):
    """ConvNeXt's order: a convolution, its output permuted to channels-last, a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2)))


class _PreNormResidual(nn.Module):
    """A projection added to the residual stream, then the next sublayer's norm of the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.proj = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        return self.head(self.norm(x + self.proj(x)))


@pytest.mark.parametrize(
    ("build", "probe", "expected"),
    [(_ConvThenNorm, lambda: images(), []), (_PreNormResidual, gaussian, [("proj", "warning")])],
    ids=["norm-of-a-view-of-its-output", "norm-of-a-sum-it-joins"],
)
def test_only_a_norm_of_the_layers_own_output_divides_its_scale_out(build, probe, expected):
    # Both layers run right before a LayerNorm at ×0.1 their init; only the first one's
    # output is what the norm takes in (a permuted view of it). The second's is added to the
    # stream first, so the norm does not undo its scale: that went unflagged before.
    torch.manual_seed(0)
    model = build()
    layer = model.conv if isinstance(model, _ConvThenNorm) else model.proj
    with torch.no_grad():
        layer.weight.mul_(0.1)
    report = modelcheck.check(model, probe())
    assert [(f.layer, f.severity) for f in findings_of(report, "poor-initialization")] == expected


def test_all_equal_weights_are_an_error():
    report = modelcheck.check(symmetric_model(), gaussian())
    finding = only(report, "poor-initialization")
    assert (finding.layer, finding.severity) == ("2", "error")


def test_a_weight_of_one_value_has_no_scale_to_judge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 1))  # one weight value
    report = modelcheck.check(model, torch.randn(16, 3, 8, 8))
    assert findings_of(report, "poor-initialization") == []


@pytest.mark.parametrize(
    ("activation", "family"),
    [(nn.PReLU, "leaky_relu"), (nn.RReLU, "leaky_relu"), (nn.LogSigmoid, "other")],
)
def test_activations_named_like_relu_or_sigmoid_are_not_judged_as_them(activation, family):
    # PReLU and RReLU keep a slope below zero, so all-negative inputs leave them alive;
    # LogSigmoid is unbounded below, so large negative outputs are not a flat region.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), activation(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(-20.0)  # every pre-activation far below zero
    report = modelcheck.check(model, gaussian())
    assert report.layer("1").family == family
    rules = {f.rule for f in report.findings}
    assert "dead-units" not in rules and "saturation" not in rules


def test_unstandardised_probe_features_warn():
    report = modelcheck.check(mlp([8, 16, 4]), gaussian() * 100 + 50)
    finding = only(report, "unscaled-input")
    assert (finding.layer, finding.severity) == (None, "warning")


def test_integer_inputs_are_not_checked_for_scaling():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    report = modelcheck.check(model, torch.randint(0, 10, (64, 3)))
    assert findings_of(report, "unscaled-input") == []


def test_constant_output_is_an_error():
    report = modelcheck.check(constant_output_model(), gaussian())
    finding = only(report, "collapsed-output")
    assert (finding.layer, finding.severity) == (None, "error")
    assert not [fix for fix in finding.fixes if "torch.randn" in fix]


def test_one_class_for_every_sample_is_a_warning():
    report = modelcheck.check(majority_class_model(), gaussian())
    finding = only(report, "collapsed-output")
    assert finding.severity == "warning"
    assert "torch.randn" in finding.fixes[-1]  # a probe of noise can look like this too
    assert finding.message.startswith("every one of the 256 samples gets the same argmax class")


def _pooled_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def test_one_class_for_all_of_the_random_probe_is_no_finding():
    # Noise images from one distribution, averaged over positions, give a fresh CNN nearly
    # one output: every sample got the same argmax, and a warning that said nothing of it.
    model = _pooled_cnn()
    probe = probe_from_spec("random", input_shape=(3, 32, 32))
    with torch.no_grad():
        classes = {int(c) for batch in probe.batches for c in model.eval()(batch.inputs).argmax(1)}
    assert len(classes) == 1
    report = modelcheck.check(model, probe)
    assert findings_of(report, "collapsed-output") == []


def test_a_constant_output_on_the_random_probe_is_still_an_error():
    report = modelcheck.check(constant_output_model(), "random", input_shape=(8,))
    assert only(report, "collapsed-output").severity == "error"


# -- zero-initialised layers ----------------------------------------------------------------


def images() -> torch.Tensor:
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def token_ids() -> torch.Tensor:
    return torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("gradients", [True, False], ids=["full", "forward-only"])
@pytest.mark.parametrize(
    ("build", "probe", "zeroed"),
    [
        (lora_model, gaussian, ["2.lora_B", "4.lora_B"]),
        (zero_gain_resnet, images, ["3.bn2", "4.bn2"]),
        (adaln_zero_model, gaussian, ["1.modulation", "2.modulation"]),
        (layer_scale_convnet, images, ["1", "2"]),
        (rezero_model, gaussian, ["1", "2"]),
    ],
    ids=["lora", "zero-gain-residual", "adaln-zero", "layer-scale", "rezero"],
)
def test_branches_that_start_near_zero_by_design_are_noted_not_faulted(
    build, probe, zeroed, gradients
):
    # At init these branches output (nearly) 0 and hold back the gradient of the layers
    # feeding them: vanishing-activations and vanishing-gradients fired on all five, and
    # poor-initialization's all-equal error on the zeroed weights.
    report = modelcheck.check(build(), probe(), gradients=gradients)
    finding = only(report, "poor-initialization")
    assert finding.severity == "info"
    assert [finding.layer, *finding.related] == zeroed
    assert [f.rule for f in report.findings] == ["poor-initialization"]


def test_a_zeroed_head_makes_the_constant_output_a_warning():
    # modded-nanogpt's zeroing: attention and MLP output projections, and the head.
    report = modelcheck.check(zero_projection_gpt(), token_ids())
    assert errors(report) == []
    collapsed = only(report, "collapsed-output")
    assert (collapsed.layer, collapsed.severity) == ("head", "warning")
    assert "'head', the last layer, starts at zero" in collapsed.message
    # Each of the 16 sequences gives 12 positions' logits: 192 outputs, not 192 samples.
    assert collapsed.message.startswith(
        "the output is the same for all 192 positions of 16 samples"
    )
    noted = only(report, "poor-initialization")
    assert [noted.layer, *noted.related] == [
        "blocks.0.self_attn",
        "blocks.0.linear2",
        "blocks.1.self_attn",
        "blocks.1.linear2",
        "head",
    ]


def test_zeroing_every_layer_is_still_an_error():
    report = modelcheck.check(all_zero_model(), gaussian())
    init = findings_of(report, "poor-initialization")
    assert sorted((f.layer, f.severity) for f in init) == [
        ("0", "error"),
        ("2", "error"),
        ("4", "error"),
    ]
    assert only(report, "collapsed-output").severity == "error"


def test_two_zeroed_layers_in_a_row_are_an_error():
    # The second's input is the first's constant output: each holds the other at zero.
    report = modelcheck.check(zero_pair_model(), gaussian())
    init = {f.layer: f.severity for f in findings_of(report, "poor-initialization")}
    assert init == {"2": "info", "3": "error"}
    assert only(report, "collapsed-output").severity == "error"


@pytest.mark.parametrize(
    ("value", "shape", "rule"),
    [(0.1, (16,), None), (1e-3, (16, 16), "poor-initialization")],
    ids=["scale-of-0.1", "constant-matrix"],
)
def test_only_zeros_and_small_scales_start_a_branch_near_zero(value, shape, rule):
    # A LayerScale of 0.1 (DeiT III's small models) scales its branch like any layer; a
    # constant matrix, however small, is the symmetry fault.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    with torch.no_grad():
        if len(shape) == 1:
            model[2] = nn.LayerNorm(16)
            model[2].weight.fill_(value)
        else:
            model[2].weight.fill_(value)
    report = modelcheck.check(model, gaussian())
    assert [f for f in report.findings if f.severity == "info"] == []
    init = [f.severity for f in report.findings if f.rule == "poor-initialization"]
    assert init == (["error"] if rule else [])


def test_a_prelu_slope_of_zero_scales_no_branch():
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(init=0.0), nn.Linear(16, 4))
    report = modelcheck.check(model, gaussian())
    assert [f for f in report.findings if f.severity == "info"] == []


def test_a_zero_initialised_layer_leaves_vanishing_gradients_found():
    # Only gradients of exactly 0 are put down to the zeroed layer; the sigmoids' are small.
    model = nn.Sequential(*sigmoid_stack(), LoRALinear(4))
    report = modelcheck.check(model, gaussian(features=16))
    finding = only(report, "vanishing-gradients")
    assert (finding.layer, finding.severity) == ("0", "error")
    assert only(report, "poor-initialization").layer == f"{len(model) - 1}.lora_B"


# -- healthy models stay clean --------------------------------------------------------------


def errors(report) -> list[str]:
    return [f"{f.layer} {f.rule}: {f.message}" for f in report.findings if f.severity == "error"]


def test_trained_seed_network_has_no_errors():
    model, x, y = trained_seed_network()
    assert errors(modelcheck.check(model, x, y, loss="mse")) == []


@pytest.mark.parametrize(
    "build",
    [trained_digits_cnn, trained_lstm, trained_transformer],
    ids=["cnn", "lstm", "transformer"],
)
def test_trained_models_on_digits_have_no_errors(build):
    x, y = digits()
    report = modelcheck.check(build(), x[:512], y[:512])
    assert errors(report) == []
    assert report.ok
