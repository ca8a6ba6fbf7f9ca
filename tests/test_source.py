"""The source stage: model files become modules, or one clear line saying why not."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import archs
import pytest
import torch
from torch import nn

from modelcheck.errors import SourceError
from modelcheck.filekind import ARCHIVES, sniff
from modelcheck.source import LoadedModel, import_factory, load_model

REPO = Path(__file__).resolve().parents[1]
MLP_SPEC = "tests.archs:make_mlp"


@pytest.fixture(autouse=True)
def _run_from_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # --arch specs import from the current directory; "tests.archs" lives under the root.
    monkeypatch.chdir(REPO)


def error_line(excinfo: pytest.ExceptionInfo[SourceError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def saved(obj: object, path: Path, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class MakesMarker:
    """A pickle payload that would create a marker directory if it were ever unpickled."""

    def __init__(self, marker: Path, via_exec: bool) -> None:
        self.marker, self.via_exec = marker, via_exec

    def __reduce__(self) -> tuple[object, tuple[str]]:
        if self.via_exec:
            return exec, (f"import os; os.mkdir({str(self.marker)!r})",)
        return os.mkdir, (str(self.marker),)


# --- state_dict + --arch ---------------------------------------------------------------------


def test_state_dict_with_arch_loads_its_weights_into_the_factory_model(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = saved(model.state_dict(), tmp_path / "weights.pt")

    loaded = load_model(path, arch=MLP_SPEC)

    assert isinstance(loaded, LoadedModel)
    assert loaded.format == "state_dict"
    assert loaded.source == str(path)
    assert loaded.description == "state_dict (6 tensors) loaded into tests.archs:make_mlp()"
    assert same_weights(loaded.module, model)


def test_format_is_read_from_the_content_not_the_extension(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = saved(model.state_dict(), tmp_path / "weights.png")

    assert same_weights(load_model(path, arch=MLP_SPEC).module, model)


def test_legacy_non_zip_torch_save_format_is_read(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = saved(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)

    assert same_weights(load_model(path, arch=MLP_SPEC).module, model)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, still read
def test_each_format_is_told_from_its_bytes(tmp_path: Path) -> None:
    state = archs.make_mlp().state_dict()
    zipped = saved(state, tmp_path / "a.bin")
    legacy = saved(state, tmp_path / "b.bin", _use_new_zipfile_serialization=False)
    script = tmp_path / "c.bin"
    torch.jit.save(torch.jit.script(archs.make_mlp()), script)
    plain = tmp_path / "d.bin"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))

    kinds = [sniff(str(p)) for p in (zipped, legacy, script, plain)]

    assert kinds == ["torch", "torch-legacy", "torchscript", "pickle"]
    assert [k in ARCHIVES for k in kinds] == [True, False, True, False]


def test_arch_kwargs_are_passed_to_the_factory(tmp_path: Path) -> None:
    model = archs.MLP(hidden=8)
    path = saved(model.state_dict(), tmp_path / "small.pt")

    loaded = load_model(path, arch="tests.archs:make_mlp_sized", arch_kwargs={"hidden": 8})

    assert loaded.module.fc1.weight.shape == (8, 4)
    assert "tests.archs:make_mlp_sized(hidden=8)" in loaded.description
    assert same_weights(loaded.module, model)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_common_checkpoint_wrappings_are_unwrapped(tmp_path: Path, key: str) -> None:
    model = archs.make_mlp()
    path = saved({key: model.state_dict(), "epoch": 7}, tmp_path / "checkpoint.pt")

    loaded = load_model(path, arch=MLP_SPEC)

    assert same_weights(loaded.module, model)
    assert f"'{key}'" in loaded.description


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "_orig_mod.module."], ids=["ddp", "compile", "both"]
)
def test_keys_saved_from_inside_a_wrapper_lose_its_prefix(tmp_path: Path, prefix: str) -> None:
    model = archs.make_mlp()
    state = {prefix + key: value for key, value in model.state_dict().items()}
    path = saved({"model": state}, tmp_path / "checkpoint.pt")

    loaded = load_model(path, arch=MLP_SPEC)

    assert same_weights(loaded.module, model)
    assert loaded.description == (
        f"state_dict (6 tensors, under the checkpoint key 'model', keys without the prefix "
        f"'{prefix}') loaded into {MLP_SPEC}()"
    )


def test_a_wrapped_state_dict_that_does_not_fit_names_the_keys_the_model_knows(
    tmp_path: Path,
) -> None:
    state = {f"module.{key}": value for key, value in archs.make_mlp().state_dict().items()}
    del state["module.fc3.bias"]
    path = saved(state, tmp_path / "partial.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    assert error_line(excinfo) == (
        f"{path} does not fit --arch {MLP_SPEC} (its keys read without the prefix 'module.'): "
        "key 'fc3.bias' (shape (3,)) is in the model but not in the file"
    )


def test_state_dict_without_arch_says_to_pass_arch(tmp_path: Path) -> None:
    path = saved(archs.make_mlp().state_dict(), tmp_path / "weights.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path)

    message = error_line(excinfo)
    assert message.startswith(f"{path} holds a state_dict (6 tensors)")
    assert "pass --arch package.module:factory" in message


def test_state_dict_of_another_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    path = saved(archs.MLP(in_features=5).state_dict(), tmp_path / "wide.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    message = error_line(excinfo)
    assert message.startswith(f"{path} does not fit --arch {MLP_SPEC}: ")
    assert "key 'fc1.weight' has shape (16, 5) in the file but (16, 4) in the model" in message


def test_key_missing_from_the_file_is_named_with_its_shape(tmp_path: Path) -> None:
    state = archs.make_mlp().state_dict()
    del state["fc3.bias"]
    path = saved(state, tmp_path / "partial.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    assert "key 'fc3.bias' (shape (3,)) is in the model but not in the file" in error_line(excinfo)


def test_key_the_model_does_not_have_is_named_with_its_shape(tmp_path: Path) -> None:
    state = archs.make_mlp().state_dict()
    state["head.weight"] = torch.zeros(2, 3)
    path = saved(state, tmp_path / "extra.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    message = error_line(excinfo)
    assert "key 'head.weight' (shape (2, 3)) is in the file but not in the model" in message


def test_file_holding_neither_model_nor_state_dict_says_what_it_holds(tmp_path: Path) -> None:
    path = saved(torch.zeros(3), tmp_path / "tensor.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    assert (
        error_line(excinfo) == f"{path} holds a tensor of shape (3,), not a model or a state_dict"
    )


# --- pickled modules and trust ---------------------------------------------------------------


def test_pickled_module_is_refused_without_trust_and_names_the_global(tmp_path: Path) -> None:
    path = saved(archs.make_mlp(), tmp_path / "whole.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path)

    message = error_line(excinfo)
    assert message.startswith(f"{path} needs to unpickle archs.MLP")
    assert "arbitrary code" in message
    assert "--trust" in message and "trust=True" in message


def test_trusted_pickled_module_is_used_directly(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = saved(model, tmp_path / "whole.pt")

    loaded = load_model(path, trust=True)

    assert loaded.format == "pickled-module"
    assert isinstance(loaded.module, archs.MLP)
    assert same_weights(loaded.module, model)
    assert loaded.description == "pickled module archs.MLP (trusted)"


def test_trusted_checkpoint_holding_a_module_under_model_is_unwrapped(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = saved({"model": model, "epoch": 3}, tmp_path / "checkpoint.pt")

    assert same_weights(load_model(path, trust=True).module, model)


def test_trusted_state_dict_still_goes_through_arch(tmp_path: Path) -> None:
    path = saved(archs.make_mlp().state_dict(), tmp_path / "weights.pt")

    with pytest.raises(SourceError, match="pass --arch"):
        load_model(path, trust=True)
    assert load_model(path, arch=MLP_SPEC, trust=True).format == "state_dict"


def test_trusted_plain_pickle_of_a_module_is_loaded(tmp_path: Path) -> None:
    model = archs.make_mlp()
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))

    loaded = load_model(path, trust=True)

    assert loaded.format == "pickled-module"
    assert same_weights(loaded.module, model)


@pytest.mark.parametrize("via_exec", [False, True], ids=["os.mkdir", "builtins.exec"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, writer: str, via_exec: bool
) -> None:
    marker = tmp_path / "pwned"
    payload = {"weights": MakesMarker(marker, via_exec)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    message = error_line(excinfo)
    assert ("builtins.exec" if via_exec else "mkdir") in message
    assert "arbitrary code" in message and "--trust" in message
    assert not marker.exists()


def test_trusted_pickle_whose_class_cannot_be_imported_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gone_net.py").write_text(
        "from torch import nn\n\nclass Net(nn.Linear):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    net = import_factory("gone_net:Net")(2, 2)
    path = saved(net, tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "gone_net")
    (tmp_path / "gone_net.py").unlink()

    with pytest.raises(SourceError) as excinfo:
        load_model(path, trust=True)

    message = error_line(excinfo)
    assert "No module named 'gone_net'" in message
    assert "must be importable" in message


# --- files that are not models ---------------------------------------------------------------


def _truncated_zip(path: Path) -> None:
    torch.save(archs.make_mlp().state_dict(), path)
    path.write_bytes(path.read_bytes()[:600])


def _truncated_legacy(path: Path) -> None:
    torch.save(archs.make_mlp().state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:300])


UNREADABLE = {
    "missing": (lambda path: None, "does not exist"),
    "directory": (lambda path: path.mkdir(), "is a directory"),
    "empty": (lambda path: path.write_bytes(b""), "is empty"),
    "text": (
        lambda path: path.write_text("fc1.weight = [[0.1, 0.2]]\n"),
        "is not a PyTorch file (looks like a text file)",
    ),
    "png": (
        lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "is not a PyTorch file (looks like a PNG image)",
    ),
    "truncated zip": (_truncated_zip, "is truncated or corrupted ("),
    "truncated legacy": (_truncated_legacy, "is truncated or corrupted ("),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_file_is_named_with_its_problem(tmp_path: Path, case: str) -> None:
    make, problem = UNREADABLE[case]
    path = tmp_path / "model.pt"
    make(path)

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=MLP_SPEC)

    message = error_line(excinfo)
    assert message.startswith(str(path))
    assert problem in message


# --- --arch factories ------------------------------------------------------------------------


ARCH_ERRORS = {
    "tests.archs": "is not of the form package.module:factory",
    "tests.archs:": "is not of the form package.module:factory",
    "no_such_module_for_modelcheck:make": "cannot import module 'no_such_module_for_modelcheck'",
    "tests.archs:make_nothing": "module 'tests.archs' has no attribute 'make_nothing'",
    "tests.archs:NOT_CALLABLE": "'NOT_CALLABLE' is a int, not callable",
    "tests.archs:make_failing": "the factory raised RuntimeError: this factory always fails",
    "tests.archs:make_not_a_module": "the factory returned a str, not a torch.nn.Module",
}


@pytest.mark.parametrize("spec", list(ARCH_ERRORS))
def test_bad_arch_names_the_spec_and_the_cause(tmp_path: Path, spec: str) -> None:
    path = saved(archs.make_mlp().state_dict(), tmp_path / "weights.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch=spec)

    message = error_line(excinfo)
    assert message.startswith(f"--arch {spec}") or message.startswith(f"--arch {spec!r}")
    assert ARCH_ERRORS[spec] in message


def test_factory_that_rejects_the_kwargs_is_reported(tmp_path: Path) -> None:
    path = saved(archs.make_mlp().state_dict(), tmp_path / "weights.pt")

    with pytest.raises(SourceError) as excinfo:
        load_model(path, arch="tests.archs:make_mlp", arch_kwargs={"depth": 3})

    message = error_line(excinfo)
    assert message.startswith("--arch tests.archs:make_mlp(depth=3): the factory raised TypeError")


def test_factory_is_imported_from_the_current_directory_and_sys_path_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here_nets.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "here_nets", raising=False)
    before = list(sys.path)

    factory = import_factory("here_nets:make")

    assert isinstance(factory(), nn.Linear)
    assert sys.path == before
    monkeypatch.delitem(sys.modules, "here_nets")


@pytest.mark.parametrize(
    ("source", "cause"),
    [
        ("raise ValueError('boom')\n", "raised ValueError: boom"),
        ("import not_installed_for_modelcheck\n", "No module named 'not_installed_for_modelcheck'"),
    ],
)
def test_module_that_fails_to_import_is_reported_with_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, cause: str
) -> None:
    (tmp_path / "broken_nets.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "broken_nets", raising=False)
    before = list(sys.path)

    with pytest.raises(SourceError) as excinfo:
        import_factory("broken_nets:make")

    message = error_line(excinfo)
    assert message.startswith("--arch broken_nets:make: importing 'broken_nets'")
    assert cause in message
    assert sys.path == before
