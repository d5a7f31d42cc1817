"""Mode (a), the compute ceiling: decode + resample + frontend + model, no Kafka or Redis.

Decode runs on the same thread pool as in the service, one batch ahead of inference (as the
service's prepare and device stages overlap), so the wall time is the best the service could do.
"""

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from bench.stats import ModeResult, peak_rss_mb, reset_peak_rss
from consumer.audio import AudioPolicy, Resampler, decode_window, open_uri
from consumer.device import Scorer
from schemas.events import ReleaseEvent
from training.features import extract

LOOKAHEAD = 2
REPEATS = 3
_Loaded = tuple[np.ndarray, np.ndarray, float, float, float]


def run(
    scorer: Scorer,
    policy: AudioPolicy,
    events: list[ReleaseEvent],
    batch_size: int,
    workers: int,
) -> ModeResult:
    """Score every event in batches; per-stage seconds per event and per-batch wall time."""
    meta = scorer.meta
    resampler = Resampler(meta.sample_rate, meta.clip_seconds)

    def load(event: ReleaseEvent) -> _Loaded:
        t0 = time.perf_counter()
        clip = decode_window(open_uri(event.audio_uri, policy), meta.clip_seconds, policy)
        t1 = time.perf_counter()
        wave = resampler(clip)
        t2 = time.perf_counter()
        feats = extract(event.model_dump(), meta.features)
        return wave, feats, t1 - t0, t2 - t1, time.perf_counter() - t2

    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    # Warm-up (kernel caches, TorchScript's profiling executor) outside the measurement.
    stages = _stage_breakdown(scorer, load, events[: min(len(events), batch_size, 16)])
    reset_peak_rss()
    latencies: list[float] = []
    batch_walls: list[float] = []
    bar = tqdm(total=len(events), desc="compute ceiling", unit="event")
    start = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="bench-decode") as pool:
        # Decode streams through the pool up to LOOKAHEAD batches ahead of inference, as the
        # service's prepare stage runs ahead of its device stage.
        queued: list[tuple[float, list[Future[_Loaded]]]] = []
        for k, batch in enumerate(batches):
            while len(queued) < LOOKAHEAD and len(queued) + k < len(batches):
                nxt = batches[k + len(queued)]
                queued.append((time.perf_counter(), [pool.submit(load, e) for e in nxt]))
            began, futures = queued.pop(0)
            loaded = [f.result() for f in futures]
            waves = np.stack([item[0] for item in loaded])
            feats = np.stack([item[1] for item in loaded])
            scorer.score(waves, feats, np.ones(len(loaded), dtype=bool))
            done = time.perf_counter()
            latencies += [done - began] * len(loaded)
            batch_walls.append(done - began)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    bar.close()
    n = len(events)
    return ModeResult(
        mode="compute",
        events=n,
        seconds=seconds,
        latencies_s=latencies,
        peak_rss_mb=peak_rss_mb(),
        stage_s_per_event=stages,
        notes={
            # One full batch's compute at the ceiling rate (for the latency target).
            "batch_compute_s": round(batch_size * seconds / n, 4),
            "stages": "measured serially, one event at a time, then one batch on the device",
            "latency": "per event: its batch's decode start to its scores",
        },
    )


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
