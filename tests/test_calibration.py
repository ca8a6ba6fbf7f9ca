"""The defaults that the two pretrained models calibrated (figures in the README): each
adjusted rule still fires on the fault it is for, and stays quiet on the healthy phenomenon
that made it move."""

from __future__ import annotations

import pytest
import torch
from models import (
    badly_initialised,
    bert_init_encoder,
    gaussian,
    mlp,
    nano_gpt,
    sequences,
    sigmoid_block_stack,
    sigmoid_fronted_encoder,
    t5_init_encoder,
)
from torch import nn

import modelcheck


def findings_of(report, rule: str):
    return [f for f in report.findings if f.rule == rule]


class Scale(nn.Module):
    """A weightless front end, like the padding before Silero VAD's STFT."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_growth_is_measured_from_the_first_layer_with_weights():
    torch.manual_seed(0)
    model = nn.Sequential(Scale(0.005), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    report = modelcheck.check(model, gaussian())
    assert findings_of(report, "exploding-activations") == []
    assert findings_of(report, "vanishing-activations") == []
    torch.manual_seed(0)
    exploding = nn.Sequential(Scale(0.005), *mlp([8, 32, 32, 4]))
    with torch.no_grad():
        exploding[3].weight.mul_(20_000.0)
    finding = findings_of(modelcheck.check(exploding, gaussian()), "exploding-activations")[0]
    assert (finding.layer, finding.severity) == ("3", "error")
    assert "'1'" in finding.message  # measured against the first Linear, not the front end


def test_weights_fifty_times_off_their_scale_are_an_error():
    report = modelcheck.check(badly_initialised(200.0), gaussian())  # default init is ×0.41
    finding = findings_of(report, "poor-initialization")[0]
    assert (finding.layer, finding.severity) == ("2", "error")
    assert finding.threshold == 50


@pytest.mark.parametrize(("scale", "warns"), [(0.05, False), (0.003, True)])
def test_raw_audio_levels_are_scaled_but_vanishing_inputs_are_not(scale, warns):
    report = modelcheck.check(mlp([8, 16, 4]), gaussian() * scale)
    assert bool(findings_of(report, "unscaled-input")) == warns


def test_sparse_embedding_gradients_are_not_vanishing_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5000, 16), nn.Flatten(), nn.Linear(48, 4))
    report = modelcheck.check(model, torch.randint(0, 5000, (64, 3)))
    ratio = report.layer("0").param_grad.rms / report.layer("2").param_grad.rms
    assert ratio < 1e-2  # most rows get no gradient at all from 64 samples
    assert findings_of(report, "vanishing-gradients") == []


def test_gradients_are_compared_among_weight_layers_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.LayerNorm(16))
    report = modelcheck.check(model, gaussian())
    layers = layer_metrics(report)
    assert layers["0"]["grad_reference_layer"] == "2"  # the last Linear, not the last norm
    assert layers["0"]["param_grad_ratio"] == pytest.approx(
        report.layer("0").param_grad.rms / report.layer("2").param_grad.rms
    )
    assert layers["1"]["param_grad_ratio"] is None and layers["3"]["param_grad_ratio"] is None


def test_query_and_key_gradients_of_a_bert_initialised_attention_are_not_vanishing():
    # Near-uniform attention passes little back through the softmax to the query and key.
    report = modelcheck.check(bert_init_encoder(), sequences())
    head = report.layer("head").param_grad.rms
    for block in ("blocks.0", "blocks.1"):
        for name in ("query", "key"):
            assert report.layer(f"{block}.attention.{name}").param_grad.rms / head < 1e-3
    vanishing = findings_of(report, "vanishing-gradients")
    assert [f.severity for f in vanishing] == ["warning"]  # the value, out and ffn layers
    assert not {vanishing[0].layer, *vanishing[0].related} & set(query_and_key_layers(report))


@pytest.mark.parametrize(("scale", "flagged"), [(1.0, False), (80.0, True)], ids=["t5", "x10"])
def test_a_query_scaled_down_softens_attention_by_design_but_not_up(scale, flagged):
    # T5 starts its query at ×0.125 of LeCun's gain (1 / sqrt(head size)), which warned on
    # every block; eighty times that (×10) makes attention start saturated, still a warning.
    model = t5_init_encoder()
    with torch.no_grad():
        for block in model.blocks:
            block.attention.q.weight.mul_(scale)
    report = modelcheck.check(model, sequences())
    queries = [p for p in parameter_metrics(report) if p["name"].endswith(".q")]
    assert [p["init_ratio"] / scale for p in queries] == [pytest.approx(0.125, rel=0.05)] * 2
    found = {f.layer for f in findings_of(report, "poor-initialization")}
    assert found == ({"blocks.0.attention.q", "blocks.1.attention.q"} if flagged else set())


def test_vanishing_gradients_are_still_found_behind_an_attention():
    report = modelcheck.check(sigmoid_fronted_encoder(), sequences())
    finding = findings_of(report, "vanishing-gradients")[0]
    assert (finding.layer, finding.severity) == ("0.0", "error")


def derived(report):
    """The metrics the rules read, derived again from a report's statistics."""
    from modelcheck.metrics import derive
    from modelcheck.stats import RunStats

    stats = RunStats(report.layers, report.input, report.output, None, 16384)
    return derive(stats, parameters=1, loss="x", samples=report.probe.samples)


def layer_metrics(report) -> dict:
    return {m["name"]: m for m in derived(report).layers}


def test_a_head_over_repeated_blocks_is_not_a_trend_with_depth():
    # The head reads one position: every block gets ~x0.001-0.003 of its gradient, the first
    # as much as the last. Judged against the head, the value projections warned.
    report = modelcheck.check(bert_init_encoder(blocks=4), sequences())
    layers = layer_metrics(report)
    first, last = layers["blocks.0.ffn.0"], layers["blocks.3.ffn.0"]
    assert first["param_grad_ratio"] < 1e-2 and last["param_grad_ratio"] < 1e-2
    assert first["grad_depth_reference_layer"] == "blocks.3.ffn.0"
    assert first["param_grad_depth_ratio"] == pytest.approx(
        first["param_grad_rms"] / last["param_grad_rms"]
    )
    assert layers["embed.0"]["grad_depth_reference_layer"] == "head"  # in no stack
    assert findings_of(report, "vanishing-gradients") == []
    assert "compares a layer of repeated blocks with the same layer" in report.to_html()


def test_gradients_that_vanish_through_repeated_blocks_are_judged_against_the_last():
    report = modelcheck.check(sigmoid_block_stack(), torch.randn(256, 16))
    finding = findings_of(report, "vanishing-gradients")[0]
    assert (finding.layer, finding.severity) == ("blocks.0.fc", "error")
    assert "those of 'blocks.7.fc'" in finding.message


def test_blocks_repeated_fewer_than_four_times_are_judged_against_the_last_weight_layer():
    layers = layer_metrics(modelcheck.check(bert_init_encoder(), sequences()))
    assert layers["blocks.0.ffn.0"]["grad_depth_reference_layer"] == "head"


@pytest.mark.parametrize(
    "names",
    [
        ("query", "key", "value"),  # BERT, ViT
        ("q_proj", "k_proj", "v_proj"),  # LLaMA, BART, Whisper
        ("q", "k", "v"),  # T5
        ("q_lin", "k_lin", "v_lin"),  # DistilBERT
        ("to_q", "to_k", "to_v"),  # diffusers
        ("wq", "wk", "wv"),  # Meta's LLaMA
    ],
)
def test_query_and_key_projections_are_told_by_their_value_sibling(names):
    report = modelcheck.check(bert_init_encoder(names), sequences(n=8))
    expected = {f"blocks.{i}.attention.{name}" for i in (0, 1) for name in names[:2]}
    assert set(query_and_key_layers(report)) == expected


def test_a_query_or_key_without_a_value_beside_it_is_an_ordinary_layer():
    model = nn.Sequential()
    model.add_module("query", nn.Linear(8, 8))
    model.add_module("key", nn.Linear(8, 4))
    assert query_and_key_layers(modelcheck.check(model, gaussian())) == []


def query_and_key_layers(report) -> list[str]:
    return [m["name"] for m in derived(report).layers if m["is_query_or_key"]]


@pytest.mark.parametrize("branches", [2, 1], ids=["sqrt-2N", "sqrt-N"])
def test_residual_projections_scaled_with_depth_are_not_poorly_initialised(branches):
    # GPT-2 and nanoGPT start each residual branch's c_proj at 0.02 / sqrt(2 × blocks): the
    # attention's at ×0.11 of LeCun's gain here (×0.16 over sqrt(blocks)), which warned.
    report = modelcheck.check(nano_gpt(branches), token_ids())
    rows = parameter_metrics(report)
    attention = [p for p in rows if p["name"].endswith("attn.c_proj")]
    assert len(attention) == 4 and all(p["init_ratio"] < 0.2 for p in attention)
    assert [p["name"] for p in rows if p["depth_scaled_init"]] == [
        f"h.{i}.{branch}.c_proj" for i in range(4) for branch in ("attn", "mlp")
    ]
    assert findings_of(report, "poor-initialization") == []


def test_residual_projections_scaled_otherwise_are_still_poorly_initialised():
    model = nano_gpt()
    with torch.no_grad():
        for block in model.h:
            block.attn["c_proj"].weight.normal_(std=0.002)  # ÷10, not ÷sqrt(8)
    report = modelcheck.check(model, token_ids())
    flagged = {f.layer for f in findings_of(report, "poor-initialization")}
    assert flagged == {f"h.{i}.attn.c_proj" for i in range(4)}


def token_ids() -> torch.Tensor:
    return torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))


def parameter_metrics(report) -> tuple:
    return derived(report).parameters


@pytest.mark.parametrize("activation", [nn.GELU, nn.SiLU])
def test_gelu_and_silu_units_that_never_fire_are_dead(activation):
    torch.manual_seed(1)
    model = mlp([8, 32, 32, 4], activation=activation)
    with torch.no_grad():
        model[2].bias[:24] = -100.0
    finding = findings_of(modelcheck.check(model, gaussian()), "dead-units")[0]
    assert (finding.layer, finding.severity) == ("3", "error")
    assert "24 of 32 units" in finding.message
    assert (
        findings_of(modelcheck.check(mlp([8, 32, 32, 4], activation), gaussian()), "dead-units")
        == []
    )


def test_renderers_get_the_same_reference_layers_as_the_rules():
    from modelcheck.metrics import reference_values

    torch.manual_seed(0)
    model = nn.Sequential(
        Scale(0.1), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.LayerNorm(4)
    )
    report = modelcheck.check(model, gaussian())
    rms, grad = reference_values(report.layers)
    assert rms == report.layer("1").activation.rms  # not the weightless front end
    assert grad == report.layer("3").param_grad.rms  # not the final LayerNorm
