"""The benchmark corpus: synthetic releases with real audio files, cached between runs.

Encoding a 4-minute MP3 takes seconds, so ``unique_files`` files are synthesized once (cached
under ``.bench/corpus/<key>/``) and the events cycle over them; every event is still decoded
from its file, so the work per event is the same as with distinct files.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from popscore.training.synthetic import (
    FFMPEG_FORMATS,
    FILE_SUFFIXES,
    release_event,
    sample_track,
    synth_audio,
    write_audio,
)
from schemas.events import ReleaseEvent


class CorpusError(Exception):
    """The corpus cannot be built (e.g. a folder of real audio holds none)."""


DEFAULT_ROOT = Path(".bench/corpus")


def corpus_dir(
    root: Path, fmt: str, rate: int, channels: int, lo: float, hi: float, unique: int, seed: int
) -> Path:
    """The cache folder of one corpus."""
    return root / f"{fmt.lower()}-{rate}hz-{channels}ch-{lo:g}-{hi:g}s-{unique}x-seed{seed}"


def build(
    root: Path,
    fmt: str,
    rate: int,
    channels: int,
    min_seconds: float,
    max_seconds: float,
    unique: int,
    seed: int = 0,
    workers: int = 2,
) -> list[Path]:
    """The corpus's audio files, synthesizing the ones not cached yet."""
    fmt = fmt.upper()
    folder = corpus_dir(root, fmt, rate, channels, min_seconds, max_seconds, unique, seed)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(min_seconds, max_seconds, size=unique)
    paths = [(folder / f"track-{i:03d}{FILE_SUFFIXES[fmt]}").resolve() for i in range(unique)]

    def make(i: int) -> None:
        path = paths[i]
        if path.is_file():
            return
        track_rng = np.random.default_rng([seed, i])
        params = sample_track(track_rng).params
        audio = synth_audio(track_rng, float(seconds[i]), rate, channels, params)
        partial = path.with_suffix(".partial" + path.suffix)
        write_audio(partial, audio, rate, fmt)
        partial.rename(path)

    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        with ThreadPoolExecutor(workers) as pool:
            jobs = pool.map(make, missing)
            list(tqdm(jobs, total=len(missing), desc=f"synthesize {fmt} corpus", unit="file"))
    return paths


def from_dir(folder: Path) -> tuple[list[Path], dict[str, Any]]:
    """Every audio file directly in ``folder`` (real music, used as it is) and the Workload
    fields describing them: formats, length range, the most common rate and channel count."""
    paths = sorted(
        p.resolve()
        for p in folder.iterdir()
        if p.is_file() and p.suffix.upper()[1:] in FILE_SUFFIXES
    )
    if not paths:
        raise CorpusError(f"no audio files ({', '.join(FILE_SUFFIXES)}) in {folder}")
    seconds, rates, channels = zip(*(_info(path) for path in paths), strict=True)
    return paths, {
        "audio_format": ",".join(sorted({p.suffix.upper()[1:] for p in paths})),
        "clip_seconds": None,
        "min_seconds": round(min(seconds), 2),
        "max_seconds": round(max(seconds), 2),
        "sample_rate": Counter(rates).most_common(1)[0][0],
        "channels": max(channels),
        "unique_files": len(paths),
        "source": str(folder),
    }


def _info(path: Path) -> tuple[float, int, int]:
    """A file's length in seconds, sample rate and channels, as its decoder states them."""
    if path.suffix.upper()[1:] in FFMPEG_FORMATS:
        return _ffmpeg_info(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise CorpusError(f"{path}: {exc}") from None
    return info.duration, info.samplerate, info.channels


def _ffmpeg_info(path: Path) -> tuple[float, int, int]:
    import av  # noqa: PLC0415 (FFmpeg: only for a folder holding such files)

    try:
        with av.open(str(path)) as container:
            context = container.streams.audio[0].codec_context
            return (container.duration or 0) / 1e6, context.sample_rate, context.channels
    except (av.FFmpegError, IndexError) as exc:
        raise CorpusError(f"{path}: {exc}") from None


def events(paths: list[Path], n: int, seed: int, run_id: str) -> list[ReleaseEvent]:
    """n events cycling over the files, with synthetic features (emitted_at is set at send)."""
    return [
        release_event(
            sample_track(np.random.default_rng([seed, 1_000_000 + i])),
            f"bench-{run_id}-{i:05d}",
            paths[i % len(paths)].as_uri(),
        )
        for i in range(n)
    ]


def stamped(event: ReleaseEvent) -> bytes:
    """The event's wire bytes with ``emitted_at`` = now (the moment it is sent)."""
    return event.model_copy(update={"emitted_at": datetime.now(UTC)}).encode()
