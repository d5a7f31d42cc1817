"""Resamplers side by side (``make bench-resample``): time per 30 s window on one thread, and
quality against an exact reference, for each source rate the service meets.

The test signal is a sum of sinusoids at known frequencies and phases, so the ideal output at
the target rate is known exactly: the components below the target's Nyquist evaluated at the
output times, the components above it gone. ``snr_db`` is that reference's power over the error
power (the edges, where every filter starts up, left out); ``alias_db`` is what is left of the
components above the target's Nyquist, relative to their input power (lower is better).
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch
import torchaudio

from popscore.bench.stats import machine

SOURCE_RATES = (44_100, 48_000, 32_000, 16_000)
TARGET_RATE = 22_050
SECONDS = 30.0
EDGE_S = 0.05  # left out at both ends: filter start-up
REPEATS = 7

Resample = Callable[[np.ndarray, int, int], np.ndarray]


def torchaudio_sinc(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """torchaudio's default (sinc, Hann, width 6, rolloff 0.99): the pool until 2026-12-03."""
    kernel = _torchaudio_kernel(rate, target)
    with torch.inference_mode():
        out: np.ndarray = kernel(torch.from_numpy(x)).numpy()
    return out


_KERNELS: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


def _torchaudio_kernel(rate: int, target: int) -> torchaudio.transforms.Resample:
    if (rate, target) not in _KERNELS:  # built once, as the service caches it per rate
        _KERNELS[(rate, target)] = torchaudio.transforms.Resample(rate, target)
    return _KERNELS[(rate, target)]


def soxr_quality(quality: str) -> Resample:
    def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
        return np.asarray(soxr.resample(x, rate, target, quality=quality))

    resample.__name__ = f"soxr_{quality}"
    return resample


ENGINES: dict[str, Resample] = {
    "torchaudio": torchaudio_sinc,
    "soxr_HQ": soxr_quality("HQ"),
    "soxr_MQ": soxr_quality("MQ"),
    "soxr_VHQ": soxr_quality("VHQ"),
}


def test_signal(rate: int, seconds: float, seed: int = 0) -> tuple[np.ndarray, list[Any]]:
    """A window at ``rate`` and its components (frequency, amplitude, phase): 24 in the pass
    band (50 Hz to 0.9 x the lower Nyquist of the two rates), 8 above the target's Nyquist when
    the source has room for them (what a resampler must remove)."""
    rng = np.random.default_rng(seed)
    nyquist = TARGET_RATE / 2
    top = 0.9 * min(nyquist, rate / 2)
    tones = [(f, 0.02, rng.uniform(0, 2 * math.pi)) for f in rng.uniform(50, top, 24)]
    if rate / 2 > nyquist * 1.1:
        high = rng.uniform(1.1 * nyquist, 0.95 * rate / 2, 8)
        tones += [(f, 0.02, rng.uniform(0, 2 * math.pi)) for f in high]
    return _synth(tones, rate, seconds), tones


def _synth(tones: list[Any], rate: int, seconds: float) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    out = np.zeros(t.shape, dtype=np.float64)
    for f, a, phase in tones:
        out += a * np.sin(2 * math.pi * f * t + phase)
    return out.astype(np.float32)


def quality(engine: Resample, rate: int) -> dict[str, float]:
    x, tones = test_signal(rate, 2.0)
    y = engine(x, rate, TARGET_RATE).astype(np.float64)
    nyquist = TARGET_RATE / 2
    passband = [t for t in tones if t[0] < nyquist]
    stopband = [t for t in tones if t[0] >= nyquist]
    n = min(len(y), round(TARGET_RATE * 2.0))
    edge = round(EDGE_S * TARGET_RATE)
    ideal = _synth(passband, TARGET_RATE, 2.0).astype(np.float64)[:n]
    error = (y[:n] - ideal)[edge : n - edge]
    signal = ideal[edge : n - edge]
    snr = 10 * math.log10(np.sum(signal**2) / max(np.sum(error**2), 1e-30))
    out: dict[str, float] = {"snr_db": round(snr, 1)}
    if stopband:
        # The error's power at the stop-band tones' alias frequencies is hard to separate; the
        # whole error, relative to the stop band's input power, bounds it from above.
        stop_power = sum(a**2 / 2 for _, a, _ in stopband)
        out["alias_db"] = round(10 * math.log10(np.mean(error**2) / stop_power), 1)
    return out


def speed(engine: Resample, rate: int) -> float:
    """Median ms for one 30 s mono window on one thread (after one warm-up call)."""
    x, _ = test_signal(rate, SECONDS)
    engine(x, rate, TARGET_RATE)
    took = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        engine(x, rate, TARGET_RATE)
        took.append(time.perf_counter() - t0)
    return round(float(np.median(took)) * 1e3, 2)


def score_effect(model: Path, tracks: int = 32) -> dict[str, Any]:
    """What the choice changes in the scores: synthetic 30 s tracks at 44.1 and 48 kHz, each
    resampled by torchaudio and by libsoxr, scored by ``model`` with missing features (so only
    the audio differs); the largest and mean change of popularity (0-100) and hit probability."""
    from consumer.device import Scorer  # noqa: PLC0415
    from popscore.training.synthetic import sample_params, synth_audio  # noqa: PLC0415

    scorer = Scorer(model, "cpu")
    target, seconds = scorer.meta.sample_rate, scorer.meta.clip_seconds
    n = round(target * seconds)
    waves: dict[str, list[np.ndarray]] = {"torchaudio": [], "soxr_HQ": []}
    for i in range(tracks):
        rng = np.random.default_rng([7, i])
        rate = (44_100, 48_000)[i % 2]
        mono = synth_audio(rng, seconds, rate, 1, sample_params(rng))[:, 0]
        for name, done in waves.items():
            out = ENGINES[name](mono, rate, target)[:n]
            done.append(np.pad(out, (0, n - len(out))))
    feats = np.full((tracks, len(scorer.meta.features)), np.nan, dtype=np.float32)
    mask = np.ones(tracks, dtype=bool)
    a, b = (scorer.score(np.stack(waves[n]), feats, mask) for n in waves)
    dp = np.abs(a.popularity - b.popularity)
    dh = np.abs(a.hit_probability - b.hit_probability)
    return {"model_version": scorer.meta.model_version, "tracks": tracks,
            "popularity_abs_diff_max": round(float(dp.max()), 4),
            "popularity_abs_diff_mean": round(float(dp.mean()), 4),
            "hit_probability_abs_diff_max": round(float(dh.max()), 5)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popscore.bench.resampler")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--model", type=Path, help="also score with both: what changes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one decode-pool thread's view
    rows = {}
    for rate in SOURCE_RATES:
        for name, engine in ENGINES.items():
            rows[f"{name}@{rate}"] = {"ms_per_30s": speed(engine, rate)} | quality(engine, rate)
            print(f"{name:>11} {rate:>6} Hz -> {TARGET_RATE}: {rows[f'{name}@{rate}']}",
                  file=sys.stderr)  # fmt: skip
    report = {"machine": machine(), "target_rate": TARGET_RATE, "window_s": SECONDS}
    report["results"] = rows
    if args.model:
        report["score_effect"] = score_effect(args.model)
        print(json.dumps(report["score_effect"]), file=sys.stderr)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
