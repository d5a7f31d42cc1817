"""The device stage: one micro-batch to the device, the TorchScript fusion CNN, scores back.

The artifact holds the torchaudio frontend and the feature normalisation (``popscore.artifact``),
so this module only moves tensors: waveforms and features go to the device in one copy per batch.
"""

import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consumer.errors import DeviceUnavailable
from popscore.artifact import ArtifactMeta, StagedScoringModule, load, optimize_for_cpu

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceUnavailable(f"device {name!r} requested but this host has {count} GPU(s)")
    return device


# What a failing device says, whatever exception type carries it: TorchScript re-raises errors
# from inside the artifact as plain RuntimeErrors (torch.jit.Error).
_DEVICE_FAULTS = re.compile(
    r"CUDA error|CUBLAS_STATUS|CUFFT_|cuFFT error|CUDNN_STATUS|cuDNN error|nvrtc|NVRTC"
    r"|device-side assert|illegal memory access|ECC error|CUDA driver"
)
_OUT_OF_MEMORY = re.compile(r"out of memory", re.IGNORECASE)


def failure_kind(exc: BaseException) -> str | None:
    """``"device"`` for a failing device, ``"oom"`` for memory exhausted, else None (the
    events' fault, as far as anyone can tell)."""
    if isinstance(exc, torch.OutOfMemoryError) or _OUT_OF_MEMORY.search(str(exc)):
        return "oom"
    if isinstance(exc, torch.AcceleratorError) or _DEVICE_FAULTS.search(str(exc)):
        return "device"
    return None


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity, capped by the cgroup's CPU quota (a
    container's CPU limit, which neither ``os.cpu_count()`` nor the affinity reflects)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one we cannot read: no cap known
        pass
    return cores


def configure_cpu_threads() -> int:
    """Intra-op threads for torch's CPU work: half the usable cores (at least 1), unless
    ``OMP_NUM_THREADS`` says otherwise; the other half runs the decode pool and the other
    stages, which more intra-op threads would fight (docs/PERFORMANCE.md, "The CPU pass").
    Set on CUDA too: torch's default is every core of the host, not of the container."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        threads = int(explicit)
    else:
        threads = max(1, usable_cores() // 2)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("torch intra-op threads: %d", threads)
    return threads


# On CPU a batch runs through the artifact in slices of at most this many samples (~47 s at
# 22050 Hz), so the STFT output and the first conv stay in cache (docs/PERFORMANCE.md, "The CPU
# pass"); FusionNet.forward cuts the same way.
CPU_CHUNK_SAMPLES = 1 << 20


Rows = np.ndarray | Sequence[np.ndarray]
"""A batch as one [B, ...] array, or as its B rows (copied straight into the staging buffer)."""


class Staging:
    """One persistent host buffer per input, pinned on CUDA, that each batch is copied into
    once and then sent to the device asynchronously.

    ``np.stack`` then ``pin_memory`` made two full host copies of every batch, each into fresh
    memory (85 MB at 32 windows of 30 s: page faults on every batch, and a pinned allocation
    on CUDA). A buffer grows to the largest batch seen (the serving batch size after the
    warm-up) and never shrinks; on CPU the device tensor is the buffer itself.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._host: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        """Recorded after the last copies to the device: the buffers are not rewritten before
        those copies have read them."""

    def to_device(self, name: str, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """``rows`` copied into buffer ``name``, then onto the device (non-blocking from pinned
        memory). Call ``sent()`` once every input of the batch is on its way."""
        count = len(rows)
        shape = (count, *np.shape(rows[0])) if count else (0,)
        buffer = self._buffer(name, shape, dtype)
        if count:
            np.stack(list(rows), out=buffer.numpy())
        if self.device.type == "cpu":
            return buffer
        return buffer.to(self.device, non_blocking=self.pinned)

    def sent(self) -> None:
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            # On the copies' device (cuda:N), not the current one.
            self._copied.record(torch.cuda.current_stream(self.device))

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self._copied is not None:
            self._copied.synchronize()  # the last batch's copies may still read the buffers
            self._copied = None
        held = self._host.get(name)
        if (
            held is None
            or held.dtype != dtype
            or held.shape[1:] != shape[1:]
            or len(held) < shape[0]
        ):
            held = torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
            self._host[name] = held
        return held[: shape[0]]

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold."""
        return sum(t.numel() * t.element_size() for t in self._host.values())


@dataclass(frozen=True)
class Scores:
    """Per-item model outputs of one batch, as plain numpy on the host, and where its time
    went: ``frontend_s`` is the log-Mel frontend (None when the artifact does not expose it
    apart), ``total_s`` everything from host arrays to host arrays."""

    popularity: np.ndarray
    hit_probability: np.ndarray
    frontend_s: float | None = None
    total_s: float = 0.0


class Scorer:
    """Runs micro-batches through the artifact on one device."""

    def __init__(self, path: Path, device: str = "auto", optimize: bool = True) -> None:
        self.device = pick_device(device)
        configure_cpu_threads()
        artifact = load(path, self.device)
        self.optimize = optimize
        """Whether an optimised module was asked for (POPSCORE_CPU_OPTIMIZE)."""
        self.optimized = False
        """Whether it is served: on CPU, and only if it scores like the original."""
        if optimize and self.device.type == "cpu":
            fast = optimize_for_cpu(artifact)
            self.optimized = fast is not None
            artifact = fast or artifact
        self.module = artifact.module
        self._staged: StagedScoringModule | None = artifact.staged
        self.meta: ArtifactMeta = artifact.meta
        self.listens = artifact.uses_audio
        """Whether the artifact reads audio; when not, the audio is never fetched."""
        self._staging = Staging(self.device)
        self._lock = threading.Lock()  # one batch at a time through the staging buffers
        log.info(
            "model %s loaded on %s%s",
            self.meta.model_version,
            self.device,
            " (optimised for CPU)" if self.optimized else "",
        )

    def warm_up(self, batch_size: int, rounds: int = 2) -> float:
        """Score ``rounds`` silent batches of the serving shape, so the first real batch does
        not pay for TorchScript's profiling runs, the fuser's compilation or the CUDA caching
        allocator's first blocks; returns the first call's seconds."""
        n = max(1, batch_size)
        # As the pipeline feeds it: a features-only artifact gets one dummy sample per row.
        samples = round(self.meta.sample_rate * self.meta.clip_seconds) if self.listens else 1
        waves = np.zeros((n, samples), np.float32)
        feats = np.full((n, len(self.meta.features)), np.nan, dtype=np.float32)
        mask = np.full(n, self.listens, dtype=bool)
        first = self.score(waves, feats, mask).total_s
        for _ in range(rounds - 1):
            self.score(waves, feats, mask)
        return first

    def score(
        self,
        waveforms: Rows | torch.Tensor,
        features: Rows,
        audio_mask: Rows,
    ) -> Scores:
        """``waveforms[B, S]`` float32 (a host array or its rows, or a tensor already on the
        device, e.g. from ``BatchResampler``), ``features[B, F]`` float32 (NaN = missing),
        ``audio_mask[B]`` bool."""
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            if isinstance(waveforms, torch.Tensor):
                wave = waveforms.to(self.device)
            else:
                wave = self._staging.to_device("wave", waveforms, torch.float32)
            feats = self._staging.to_device("features", features, torch.float32)
            mask = self._staging.to_device("mask", audio_mask, torch.bool)
            self._staging.sent()
            if self._staged is not None:
                popularity, hit_logit, frontend_s = self._in_two_calls(
                    self._staged, wave, feats, mask
                )
            else:
                popularity, hit_logit = self.module(wave, feats, mask)
                frontend_s = None
            probability = torch.sigmoid(hit_logit)
            # Copies: on CPU an output could be a view of the staging buffer the next batch
            # rewrites (an artifact returning part of its input).
            popularity_host = popularity.float().cpu().numpy().copy()
            probability_host = probability.float().cpu().numpy().copy()
        return Scores(popularity_host, probability_host, frontend_s, time.perf_counter() - start)

    def free_memory(self) -> None:
        """Give cached device memory back (after an out-of-memory error)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def staged(self) -> bool:
        """Whether the artifact's frontend is timed apart (it exports spectrogram() and
        score_spectrogram()); otherwise it runs as one forward()."""
        return self._staged is not None

    def _in_two_calls(
        self,
        module: StagedScoringModule,
        wave: torch.Tensor,
        feats: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """forward() as frontend then network, per cache-sized slice on CPU, timing the first."""
        rows = wave.size(0)
        if self.device.type == "cpu" and self.listens:
            step = max(1, CPU_CHUNK_SAMPLES // max(1, wave.size(1)))
        else:
            step = max(1, rows)  # a features-only model scores the batch in one call
        frontend_s = 0.0
        pops: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the waveform copy is not frontend time
        for lo in range(0, rows, step):
            t0 = time.perf_counter()
            logmel = module.spectrogram(wave[lo : lo + step])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # kernels are async: wait to time them
            frontend_s += time.perf_counter() - t0
            pop, logit = module.score_spectrogram(
                logmel, feats[lo : lo + step], mask[lo : lo + step]
            )
            pops.append(pop)
            logits.append(logit)
        return torch.cat(pops), torch.cat(logits), frontend_s
