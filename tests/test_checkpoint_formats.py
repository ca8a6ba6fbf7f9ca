"""The formats x architectures table of the README: every cell is one test here.

Each model is saved in each format, loaded back through the source stage as a user's file
would be, and checked. Every layer must be recorded under its module name — the leaves a
plain forward calls (seen by hooks of the test's own) plus the functional activations the
forward calls — and a compiled model must give the same statistics as the eager one.
"""

from __future__ import annotations

import functools
import warnings

import archs
import pytest
import torch
from torch import nn

import modelcheck
from modelcheck.source import load_model

G = torch.Generator().manual_seed(0)

# architecture -> (factory name in archs, input, functional activations the forward calls)
ARCHS = {
    "mlp": ("make_mlp", torch.randn(16, 4, generator=G), {"fc1.relu", "fc2.relu"}),
    "conv1d": ("CNN1d", torch.randn(16, 2, 16, generator=G), {"bn.relu"}),
    "conv2d": ("CNN2d", torch.randn(16, 1, 8, 8, generator=G), set()),
    "conv3d": ("CNN3d", torch.randn(16, 1, 4, 6, 6, generator=G), set()),
    "residual": (
        "Residual",
        torch.randn(16, 6, generator=G),
        {"block1.fc1.relu", "block1.relu", "block2.fc1.relu", "block2.relu"},
    ),
    "lstm": ("make_lstm", torch.randn(16, 5, 6, generator=G), set()),
    "gru": ("make_gru", torch.randn(16, 5, 6, generator=G), set()),
    "transformer": (
        "Encoder",
        torch.randn(16, 5, 16, generator=G),
        {"encoder.layers.0.linear1.relu", "encoder.layers.1.linear1.relu"},
    ),
    "attention": ("Attention", torch.randn(16, 5, 16, generator=G), set()),
    "embedding": ("Tokens", torch.randint(0, 50, (16, 5), generator=G), set()),
}
FORMATS = ("module", "state_dict", "safetensors", "pickled", "scripted", "traced", "exported")


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(archs, ARCHS[arch][0])().eval()


def save(model: nn.Module, fmt: str, x: torch.Tensor, path, factory: str) -> object:
    """The model as a user would hand it over: a module, or the path of a file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "module":
            return model
        if fmt == "state_dict":
            torch.save(model.state_dict(), path)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        elif fmt == "pickled":
            torch.save(model, path)
        elif fmt == "scripted":
            torch.jit.script(model).save(str(path))
        elif fmt == "traced":
            torch.jit.trace(model, x[:2], check_trace=False).save(str(path))
        else:
            dynamic = {"x" if "x" in _arg_names(model) else "ids": {0: torch.export.Dim("batch")}}
            torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=dynamic), path)
    arch_spec = {"state_dict", "safetensors"}
    return load_model(
        path,
        arch=f"archs:{factory}" if fmt in arch_spec else None,
        trust=fmt == "pickled",
    )


def _arg_names(model: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def modules_that_run(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Leaves, and modules owning parameters, that a plain unfused forward calls."""
    ran = set()
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: ran.add(name))
        for name, module in model.named_modules()
        if next(module.children(), None) is None or list(module.parameters(recurse=False))
    ]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        for handle in handles:
            handle.remove()
    return ran


@functools.cache
def eager_report(arch: str):
    return modelcheck.check(build(arch), ARCHS[arch][1])


def expected_layers(arch: str, fmt: str, model: nn.Module, x: torch.Tensor) -> set[str]:
    return modules_that_run(model, x) | ARCHS[arch][2]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_is_recorded_in_every_format(arch, fmt, tmp_path):
    model = build(arch)
    x = ARCHS[arch][1]
    given = save(model, fmt, x, tmp_path / "model", ARCHS[arch][0])
    report = modelcheck.check(given, x)
    eager = eager_report(arch)
    names = {layer.name for layer in report.layers}
    if fmt in ("traced", "exported") and arch in ("transformer", "attention"):
        # compiled MultiheadAttention inlines out_proj's weights into its own computation
        names.discard("attn.out_proj")
    assert names == expected_layers(arch, fmt, model, x)
    assert not [f for f in report.findings if f.severity == "error"]
    for layer in report.layers:
        reference = eager.layer(layer.name).activation
        assert layer.activation.rms == pytest.approx(reference.rms, rel=1e-4), layer.name
        assert layer.activation.units == reference.units, layer.name


# -- the command line says what it found, and refuses broken files in one line --------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from modelcheck.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.filterwarnings("ignore")
def test_the_format_is_read_from_content_and_said_first(tmp_path, capsys):
    path = tmp_path / "weights.bin"  # the extension says nothing
    torch.jit.script(build("mlp")).save(str(path))
    code, out, err = run_cli(capsys, path)  # input shape from the compiled Linear
    assert code == 0, err
    assert out.splitlines()[0] == f"{path}: TorchScript module MLP"
    code, out, _ = run_cli(capsys, path, "--input-shape", "4", "--format", "json")
    assert __import__("json").loads(out)["model"]["format"] == "torchscript"


@pytest.mark.filterwarnings("ignore")
def test_an_exported_program_gives_its_input_shape_to_the_random_probe(tmp_path, capsys):
    path = tmp_path / "cnn.pt2"
    batch = {"x": {0: torch.export.Dim("batch")}}
    program = torch.export.export(build("conv2d"), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=batch)
    torch.export.save(program, path)
    code, out, err = run_cli(capsys, path)
    assert code == 0, err
    assert out.splitlines()[0] == f"{path}: torch.export program exported for inputs (2, 1, 8, 8)"
    assert "random N(0,1) of shape (1, 8, 8)" in out


@pytest.mark.filterwarnings("ignore")
def test_an_exported_program_with_a_fixed_batch_says_how_to_fix_it(tmp_path, capsys):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(build("mlp"), (torch.zeros(3, 4),)), path)
    code, out, err = run_cli(capsys, path, "--input-shape", "4")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "exported for inputs (3, 4)" in err and "dynamic_shapes" in err
    code, _, err = run_cli(capsys, path, "--input-shape", "4", "--batch-size", "3",
                           "--max-samples", "30")  # fmt: skip
    assert code == 0, err


@pytest.mark.filterwarnings("ignore")
def test_an_exported_program_of_token_ids_asks_for_a_probe_file(tmp_path, capsys):
    path = tmp_path / "tokens.pt2"
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(40, 2))
    ids = torch.zeros(2, 5, dtype=torch.int64)
    batch = {"input": {0: torch.export.Dim("batch")}}
    torch.export.save(torch.export.export(model, (ids,), dynamic_shapes=batch), path)
    code, out, err = run_cli(capsys, path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "the exported program takes int64 inputs" in err and "--probe ids.pt" in err


@pytest.mark.filterwarnings("ignore")
def test_a_truncated_torchscript_archive_is_one_clear_error(tmp_path, capsys):
    whole = tmp_path / "whole.pt"
    torch.jit.script(build("mlp")).save(str(whole))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:2000])
    code, _, err = run_cli(capsys, cut)
    assert code == 2
    assert err == f"modelcheck: error: {cut} is truncated or corrupted (incomplete zip archive)\n"


def test_a_corrupt_safetensors_file_is_one_clear_error(tmp_path, capsys):
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))  # 12 bytes short
    code, _, err = run_cli(capsys, path, "--arch", "archs:make_mlp")
    assert code == 2
    assert err.startswith(f"modelcheck: error: {path} is truncated or corrupted (safetensors:")
    assert err.count("\n") == 1


@pytest.mark.filterwarnings("ignore")
def test_cli_options_for_real_models_are_validated(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.jit.script(build("mlp")).save(str(path))
    code, _, err = run_cli(capsys, path, "--forward-kwargs", "[1]")
    assert code == 2 and "--forward-kwargs must be a JSON object" in err
    code, _, err = run_cli(capsys, path, "--unit-axis", "fc1")
    assert code == 2 and "PATTERN=AXIS" in err
    code, _, err = run_cli(
        capsys, path, "--input-shape", "4", "--unit-axis", "fc*=-1", "--output-key", "0"
    )
    assert code == 2 and "output key '0'" in err  # a plain tensor output has no parts


@pytest.mark.filterwarnings("ignore")
def test_an_exported_program_object_is_checked_through_its_module():
    model, x = build("residual"), ARCHS["residual"][1]
    program = torch.export.export(model, (x,))
    report = modelcheck.check(program, x)
    assert {layer.name for layer in report.layers} == expected_layers(
        "residual", "exported", model, x
    )
