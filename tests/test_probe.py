"""The probe stage: probe data becomes re-iterable batches, or one clear line saying why not."""

from __future__ import annotations

import random
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path

import archs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelcheck.errors import ConfigError, ProbeError
from modelcheck.probe import Batch, Probe, infer_input_shape, probe_from_data, probe_from_spec


def error_line(excinfo: pytest.ExceptionInfo[Exception]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def stacked(probe: Probe) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All inputs (and targets) of a single-tensor probe, concatenated in order."""
    batches = list(probe.batches)
    inputs = torch.cat([batch.inputs for batch in batches])
    if batches[0].target is None:
        return inputs, None
    return inputs, torch.cat([batch.target for batch in batches])


def same_batches(first: list[Batch], second: list[Batch]) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a.inputs, b.inputs)
        and (a.target is None if b.target is None else torch.equal(a.target, b.target))
        for a, b in zip(first, second, strict=True)
    )


def rng_states() -> tuple[torch.Tensor, object, object]:
    return torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate()


# --- scikit-learn datasets -------------------------------------------------------------------


def test_iris_probe_is_standardised_like_the_seed_with_int64_labels() -> None:
    from sklearn.datasets import load_iris
    from sklearn.preprocessing import StandardScaler

    probe = probe_from_spec("iris", batch_size=64)

    iris = load_iris()
    inputs, labels = stacked(probe)
    expected = torch.from_numpy(StandardScaler().fit_transform(iris.data)).float()
    assert probe.source == "iris, standardised"
    assert probe.samples == 150 and probe.has_labels
    assert [len(batch.inputs) for batch in probe.batches] == [64, 64, 22]
    assert torch.allclose(inputs, expected)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.from_numpy(iris.target).long())


def test_dataset_is_left_raw_when_standardize_is_false() -> None:
    from sklearn.datasets import load_wine

    probe = probe_from_spec("wine", standardize=False, max_samples=10)

    inputs, _ = stacked(probe)
    assert probe.source == "wine, first 10 of 178, not standardised"
    assert torch.allclose(inputs, torch.from_numpy(load_wine().data[:10]).float())


@pytest.mark.parametrize(
    ("name", "shape"), [("digits", (1797, 64)), ("breast_cancer", (569, 30)), ("wine", (178, 13))]
)
def test_every_bundled_dataset_loads_with_labels(name: str, shape: tuple[int, int]) -> None:
    probe = probe_from_spec(name)

    inputs, labels = stacked(probe)
    assert tuple(inputs.shape) == shape
    assert probe.samples == shape[0] and len(labels) == shape[0]


def test_input_shape_reshapes_each_sample_of_a_dataset_or_a_file(tmp_path: Path) -> None:
    flat, _ = stacked(probe_from_spec("digits"))
    shaped = probe_from_spec("digits", input_shape=(1, 8, 8))
    inputs, _ = stacked(shaped)
    assert tuple(inputs.shape) == (1797, 1, 8, 8)
    assert torch.equal(inputs.reshape(1797, 64), flat)

    path = tmp_path / "x.npy"
    np.save(path, np.arange(24, dtype=np.float32).reshape(2, 12))
    inputs, _ = stacked(probe_from_spec(str(path), input_shape=(3, 4)))
    assert torch.equal(inputs, torch.arange(24.0).reshape(2, 3, 4))


def test_an_input_shape_of_another_size_is_refused() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec("digits", input_shape=(1, 8, 9))
    assert error_line(excinfo) == (
        "digits: its samples hold 64 values each (shape (64,)), and --input-shape 1,8,9 holds 72"
    )


# --- files -----------------------------------------------------------------------------------


def test_npy_probe_is_memory_mapped_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    rows, width, batch_size = 16384, 1024, 64  # 64 MiB of float32, a sparse file on disk
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
    mapped[-1] = 7.0
    del mapped

    tracemalloc.start()
    try:
        probe = probe_from_spec(str(path), batch_size=batch_size)
        batches = 0
        for batch in probe.batches:
            batches += 1
            last = batch.inputs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert probe.samples == rows and batches == rows // batch_size
    assert last.shape == (batch_size, width) and float(last[-1, 0]) == 7.0
    assert peak < 4 * batch_size * width * 4  # a few batches' worth, never the whole file


def test_npy_batches_follow_the_file_and_the_last_batch_is_smaller(tmp_path: Path) -> None:
    values = np.arange(50 * 3, dtype=np.float64).reshape(50, 3)
    np.save(tmp_path / "probe.npy", values)

    probe = probe_from_spec(str(tmp_path / "probe.npy"), batch_size=16)

    assert [len(batch.inputs) for batch in probe.batches] == [16, 16, 16, 2]
    inputs, labels = stacked(probe)
    assert inputs.dtype == torch.float64 and labels is None
    assert torch.equal(inputs, torch.from_numpy(values))
    assert probe.source == str(tmp_path / "probe.npy") and not probe.has_labels


def test_npz_probe_reads_x_and_y(tmp_path: Path) -> None:
    x, y = np.ones((10, 2), np.float32), np.arange(10)
    np.savez(tmp_path / "probe.npz", x=x, y=y)

    inputs, labels = stacked(probe_from_spec(str(tmp_path / "probe.npz"), batch_size=4))

    assert torch.equal(inputs, torch.from_numpy(x)) and torch.equal(labels, torch.from_numpy(y))


def test_npz_without_x_lists_the_arrays_it_holds(tmp_path: Path) -> None:
    np.savez(tmp_path / "probe.npz", np.ones((3, 2)), np.ones(3))

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(tmp_path / "probe.npz"))

    assert "holds arrays ['arr_0', 'arr_1']; expected 'x' and optional 'y'" in error_line(excinfo)


@pytest.mark.parametrize(
    "layout", ["tensor", "tuple", "list", "dict"], ids=lambda layout: f"saved as {layout}"
)
def test_pt_probe_accepts_a_tensor_a_pair_or_a_dict(tmp_path: Path, layout: str) -> None:
    x, y = torch.randn(12, 4), torch.arange(12)
    saved = {"tensor": x, "tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y}}[layout]
    path = tmp_path / "probe.pth"
    torch.save(saved, path)

    probe = probe_from_spec(str(path), batch_size=5)

    inputs, labels = stacked(probe)
    assert torch.equal(inputs, x)
    assert labels is None if layout == "tensor" else torch.equal(labels, y)


def test_pt_probe_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "probe.pt"
    torch.save(archs.make_mlp(), path)

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(path))

    message = error_line(excinfo)
    assert message.startswith(f"{path} holds archs.MLP, not only tensors")


def test_csv_probe_with_header_takes_the_target_column_by_name(tmp_path: Path) -> None:
    path = tmp_path / "probe.csv"
    path.write_text("a,label,b\n1.5,0,2\n-1,2,3.25\n\n4,1,5\n")

    probe = probe_from_spec(str(path), target="label")

    inputs, labels = stacked(probe)
    assert torch.equal(inputs, torch.tensor([[1.5, 2], [-1, 3.25], [4, 5]]))
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 2, 1]


def test_csv_probe_without_header_takes_the_target_column_by_index(tmp_path: Path) -> None:
    path = tmp_path / "probe.csv"
    path.write_text("1,2,0.5\n3,4,1.5\n")

    inputs, labels = stacked(probe_from_spec(str(path), target="2"))

    assert inputs.tolist() == [[1, 2], [3, 4]]
    assert labels.dtype == torch.float32 and labels.tolist() == [0.5, 1.5]


def test_csv_without_target_is_all_inputs(tmp_path: Path) -> None:
    path = tmp_path / "probe.csv"
    path.write_text("x1,x2\n1,2\n3,4\n")

    probe = probe_from_spec(str(path))

    assert not probe.has_labels and stacked(probe)[0].tolist() == [[1, 2], [3, 4]]


CSV_ERRORS = {
    "non-numeric cell": (
        "a,b\n1,2\n3,oops\n",
        None,
        "line 3, column 1 ('b'): 'oops' is not a number",
    ),
    "ragged row": ("1,2\n3\n", None, "line 2 has 1 columns, expected 2"),
    "unknown target": ("a,b\n1,2\n", "c", "no target column 'c' (columns ['a', 'b'])"),
    "header only": ("a,b\n", None, "the probe is empty"),
}


@pytest.mark.parametrize("case", list(CSV_ERRORS))
def test_bad_csv_names_the_place_of_the_problem(tmp_path: Path, case: str) -> None:
    text, target, expected = CSV_ERRORS[case]
    path = tmp_path / "probe.csv"
    path.write_text(text)

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(path), target=target)

    message = error_line(excinfo)
    assert message.startswith(str(path)) and expected in message


def test_string_npy_array_is_refused_naming_its_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(tmp_path / "words.npy"))

    assert "must hold real numbers, not dtype <U1" in error_line(excinfo)


def test_object_npy_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object), allow_pickle=True)

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(tmp_path / "objects.npy"))

    assert "not dtype object" in error_line(excinfo)


# --- random data -----------------------------------------------------------------------------


def test_random_probe_is_seeded_re_iterable_and_leaves_the_global_rng_alone() -> None:
    before = rng_states()

    probe = probe_from_spec("random", input_shape=(3, 5), random_samples=100, batch_size=32)
    first, second = list(probe.batches), list(probe.batches)
    other_seed = list(probe_from_spec("random", input_shape=(3, 5), seed=1).batches)

    assert rng_states()[0].equal(before[0]) and rng_states()[1:] == before[1:]
    assert probe.source == "random N(0,1) of shape (3, 5) (seed 0)"
    assert probe.samples == 100 and not probe.has_labels
    assert [tuple(batch.inputs.shape) for batch in first] == [(32, 3, 5)] * 3 + [(4, 3, 5)]
    assert same_batches(first, second)
    assert not torch.equal(first[0].inputs, other_seed[0].inputs)


def test_random_probe_needs_an_input_shape() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec("random")

    assert "--input-shape" in error_line(excinfo)


def test_random_probe_refuses_a_nonsense_shape() -> None:
    with pytest.raises(ConfigError, match=r"input_shape must be positive integers"):
        probe_from_spec("random", input_shape=(4, 0))


# --- specs that are not probes ---------------------------------------------------------------


def test_unknown_spec_lists_what_is_accepted() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec("mnist")

    message = error_line(excinfo)
    assert message.startswith("'mnist' is not a probe")
    assert all(word in message for word in (".npy", ".csv", "iris", "breast_cancer", "random"))


def test_missing_probe_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(tmp_path / "absent.npy"))

    assert error_line(excinfo) == f"{tmp_path / 'absent.npy'} does not exist"


def test_probe_file_of_an_unknown_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "probe.txt").write_text("1 2 3\n")

    with pytest.raises(ProbeError) as excinfo:
        probe_from_spec(str(tmp_path / "probe.txt"))

    assert "unsupported probe file type '.txt'" in error_line(excinfo)


def test_directory_is_not_a_probe(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="is a directory"):
        probe_from_spec(str(tmp_path))


def test_target_column_outside_a_csv_is_refused() -> None:
    with pytest.raises(ProbeError, match="only applies to CSV probes"):
        probe_from_spec("iris", target="species")


@pytest.mark.parametrize("field", ["batch_size", "max_samples"])
@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_batch_size_and_max_samples_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be a positive integer"):
        probe_from_data(torch.ones(4, 2), **{field: value})


# --- in-memory data --------------------------------------------------------------------------


def test_numpy_inputs_keep_their_dtype() -> None:
    values = np.linspace(0, 1, 20).reshape(10, 2)

    probe = probe_from_data(values, batch_size=4)

    inputs, _ = stacked(probe)
    assert inputs.dtype == torch.float64 and torch.equal(inputs, torch.from_numpy(values))
    assert probe.samples == 10 and probe.source == "float64 array of shape (10, 2)"


def test_pair_and_labels_argument_give_the_same_batches() -> None:
    x, y = torch.randn(30, 3), torch.arange(30)

    as_pair = probe_from_data((x, y), batch_size=8)
    as_list = probe_from_data([x, y], batch_size=8)
    as_labels = probe_from_data(x, labels=y, batch_size=8)

    assert as_pair.has_labels and as_list.has_labels and as_labels.has_labels
    assert same_batches(list(as_pair.batches), list(as_labels.batches))
    assert same_batches(list(as_list.batches), list(as_labels.batches))
    assert torch.equal(stacked(as_pair)[1], y)


@pytest.mark.parametrize("labelled", [True, False])
def test_a_pair_takes_several_inputs_in_a_tuple(labelled) -> None:
    x1, x2, y = torch.randn(30, 3), torch.randn(30, 5), torch.arange(30)

    probe = probe_from_data(((x1, x2), y if labelled else None), batch_size=8)

    assert probe.has_labels == labelled and probe.samples == 30
    batches = list(probe.batches)
    assert torch.equal(torch.cat([b.inputs[1] for b in batches]), x2)
    assert probe.source == f"2 positional inputs{' with labels' if labelled else ''}"


def test_labels_of_the_wrong_length_name_both_numbers() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data(torch.ones(150, 4), labels=torch.zeros(149))

    assert "150 samples but 149 labels" in error_line(excinfo)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (torch.ones(0, 4), "the probe is empty (0 samples)"),
        (np.array(["a", "b"]), "must hold real numbers, not dtype <U1"),
        (np.array([1, None], dtype=object), "not dtype object"),
        (torch.tensor(3.0), "must be at least 1-D"),
        (iter([]), "the probe is empty"),
        (42, "cannot use a int"),
        ("iris", "use probe_from_spec"),
        ([np.array(["a", "b"])], "batch 0: the inputs must hold real numbers, not dtype <U1"),
        ([[1.0, 2.0]], "batch 0: inputs must be a tensor or array, a tuple of them or a dict"),
    ],
    ids=[
        "empty",
        "strings",
        "objects",
        "scalar",
        "empty iterator",
        "int",
        "spec string",
        "batch of strings",
        "batch of floats",
    ],
)
def test_unusable_data_is_refused_with_the_reason(data: object, expected: str) -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data(data)

    assert expected in error_line(excinfo)


def test_max_samples_truncates_and_batch_size_cuts() -> None:
    probe = probe_from_data(torch.arange(100.0).reshape(50, 2), max_samples=21, batch_size=10)

    assert probe.samples == 21
    assert [len(batch.inputs) for batch in probe.batches] == [10, 10, 1]


@settings(max_examples=40, deadline=None)
@given(
    samples=st.integers(1, 40),
    batch_size=st.integers(1, 16),
    max_samples=st.none() | st.integers(1, 50),
)
def test_batches_cover_exactly_the_first_samples_in_order(
    samples: int, batch_size: int, max_samples: int | None
) -> None:
    values = np.arange(samples * 2).reshape(samples, 2)
    probe = probe_from_data(values, batch_size=batch_size, max_samples=max_samples)

    inputs, _ = stacked(probe)
    used = samples if max_samples is None else min(samples, max_samples)
    assert probe.samples == used
    assert torch.equal(inputs, torch.from_numpy(values[:used]))
    assert all(len(batch.inputs) <= batch_size for batch in probe.batches)


def test_dict_of_arrays_becomes_keyword_inputs() -> None:
    ids, mask = torch.arange(20).reshape(10, 2), torch.ones(10, 2, dtype=torch.bool)

    probe = probe_from_data({"input_ids": ids, "attention_mask": mask}, batch_size=4)

    first = next(iter(probe.batches))
    assert set(first.inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(first.inputs["input_ids"], ids[:4]) and first.target is None


def test_keyword_inputs_of_different_lengths_are_refused() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data({"a": torch.ones(5, 2), "b": torch.ones(4, 2)})

    assert "input 'b' has 4 rows but input 'a' has 5" in error_line(excinfo)


def test_dataloader_is_used_as_is_and_leaves_the_global_rng_alone() -> None:
    x, y = torch.randn(40, 3), torch.arange(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    before = rng_states()

    probe = probe_from_data(loader)
    first, second = list(probe.batches), list(probe.batches)

    assert rng_states()[0].equal(before[0]) and rng_states()[1:] == before[1:]
    assert probe.has_labels and probe.samples == 40
    assert probe.source == "DataLoader over TensorDataset"
    assert [len(batch.inputs) for batch in first] == [16, 16, 8]
    assert same_batches(first, second)  # even a shuffling loader repeats itself
    assert sorted(torch.cat([batch.target for batch in first]).tolist()) == list(range(40))


def test_dataloader_is_cut_at_max_samples_mid_batch() -> None:
    loader = DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=16)

    probe = probe_from_data(loader, max_samples=20)

    assert probe.samples == 20 and not probe.has_labels
    assert [len(batch.inputs) for batch in probe.batches] == [16, 4]


def test_generator_is_read_once_and_kept() -> None:
    pulled = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(3):
            pulled.append(index)
            yield torch.full((4, 2), float(index)), torch.zeros(4, dtype=torch.long)

    probe = probe_from_data(batches())

    assert same_batches(list(probe.batches), list(probe.batches))
    assert pulled == [0, 1, 2] and probe.samples == 12 and probe.has_labels


def test_list_of_batches_accepts_tensors_pairs_and_dicts() -> None:
    x = torch.ones(4, 2)
    data = [{"x": x, "y": torch.zeros(4)}, (x, torch.ones(4)), [x.numpy(), np.zeros(4)]]

    probe = probe_from_data(data)

    batches = list(probe.batches)
    assert probe.samples == 12 and probe.has_labels
    assert all(isinstance(batch.inputs, torch.Tensor) for batch in batches)
    assert isinstance(batches[2].target, torch.Tensor)


def test_batch_of_three_tensors_is_refused_as_ambiguous() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data([(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2))] * 3)

    assert "batch 0 is a tuple of 3 items" in error_line(excinfo)


def test_batches_that_disagree_about_targets_are_refused() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data([(torch.ones(2, 2), torch.ones(2)), torch.ones(2, 2)])

    assert "batch 1 has no target, unlike batch 0" in error_line(excinfo)


def test_batch_whose_target_length_differs_is_refused() -> None:
    with pytest.raises(ProbeError) as excinfo:
        probe_from_data([(torch.ones(8, 2), torch.ones(7))] * 3)

    assert "batch 0 has 8 samples but 7 targets" in error_line(excinfo)


# --- inferring the input shape ---------------------------------------------------------------


def test_input_shape_comes_from_the_first_linear_in_registration_order() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(7, 3)), nn.Linear(3, 1))

    assert infer_input_shape(model) == (7,)
    assert infer_input_shape(archs.make_mlp()) == (4,)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, still checked
def test_input_shape_comes_from_a_linear_that_is_not_an_nn_linear() -> None:
    model = nn.Sequential(nn.Linear(7, 3), nn.ReLU(), nn.Linear(3, 1))
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, not gone
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
        traced = torch.jit.trace(model, torch.randn(2, 7))
    assert infer_input_shape(quantized) == (7,)  # its weight is a method
    assert infer_input_shape(traced) == (7,)  # no in_features, a weight


def test_first_conv_asks_for_the_input_shape() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 2)

    with pytest.raises(ProbeError) as excinfo:
        infer_input_shape(Net())

    message = error_line(excinfo)
    assert message.startswith(
        "cannot infer the input shape: the first layer conv1 is a Conv2d with 3 input channels; "
        "pass --input-shape 3,32,32"
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "pass input_shape=(3, 32, 32) with"),
        (nn.Sequential(nn.LSTM(6, 8)), "pass input_shape=(SEQ_LEN, 6) or a probe"),
        (nn.Sequential(nn.Embedding(100, 8)), "pass a probe of token ids"),
        (nn.Sequential(nn.ReLU()), "pass input_shape or a probe"),
    ],
)
def test_check_without_a_probe_names_its_own_argument_not_the_cli_flag(model, expected) -> None:
    import modelcheck

    with pytest.raises(ProbeError) as excinfo:
        modelcheck.check(model)

    message = error_line(excinfo)
    assert expected in message and "--" not in message and "file" not in message, message


def test_first_embedding_asks_for_a_probe_file() -> None:
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2))

    with pytest.raises(ProbeError) as excinfo:
        infer_input_shape(model)

    message = error_line(excinfo)
    assert "the first layer 0 is an Embedding" in message and "probe file" in message


class _TokenClassifier(nn.Module):
    """Token ids in, as a TorchScript file of a language model would take them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_TokenClassifier(), "the first layer embed is an Embedding, which takes token ids"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "the first layer 0 is a Conv2d with 3"),
        (nn.Sequential(nn.LSTM(5, 7)), "the first layer 0 is a LSTM over sequences of 5"),
    ],
)
def test_a_scripted_model_is_read_by_its_layers_classes(model, expected) -> None:
    # A TorchScript module's layers are all RecursiveScriptModules: a later Linear must not
    # set the shape of a model whose first layer says otherwise.
    with pytest.raises(ProbeError) as excinfo:
        infer_input_shape(torch.jit.script(model))

    assert expected in error_line(excinfo)


def test_model_without_a_telling_layer_asks_for_the_input_shape() -> None:
    with pytest.raises(ProbeError) as excinfo:
        infer_input_shape(nn.Sequential(nn.ReLU()))

    assert "--input-shape" in error_line(excinfo)
