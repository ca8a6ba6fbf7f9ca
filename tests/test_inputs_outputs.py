"""What real models take and return: keyword and dict inputs, token ids, containers of
outputs, and the layer kinds that need care (recurrent, attention, norms, half precision)."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from models import gaussian
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import modelcheck
from modelcheck import ProbeError
from modelcheck.renderers import summary_line

G = torch.Generator().manual_seed(0)


def names(report) -> list[str]:
    return [layer.name for layer in report.layers]


def errors(report) -> list[str]:
    return [f"{f.layer} {f.rule}" for f in report.findings if f.severity == "error"]


class TokenClassifier(nn.Module):
    """Takes keyword inputs the way Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.fc(hidden.sum(1) / attention_mask.sum(1, keepdim=True))


def tokens(n: int = 32) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (n, 7), generator=G)
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_probe_dict_is_passed_as_keywords_and_token_ids_skip_input_statistics():
    report = modelcheck.check(TokenClassifier(), tokens())
    assert names(report) == ["embed", "fc"]
    assert report.layer("embed").activation.units == 16
    assert report.input is None  # integer ids and mask: no float input to describe
    assert not any(f.rule == "unscaled-input" for f in report.findings)
    assert report.probe.source == "keyword inputs input_ids, attention_mask"


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.head = nn.Linear(8, 16), nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.left(left) + self.right(right)))


def test_two_inputs_given_as_a_pair_are_told_how_to_group():
    # (x1, x2) is read as inputs and labels: the forward gets one argument of two.
    x1, x2 = torch.randn(64, 8, generator=G), torch.randn(64, 4, generator=G)
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(TwoInputs(), (x1, x2))
    assert "missing 1 required positional argument: 'right'" in str(caught.value)
    assert str(caught.value).endswith(
        "the probe's two arrays were read as inputs and labels: to give the model two "
        "inputs, group them, check(model, ((x1, x2), labels)), labels None if none"
    )
    report = modelcheck.check(TwoInputs(), ((x1, x2), None))
    assert names(report) == ["left", "right", "TwoInputs.relu", "head"]


class TakesFeatures(nn.Module):
    """A forward taking one dict, as sentence-transformers modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TokenClassifier()

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**features, "logits": self.inner(**features)}


def test_a_forward_that_takes_one_dict_gets_the_probe_dict_whole():
    report = modelcheck.check(TakesFeatures(), tokens())
    assert names(report) == ["inner.embed", "inner.fc"]
    assert report.probe.output_key == "['logits']"  # not input_ids, the first tensor


class ReturnsMany(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        logits, aux = self.fc(x), self.aux(x)
        loss = logits.pow(2).mean()
        if self.kind == "tuple":
            return logits, aux
        if self.kind == "list":
            return [logits, aux]
        if self.kind == "dict":
            return {"loss": loss, "aux": aux, "logits": logits}
        if self.kind == "dataclass":
            return DataclassOutput(loss=loss, logits=logits, hidden=aux)
        return Output(loss=loss, logits=logits, hidden=aux)


@dataclasses.dataclass
class DataclassOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    hidden: torch.Tensor


class Output(collections.OrderedDict):
    """Shaped like Hugging Face's ModelOutput: an ordered mapping with attribute access."""

    def __getattr__(self, name):
        return self[name]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("tuple", "[0]"),
        ("list", "[0]"),
        ("dict", "['logits']"),
        ("model-output", "['logits']"),
        ("dataclass", "['logits']"),
    ],
)
def test_the_primary_output_is_chosen_sensibly(kind, expected):
    report = modelcheck.check(ReturnsMany(kind), gaussian(features=4))
    assert report.probe.output_key == expected
    assert report.output.units == 3  # fc's logits, not the loss or the auxiliary head


class ReturnsItsLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).pow(2).mean()


def test_a_model_that_returns_a_scalar_is_checked_with_its_probe_samples_counted():
    report = modelcheck.check(ReturnsItsLoss(), gaussian(n=200, features=4))
    assert report.probe.samples == 200 and report.probe.batches == 4
    assert report.layer("fc").output_grad is not None
    assert summary_line(report).startswith("All checks passed: 1 layer of ReturnsItsLoss")


class ReturnsNothing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = 0 if x.shape[0] == 64 else x.shape[0]  # values in a short batch only
        return self.fc(x)[:rows]


def test_an_output_with_no_values_in_any_batch_is_one_clear_error():
    report = modelcheck.check(ReturnsNothing(), gaussian(n=100, features=4))  # 64 + 36
    assert report.output.count == 36 * 3  # a batch with none (no detections) is no error
    with pytest.raises(modelcheck.CaptureError) as caught:
        modelcheck.check(ReturnsNothing(), gaussian(n=128, features=4))
    assert str(caught.value).startswith("the model's output has no values (shape (0, 3))")


def test_a_real_hugging_face_model_output_gives_its_logits():
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            logits = self.fc(x)
            return SequenceClassifierOutput(loss=logits.mean(), logits=logits)

    report = modelcheck.check(Classifier(), gaussian(features=4))
    assert report.probe.output_key == "['logits']"


@pytest.mark.parametrize(("key", "units"), [("aux", 2), ("logits", 3)])
def test_output_key_names_the_output_to_check(key, units):
    report = modelcheck.check(ReturnsMany("dict"), gaussian(features=4), output_key=key)
    assert report.probe.output_key == f"[{key!r}]"
    assert report.output.units == units


def test_output_key_by_index_and_an_unknown_key_is_one_clear_error():
    report = modelcheck.check(ReturnsMany("tuple"), gaussian(features=4), output_key="1")
    assert report.output.units == 2
    with pytest.raises(ProbeError, match=r"output key 'nope' .* has parts \['loss', 'aux'"):
        modelcheck.check(ReturnsMany("dict"), gaussian(features=4), output_key="nope")


class PackedLSTM(nn.Module):
    """Packs variable-length sequences and returns the LSTM's PackedSequence."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> PackedSequence:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.lstm(packed)[0]


def test_packed_sequence_output_checks_its_data():
    x = torch.randn(24, 6, 5, generator=G)
    lengths = torch.randint(2, 7, (24,), generator=G)
    report = modelcheck.check(PackedLSTM(), {"x": x, "lengths": lengths}, batch_size=24)
    assert report.output.count == int(lengths.sum()) * 8  # packed steps only, no padding
    assert report.layer("lstm").activation.units == 8
    assert report.probe.output_key == "['data']"


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_recurrent_layers_record_their_output_not_their_hidden_state(kind):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(5, 8)  # (seq, batch, features): units on the last axis

        def forward(self, x):
            return self.rnn(x)

    model = Net()
    x = torch.randn(12, 6, 5, generator=G)
    report = modelcheck.check(model, x, batch_size=12)
    stats = report.layer("rnn").activation
    with torch.no_grad():
        expected = model.rnn(x)[0]
    assert stats.units == 8
    assert stats.count == expected.numel()
    assert stats.rms == pytest.approx(float(expected.pow(2).mean().sqrt()), rel=1e-5)


class PreNormBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


def test_residual_blocks_are_recorded_where_their_sum_is_not_a_layer_output():
    model = nn.Sequential(nn.Linear(8, 16), PreNormBlock(16), PreNormBlock(16), nn.Linear(16, 2))
    x = gaussian(features=8)
    report = modelcheck.check(model, x)
    assert names(report) == ["0", "1.norm", "1.fc", "1", "2.norm", "2.fc", "2", "3"]
    with torch.no_grad():
        stream = model[2](model[1](model[0](x)))
    assert report.layer("2").family == "block"
    assert report.layer("2").activation.rms == pytest.approx(
        float(stream.pow(2).mean().sqrt()), rel=1e-5
    )


def test_unit_axis_is_overridable_per_layer_pattern():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU())
    x = torch.randn(16, 10, 6, generator=G)  # (batch, positions, features)
    default = modelcheck.check(model, x)
    across = modelcheck.check(model, x, unit_axes={"*": 1})
    assert default.layer("1").activation.units == 4
    assert across.layer("0").activation.units == 10
    assert across.layer("1").activation.units == 10
    with pytest.raises(ProbeError, match="unit axis 5 for layer 0 is out of range"):
        modelcheck.check(model, x, unit_axes={"0": 5})


def test_transformer_encoder_fast_path_is_turned_off_and_said_so():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen and forward-only: the fused kernel would run
    x = torch.randn(8, 5, 16, generator=G)
    report = modelcheck.check(model, x, gradients=False)
    assert {"layers.0.linear1", "layers.0.norm2", "layers.1.self_attn"} <= set(names(report))
    assert any("fast path" in note for note in report.probe.notes)
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


def test_multi_head_attention_and_rms_norm_are_recorded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.norm = nn.RMSNorm(16)

        def forward(self, x):
            return self.norm(self.attn(x, x, x, need_weights=False)[0])

    report = modelcheck.check(Net(), torch.randn(8, 5, 16, generator=G))
    assert names(report) == ["attn", "norm"]
    assert report.layer("attn").family == "attention"
    assert report.layer("norm").family == "norm"
    assert report.layer("norm").activation.units == 16


def test_frozen_layers_get_no_parameter_gradients_and_no_false_alarm():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    model[0].requires_grad_(False)
    report = modelcheck.check(model, gaussian())
    assert report.layer("0").param_grad is None
    assert report.layer("2").param_grad.rms > 0
    assert report.layer("0").output_grad is None  # nothing before it needs a gradient
    assert errors(report) == []


def test_a_model_without_parameters_is_checked_through_its_input_gradient():
    model = nn.Sequential(nn.Tanh(), nn.Sigmoid())
    report = modelcheck.check(model, gaussian())
    assert names(report) == ["0", "1"]
    assert report.layer("0").output_grad.rms > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_reduced_like_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = gaussian()
    full = modelcheck.check(model, x)
    half = modelcheck.check(model.to(dtype), x)
    assert half.model.dtype == str(dtype).removeprefix("torch.")
    for layer in full.layers:
        assert half.layer(layer.name).activation.rms == pytest.approx(
            layer.activation.rms, rel=2e-2
        )
    assert errors(half) == []


def test_a_probe_file_of_keyword_inputs_reaches_the_model_as_keywords(tmp_path):
    from modelcheck.probe import probe_from_spec

    batch = tokens(20)
    torch.save(batch, tmp_path / "tokens.pt")
    np_path = tmp_path / "tokens.npz"
    __import__("numpy").savez(np_path, **{k: v.numpy() for k, v in batch.items()})
    for path in (tmp_path / "tokens.pt", np_path):
        probe = probe_from_spec(str(path), batch_size=8)
        report = modelcheck.check(TokenClassifier(), probe)
        assert names(report) == ["embed", "fc"]
        assert report.probe.samples == 20


def test_real_model_settings_are_read_from_pyproject(tmp_path):
    from modelcheck import config

    path = tmp_path / "pyproject.toml"
    path.write_text(
        "[tool.modelcheck]\n"
        'output-key = "sentence_embedding"\n'
        "forward-kwargs = { sr = 16000 }\n"
        'unit-axes = { "_model.stft" = 1 }\n'
    )
    settings = config.load(path).settings
    assert settings.output_key == "sentence_embedding"
    assert settings.forward_kwargs == {"sr": 16000}
    assert settings.unit_axes == {"_model.stft": 1}
    path.write_text('[tool.modelcheck]\nunit-axes = { "stft" = "one" }\n')
    with pytest.raises(modelcheck.ConfigError, match="unit-axes"):
        config.load(path)
