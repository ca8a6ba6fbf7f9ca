"""Realistic probes for the pretrained models: speech-like audio and English sentences,
generated or written here so that nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from scipy.signal import lfilter

SAMPLE_RATE = 16_000
CHUNK = 512  # Silero VAD takes 512-sample chunks at 16 kHz

# (F1, F2, F3) in Hz of a few vowels, after Peterson & Barney (1952), adult male averages.
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (530, 1840, 2480),
    (570, 840, 2410),
    (300, 870, 2240),
)


def _resonator(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """A second-order resonance (one formant), normalised to unit gain at its peak."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * np.pi * frequency / SAMPLE_RATE
    return lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], signal)


def _voiced(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A vowel: a glottal pulse train with drifting pitch, shaped by three formants."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(95, 210) * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    source = sum(np.sin(k * phase) / k for k in range(1, 40) if k * f0.max() < 7_000)
    formants = _VOWELS[rng.integers(len(_VOWELS))]
    sound = sum(_resonator(source, f, 80 + 0.05 * f) * g for f, g in zip(formants, (1, 0.6, 0.3)))
    envelope = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.5
    return sound * envelope


def _fricative(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """An unvoiced consonant: noise with a high resonance (an 's' or 'sh')."""
    n = int(seconds * SAMPLE_RATE)
    noise = rng.standard_normal(n)
    return _resonator(noise, rng.uniform(3_500, 6_000), 1_500) * np.hanning(n) * 0.4


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Syllables (consonant + vowel) grouped in words and phrases with pauses between,
    over faint background noise, at a normal recording level (rms about 0.05)."""
    rng = np.random.default_rng(seed)
    parts = []
    total = int(seconds * SAMPLE_RATE)
    length = 0
    while length < total:
        for _ in range(rng.integers(2, 7)):  # syllables in a phrase
            if rng.random() < 0.6:
                parts.append(_fricative(rng, rng.uniform(0.04, 0.12)))
            parts.append(_voiced(rng, rng.uniform(0.12, 0.3)))
        parts.append(np.zeros(int(rng.uniform(0.2, 0.7) * SAMPLE_RATE)))  # a pause
        length = sum(len(p) for p in parts)
    audio = np.concatenate(parts)[:total]
    voiced = audio[np.abs(audio) > 0]
    audio = audio * (0.08 / np.sqrt(np.mean(voiced**2)))
    audio += 0.002 * rng.standard_normal(total)
    return audio.astype(np.float32)


def speech_chunks(streams: int = 4, seconds: float = 4.0, seed: int = 0) -> list[torch.Tensor]:
    """Batches of (streams, 512) chunks in time order, as a streaming VAD is fed."""
    audio = np.stack([speech_like(seconds, seed + i) for i in range(streams)])
    usable = audio.shape[1] // CHUNK * CHUNK
    chunks = audio[:, :usable].reshape(streams, -1, CHUNK)
    return [torch.from_numpy(chunks[:, i].copy()) for i in range(chunks.shape[1])]


SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A linter for neural networks reads activations the way a doctor reads an x-ray.",
    "She sold the old bicycle to a neighbour who repairs them on weekends.",
    "Rain is expected across the north of the country by Thursday evening.",
    "How many layers does a network need before its gradients start to vanish?",
    "The committee postponed its decision until the budget figures were published.",
    "He forgot his umbrella on the train, again.",
    "Fresh bread, strong coffee and a quiet morning are all I ask for.",
    "The museum's new wing displays sculptures from the early twentieth century.",
    "Please restart the server after the update has been installed.",
    "Children were playing football in the park while their parents talked.",
    "Interest rates rose for the third time this year, surprising most analysts.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Our flight was delayed by four hours because of a storm over the Atlantic.",
    "Mathematics is the language in which the book of nature is written.",
    "Would you mind closing the window? It is getting cold in here.",
)
