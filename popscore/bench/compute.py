"""Mode (a), the compute ceiling: decode + resample + frontend + model, no Kafka or Redis; and
the decode floor: fetch + decode of the window alone, on the same pool.

Decode runs on a pool one batch ahead of inference (as the service's prepare and device stages
overlap), so the wall time is the best the service could do. The pool is threads, as in the
service (libsndfile and torch release the GIL), or, to measure the alternative, processes.
"""

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from consumer.audio import AudioPolicy, decode_window, lower_decode_thread_priority, open_uri
from consumer.device import Scorer
from consumer.resample import BatchResampler, Resampler
from consumer.soxr_resample import SoxrResampler
from popscore.artifact.features import extract
from popscore.bench.stats import ModeResult, peak_rss_mb, reset_peak_rss
from schemas.events import ReleaseEvent

LOOKAHEAD = 2
REPEATS = 3
POOLS = ("thread", "process")
_Loaded = tuple[Any, np.ndarray, float, float, float]  # (waveform or Clip, features, times)


@dataclass(frozen=True)
class Loader:
    """Fetch + decode the window + resample + features of one event (picklable: a process
    pool's workers each build their own resampler on first use)."""

    policy: AudioPolicy
    sample_rate: int
    clip_seconds: float
    features: tuple[str, ...]
    resample: bool = True  # False: the decoded window as it is, for a BatchResampler

    def __call__(self, event: ReleaseEvent) -> _Loaded:
        resampler = _resampler(self.sample_rate, self.clip_seconds)
        t0 = time.perf_counter()
        clip = decode_window(open_uri(event.audio_uri, self.policy), self.clip_seconds, self.policy)
        t1 = time.perf_counter()
        wave = resampler(clip) if self.resample else clip
        t2 = time.perf_counter()
        feats = extract(event.model_dump(), self.features)
        return wave, feats, t1 - t0, t2 - t1, time.perf_counter() - t2


_RESAMPLERS: dict[tuple[int, float], Resampler] = {}


def _resampler(sample_rate: int, clip_seconds: float) -> Resampler:
    # One per process (threads share it, as the service's pool does).
    key = (sample_rate, clip_seconds)
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = SoxrResampler(sample_rate, clip_seconds)
    return _RESAMPLERS[key]


def _worker_init() -> None:
    # Each worker process decodes one event at a time: one intra-op thread, like a pool thread.
    torch.set_num_threads(1)


def _pool(kind: str, workers: int) -> Executor:
    if kind == "process":
        # spawn, not fork: forking a process whose OpenMP/torch threads already run can hang.
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
    # Below the scoring thread, as the service's decode pool runs.
    return ThreadPoolExecutor(
        workers, thread_name_prefix="bench-decode", initializer=lower_decode_thread_priority
    )


def run(
    scorer: Scorer,
    policy: AudioPolicy,
    events: list[ReleaseEvent],
    batch_size: int,
    workers: int,
    pool_kind: str = "thread",
    batch_resampler: BatchResampler | None = None,
) -> ModeResult:
    """Score every event in batches; per-stage seconds per event and per-batch wall time.
    With ``batch_resampler``, the pool only decodes and the batch is resampled on the device
    (as the service does with POPSCORE_RESAMPLE_ON=device)."""
    meta = scorer.meta
    load = Loader(policy, meta.sample_rate, meta.clip_seconds, meta.features)
    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    # Warm-up (kernel caches, TorchScript's profiling executor) outside the measurement.
    stages = _stage_breakdown(scorer, load, events[: min(len(events), batch_size, 16)])
    latencies: list[float] = []
    batch_walls: list[float] = []
    frontend_s = 0.0
    if batch_resampler is not None:
        load = Loader(policy, meta.sample_rate, meta.clip_seconds, meta.features, resample=False)
    with _pool(pool_kind, workers) as pool:
        # Worker processes start (and import torch) here, outside the measurement.
        list(pool.map(load, events[: 2 * workers]))
        reset_peak_rss()
        bar = tqdm(total=len(events), desc=f"compute ceiling ({pool_kind}s)", unit="event")
        start = time.perf_counter()
        # Decode streams through the pool up to LOOKAHEAD batches ahead of inference, as the
        # service's prepare stage runs ahead of its device stage.
        queued: list[tuple[float, list[Future[_Loaded]]]] = []
        for k, batch in enumerate(batches):
            while len(queued) < LOOKAHEAD and len(queued) + k < len(batches):
                nxt = batches[k + len(queued)]
                queued.append((time.perf_counter(), [pool.submit(load, e) for e in nxt]))
            began, futures = queued.pop(0)
            loaded = [f.result() for f in futures]
            t0 = time.perf_counter()
            waves: np.ndarray | torch.Tensor
            if batch_resampler is None:
                waves = np.stack([item[0] for item in loaded])
            else:
                waves = batch_resampler([item[0] for item in loaded])
            resample_s = time.perf_counter() - t0 if batch_resampler is not None else 0.0
            feats = np.stack([item[1] for item in loaded])
            scores = scorer.score(waves, feats, np.ones(len(loaded), dtype=bool))
            frontend_s += (scores.frontend_s or 0.0) + resample_s
            done = time.perf_counter()
            latencies += [done - began] * len(loaded)
            batch_walls.append(done - began)
            bar.update(len(batch))
        seconds = time.perf_counter() - start
        bar.close()
        workers_rss = _workers_peak_rss_mb(pool)
    n = len(events)
    notes: dict[str, Any] = {
        # One full batch's compute at the ceiling rate (for the latency target).
        "batch_compute_s": round(batch_size * seconds / n, 4),
        "decode_pool": pool_kind,
        "resample_on": "pool" if batch_resampler is None else "device",
        "frontend_share_of_wall": round(frontend_s / seconds, 3),
        "stages": "measured serially, one event at a time, then one batch on the device",
        "latency": "per event: its batch's decode start to its scores",
    }
    if workers_rss is not None:
        notes["worker_processes_peak_rss_mb"] = workers_rss
    return ModeResult(
        mode="compute" if pool_kind == "thread" else f"compute_{pool_kind}",
        events=n,
        seconds=seconds,
        latencies_s=latencies,
        peak_rss_mb=peak_rss_mb(),
        stage_s_per_event=stages,
        notes=notes,
    )


def decode_floor(
    policy: AudioPolicy, events: list[ReleaseEvent], clip_seconds: float, workers: int
) -> ModeResult:
    """Fetch + decode of each event's window and nothing else, on a pool of ``workers``
    threads (the service's decode pool): the most events/s this machine's decoding allows,
    which no other mode can beat. Latency: each event's own fetch + decode."""

    def one(event: ReleaseEvent) -> float:
        t0 = time.perf_counter()
        decode_window(open_uri(event.audio_uri, policy), clip_seconds, policy)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(workers, thread_name_prefix="bench-decode") as pool:
        list(pool.map(one, events[: 2 * workers]))  # warm-up: page cache, codec tables
        reset_peak_rss()
        bar = tqdm(total=len(events), desc="decode floor", unit="event")
        start = time.perf_counter()
        latencies = []
        for took in pool.map(one, events):
            latencies.append(took)
            bar.update(1)
        seconds = time.perf_counter() - start
        bar.close()
    return ModeResult(
        mode="decode",
        events=len(events),
        seconds=seconds,
        latencies_s=latencies,
        peak_rss_mb=peak_rss_mb(),
        notes={"latency": "per event: its fetch + decode of the window", "threads": workers},
    )


def _workers_peak_rss_mb(pool: Executor) -> float | None:
    """Summed peak RSS of a process pool's workers (VmHWM), which the parent's does not hold."""
    processes = getattr(pool, "_processes", None)
    if not isinstance(pool, ProcessPoolExecutor) or not processes:
        return None
    total = 0.0
    for pid in processes:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return round(total, 1)


def _stage_breakdown(
    scorer: Scorer, load: "Callable[[ReleaseEvent], _Loaded]", events: list[ReleaseEvent]
) -> dict[str, float]:
    """Per-stage seconds per event, without concurrency: decode, resample and features one
    event at a time, then the whole forward pass, and the frontend alone, on one batch."""
    load(events[0])
    loaded = [load(e) for e in events]
    waves = np.stack([item[0] for item in loaded])
    feats = np.stack([item[1] for item in loaded])
    mask = np.ones(len(loaded), dtype=bool)
    scorer.score(waves, feats, mask)
    best = min((scorer.score(waves, feats, mask) for _ in range(REPEATS)),
               key=lambda s: s.total_s)  # the best of a few: the machine may be shared  # fmt: skip
    n = len(loaded)
    stages = {
        "decode": sum(item[2] for item in loaded) / n,
        "resample": sum(item[3] for item in loaded) / n,
        "features": sum(item[4] for item in loaded) / n,
        # One batch through the artifact (host arrays to host arrays)...
        "frontend_and_model": best.total_s / n,
    }
    if best.frontend_s is not None:
        # ...split as the service times it: the log-Mel frontend, then the network with the
        # host<->device copies (an artifact without the two-call form is only timed whole).
        stages["frontend"] = best.frontend_s / n
        stages["model"] = (best.total_s - best.frontend_s) / n
    return stages
