"""Training at catalog scale (issue 14's benchmark): prepare a synthetic catalog's audio and
stream one epoch from the cache, at several catalog sizes, measuring time and the peak RSS of
the whole process tree (the trainer, its decode workers and its DataLoader workers).

    python -m popscore.bench.training --tracks 4000 20000 --work /data/bench \\
        --json bench/results/train-scale-cpu-2core.json

The catalog's rows point at `--unique` distinct 30 s FLAC files, reused in turn: every row is
still decoded, resampled and written to the cache on its own (a cache row per catalog row),
so preparation and training do the full work per row, while generating the sources stays
cheap. The same files are decoded by the service's own `load_clip` on one thread first: the
per-core rate preparation is compared with.
"""

import argparse
import json
import os
import platform
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from consumer.audio import AudioPolicy, load_clip
from consumer.soxr_resample import SoxrResampler
from popscore.training.cache import prepare, read_table
from popscore.training.data import PAPER_FEATURES
from popscore.training.evaluate import FUSION
from popscore.training.stream import CachedClips, Stream, train_stream
from popscore.training.synthetic import sample_track, synth_audio, write_audio

RATE, SECONDS, SOURCE_RATE = 22050, 30.0, 44100


def make_sources(
    directory: Path, unique: int, seed: int
) -> list[tuple[Path, dict[str, Any], float]]:
    """`unique` SYNTHETIC 30 s stereo FLAC files at 44.1 kHz, with their features and label."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(unique):
        rng = np.random.default_rng([seed, i])  # per file: a rerun reuses what is written
        track = sample_track(rng)
        path = directory / f"s{i:05d}.flac"
        if not path.exists():
            write_audio(
                path, synth_audio(rng, SECONDS, SOURCE_RATE, 2, track.params), SOURCE_RATE, "FLAC"
            )
        sources.append((path, track.features, track.popularity))
    return sources


def make_catalog(
    path: Path, tracks: int, sources: list[tuple[Path, dict[str, Any], float]]
) -> Path:
    """A Parquet catalog of `tracks` rows, each naming one of `sources` in turn."""
    records = []
    for i in range(tracks):
        audio, features, popularity = sources[i % len(sources)]
        artist = dict(features.get("artist", {}))
        artist["name"] = f"artist-{i // 10}"  # 10 tracks per artist
        records.append(
            {
                "popularity": popularity,
                "artist": artist,
                "audio_features": features.get("audio_features", {}),
                "audio": str(audio),
            }
        )
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def service_rate(files: list[Path], policy: AudioPolicy) -> float:
    """Clips per second of the service's intake (load_clip) on one thread: the per-core rate."""
    torch.set_num_threads(1)
    resampler = SoxrResampler(RATE, SECONDS)
    load_clip(files[0].as_uri(), policy, resampler)  # warm: the resample kernel
    started = time.perf_counter()
    for path in files:
        load_clip(path.as_uri(), policy, resampler)
    torch.set_num_threads(os.cpu_count() or 1)
    return len(files) / (time.perf_counter() - started)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def tree_rss_mb(pid: int) -> float:
    """Sum of VmRSS over `pid` and all its descendants (shared pages count once per process,
    so this over- rather than under-states)."""
    total = 0
    for member in _tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


class PeakTreeRss(threading.Thread):
    """The largest tree_rss_mb of this process, sampled every `interval_s` until stopped."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, tree_rss_mb(os.getpid()))

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak_mb


def one_size(
    work: Path,
    tracks: int,
    sources: list[tuple[Path, dict[str, Any], float]],
    workers: int,
    loaders: int,
) -> dict[str, Any]:
    catalog = make_catalog(work / f"catalog-{tracks}.parquet", tracks, sources)
    cache = work / f"cache-{tracks}"
    policy = AudioPolicy.create((work,))
    sampler = PeakTreeRss()
    sampler.start()
    started = time.perf_counter()
    prepare(
        catalog,
        "audio",
        cache,
        policy,
        PAPER_FEATURES,
        RATE,
        SECONDS,
        workers=workers,
        progress=False,
    )
    prepare_s = time.perf_counter() - started
    prepare_peak = sampler.stop()
    table = read_table(cache)
    clips = CachedClips(cache, table, np.arange(len(table.rows)), round(6.0 * RATE), True)
    torch.manual_seed(0)
    net = FUSION.build(PAPER_FEATURES, RATE, 0)
    sampler = PeakTreeRss()
    sampler.start()
    started = time.perf_counter()
    loss = train_stream(
        net, clips, replace(FUSION.config, epochs=1), Stream(workers=loaders), progress=False
    )
    train_s = time.perf_counter() - started
    train_peak = sampler.stop()
    return {
        "tracks": tracks,
        "prepare_s": round(prepare_s, 1),
        "prepare_tracks_per_s": round(tracks / prepare_s, 2),
        "prepare_peak_tree_rss_mb": round(prepare_peak),
        "cache_bytes": sum(p.stat().st_size for p in cache.iterdir()),
        "train_epoch_s": round(train_s, 1),
        "train_clips_per_s": round(tracks / train_s, 2),
        "train_peak_tree_rss_mb": round(train_peak),
        "train_loss": loss,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popscore.bench.training")
    parser.add_argument("--tracks", type=int, nargs="+", default=[4000, 20000])
    parser.add_argument("--unique", type=int, default=200, help="distinct source files")
    parser.add_argument(
        "--work", type=Path, required=True, help="a folder with room for the caches"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--loaders", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    args.work = args.work.resolve()  # the sources are named by file:// URIs
    sources = make_sources(args.work / "sources", args.unique, seed=0)
    per_core = service_rate([s[0] for s in sources], AudioPolicy.create((args.work,)))
    sizes = [one_size(args.work, n, sources, args.workers, args.loaders) for n in args.tracks]
    for size in sizes:
        size["prepare_over_service_per_core"] = round(
            size["prepare_tracks_per_s"] / (per_core * args.workers), 3
        )
    report = {
        "machine": {
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
        "workload": {
            "clip_seconds": SECONDS,
            "sample_rate": RATE,
            "source": "FLAC 44.1 kHz stereo",
            "unique_sources": args.unique,
            "decode_workers": args.workers,
            "loader_workers": args.loaders,
            "model": "FUSION (FusionNet defaults), 6 s crops, batch 32",
        },
        "service_decode_per_core_tracks_per_s": round(per_core, 2),
        "sizes": sizes,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
