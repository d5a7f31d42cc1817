"""Resampling to the artifact's rate: per item on the decode pool (``Resampler``) or per batch
on the scoring device (``BatchResampler``, POPSCORE_RESAMPLE_ON).

Only torch, torchaudio and numpy: ``bench/gpu_check.py`` runs this module on GPU machines that
have nothing else installed.
"""

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason


@dataclass(frozen=True)
class Clip:
    """A decoded mono window at its source rate, before resampling."""

    samples: np.ndarray
    source_rate: int
    source_seconds: float


# torchaudio's sinc kernel has about (target/g) x (source/g) taps, g = gcd of the two rates:
# a few hundred thousand for every standard rate (48 kHz -> 22.05 kHz: 147 x 320), but ~1e9
# (4 GB) for a near-coprime rate such as 44,101 Hz. A file with such a rate is refused before
# any kernel is built, so one event cannot exhaust the host's or the GPU's memory.
MAX_RESAMPLE_TAPS = 1_000_000
# Kernels kept per resampler, least recently used out first: a handful of standard rates covers
# real traffic, while thousands of odd rates pass the tap check (each kernel is up to ~4 MB).
MAX_KERNELS = 16


class _Kernels:
    """torchaudio Resample kernels by source rate, at most MAX_KERNELS of them."""

    def __init__(self, target_rate: int, device: torch.device | None = None) -> None:
        self.target_rate = target_rate
        self.device = device
        self._cache: OrderedDict[int, torchaudio.transforms.Resample] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, rate: int) -> torchaudio.transforms.Resample:
        """The kernel for ``rate``, built (after the tap check) when not cached."""
        kernel = self._cache.pop(rate, None)
        if kernel is None:
            check_resample_rate(rate, self.target_rate)
            kernel = torchaudio.transforms.Resample(rate, self.target_rate)
            if self.device is not None:
                kernel = kernel.to(self.device)
        self._cache[rate] = kernel  # the most recent last
        if len(self._cache) > MAX_KERNELS:
            self._cache.popitem(last=False)
        return kernel


def check_resample_rate(source_rate: int, target_rate: int) -> None:
    """DeadLetter (audio_decode_failed) when resampling ``source_rate`` would need a huge kernel."""
    g = math.gcd(source_rate, target_rate)
    if (source_rate // g) * (target_rate // g) > MAX_RESAMPLE_TAPS:
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            f"sample rate {source_rate} Hz cannot be resampled to {target_rate} Hz "
            "at a sane cost (no common factor)",
        )


class Resampler:
    """Resamples to the artifact's rate, one cached torchaudio kernel per source rate."""

    def __init__(self, target_rate: int, clip_seconds: float) -> None:
        if target_rate <= 0 or clip_seconds <= 0:
            raise ValueError("target_rate and clip_seconds must be positive")
        self.target_rate = target_rate
        self.clip_samples = round(target_rate * clip_seconds)
        self._kernels = _Kernels(target_rate)
        self._lock = threading.Lock()

    def __call__(self, clip: Clip) -> np.ndarray:
        """Exactly ``clip_samples`` samples: resampled, cropped, or zero-padded at the end."""
        samples = torch.from_numpy(clip.samples)
        if clip.source_rate != self.target_rate:
            with torch.inference_mode():
                samples = self._kernel(clip.source_rate)(samples)
        out = np.zeros(self.clip_samples, dtype=np.float32)
        n = min(self.clip_samples, samples.shape[0])
        out[:n] = samples[:n].numpy()
        return out

    def _kernel(self, rate: int) -> torchaudio.transforms.Resample:
        with self._lock:  # the decode pool's threads share it
            return self._kernels.get(rate)


class BatchResampler:
    """Resamples a batch of decoded windows on the scoring device, one batched conv per source
    rate, into ``[B, clip_samples]`` there. On a GPU this takes the resample off the decode
    cores (CPU is what bounds a GPU pod); on CPU the per-item way on the pool measured
    faster (docs/PERFORMANCE.md), and serving uses this one only with
    POPSCORE_RESAMPLE_ON=device.
    Each row equals what torchaudio's per-item ``Resampler`` gives for that clip; the decode
    pool's ``SoxrResampler`` (libsoxr) differs from both near the top of the band."""

    def __init__(self, target_rate: int, clip_seconds: float, device: torch.device) -> None:
        if target_rate <= 0 or clip_seconds <= 0:
            raise ValueError("target_rate and clip_seconds must be positive")
        self.target_rate = target_rate
        self.clip_samples = round(target_rate * clip_seconds)
        self.device = device
        self._kernels = _Kernels(target_rate, device)

    def __call__(self, clips: Sequence[Clip]) -> torch.Tensor:
        out = torch.zeros(len(clips), self.clip_samples, device=self.device)
        by_rate: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            by_rate.setdefault(clip.source_rate, []).append(i)
        with torch.inference_mode():
            for rate, rows in by_rate.items():
                lengths = [clips[i].samples.shape[0] for i in rows]
                host = np.zeros((len(rows), max(lengths)), dtype=np.float32)
                for row, i in enumerate(rows):
                    host[row, : lengths[row]] = clips[i].samples
                batch = torch.from_numpy(host)
                if self.device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(self.device, non_blocking=True)
                if rate != self.target_rate:
                    batch = self._kernel(rate)(batch)
                    # A shorter clip's row runs on into its zero padding; cut it where its own
                    # resampled length ends, as item-by-item resampling would.
                    g = math.gcd(rate, self.target_rate)  # torchaudio's own length rule
                    ends = [math.ceil(self.target_rate // g * n / (rate // g)) for n in lengths]
                else:
                    ends = lengths
                keep = (
                    torch.arange(batch.shape[1], device=self.device)[None, :]
                    < torch.tensor(ends, device=self.device)[:, None]
                )
                batch = batch * keep
                n = min(self.clip_samples, batch.shape[1])
                out[torch.tensor(rows, device=self.device), :n] = batch[:, :n]
        return out

    def _kernel(self, rate: int) -> torchaudio.transforms.Resample:
        return self._kernels.get(rate)  # only the device stage's thread calls this
