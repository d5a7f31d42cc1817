"""Tables of tracks for training and evaluation: a Spotify-API CSV, or SYNTHETIC tracks.

A catalog row becomes a ReleaseEvent-shaped dict first (`catalog.row_event`), and its feature row
comes from `popscore.artifact.extract` on that dict: the very function the consumer calls on
a live event, so a model trained here reads serving's features in the same way.

The paper's data lives outside the repository (`PAPER_CSV`, ../shared/data); it is never
copied in, and whatever needs it skips when it is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from popscore.artifact.features import (
    DEFAULT_FEATURES,
    TITLE_FEATURES,
    extract,
)
from popscore.training.cache import CachedTable, read_table
from popscore.training.catalog import read_catalog
from popscore.training.synthetic import sample_track, synth_audio

# popscore/training/data.py -> the repository's parent, where shared/ sits beside it.
PAPER_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "paper_tracks.csv"

# What the paper's CSV can feed: the 10 audio descriptors it has, artist popularity,
# followers (log1p inside the model), track length, the derived release year and the version
# flags read from the title (remix, live, ...).
PAPER_FEATURES: tuple[str, ...] = (
    "artist.popularity",
    "artist.followers",
    "release.year",
    "release.duration_ms",
    *(
        f"audio_features.{name}"
        for name in (
            "acousticness",
            "danceability",
            "energy",
            "instrumentalness",
            "liveness",
            "loudness",
            "speechiness",
            "tempo",
            "time_signature",
            "valence",
        )
    ),
    *TITLE_FEATURES,
)


def without(paths: Sequence[str], dropped: Sequence[str]) -> tuple[str, ...]:
    """`paths` less every one that is, or sits under, an entry of `dropped` ("release.title"
    drops the title flags); an entry that matches nothing is a ValueError naming it."""

    def under(path: str, prefix: str) -> bool:
        return path == prefix or path.startswith(prefix + ".")

    unknown = [d for d in dropped if not any(under(p, d) for p in paths)]
    if unknown:
        raise ValueError(f"no feature {', '.join(unknown)} among {', '.join(paths)}")
    return tuple(p for p in paths if not any(under(p, d) for d in dropped))


@dataclass(frozen=True)
class TrackTable:
    """Rows of tracks: feature matrix [n, F] (NaN = missing), popularity [n], group per row."""

    features: np.ndarray
    popularity: np.ndarray
    groups: np.ndarray  # artist per row: no artist may sit in two folds
    feature_paths: tuple[str, ...]
    source: str
    audio_paths: tuple[str | None, ...] | None = None  # per row, when the data names files
    waveforms: np.ndarray | None = None  # [n, S] mono clips at the model's rate, when loaded
    audio_mask: np.ndarray | None = None  # [n] bool: False where a row's clip is absent
    synthetic: bool = False  # generated rows (training.synthetic), not real releases
    cached: CachedTable | None = None  # audio on disk (training.cache) instead of `waveforms`

    def __post_init__(self) -> None:
        n = len(self.popularity)
        if self.features.shape != (n, len(self.feature_paths)) or len(self.groups) != n:
            raise ValueError("features, popularity and groups disagree on the number of rows")
        if self.audio_paths is not None and len(self.audio_paths) != n:
            raise ValueError("audio_paths must have one entry per row")


def _audio_path(raw: str | None, base: Path) -> str | None:
    if raw is None or not raw.strip():
        return None
    path = Path(raw.strip())
    return str(path if path.is_absolute() else base / path)


def load_catalog(
    path: str | Path,
    feature_paths: Sequence[str] = PAPER_FEATURES,
    target: str = "popularity",
    group: str = "artist",
    audio_column: str | None = None,
) -> TrackTable:
    """A catalog (CSV or Parquet: training.catalog) -> TrackTable of its features, read in
    batches; `audio_paths` holds each row's audio URI (paths made file:// URIs)."""
    path = Path(path)
    features, popularity, groups, audio = [], [], [], []
    for rows in read_catalog(path, audio_column, target, group):
        features += [extract(event, feature_paths) for event in rows.events]
        popularity.append(rows.popularity)
        groups += rows.groups
        audio += rows.audio
    uris = tuple(audio) if audio_column else None
    return TrackTable(np.stack(features), np.concatenate(popularity), np.array(groups),
                      tuple(feature_paths), str(path), uris)  # fmt: skip


def cached_table(directory: Path, source: str) -> TrackTable:
    """The rows of a prepared cache (training.cache): features and labels in memory, the audio
    left on disk for training.stream to read."""
    cached = read_table(directory)
    return TrackTable(
        cached.features, cached.popularity, cached.groups, cached.manifest.feature_paths,
        source, None, None, cached.audio_ok, cached=cached,
    )  # fmt: skip


def synthetic_table(
    n: int,
    seed: int,
    seconds: float,
    sample_rate: int,
    feature_paths: Sequence[str] = DEFAULT_FEATURES,
) -> TrackTable:
    """n SYNTHETIC tracks (training.synthetic) with audio; grouped by their synthetic artist."""
    rng = np.random.default_rng(seed)
    samples = round(seconds * sample_rate)
    waveforms = np.empty((n, samples), dtype=np.float32)
    features = np.empty((n, len(feature_paths)), dtype=np.float32)
    popularity = np.empty(n, dtype=np.float32)
    groups = []
    for i in tqdm(range(n), desc="synthesizing", unit="track"):
        track = sample_track(rng)
        waveforms[i] = synth_audio(rng, seconds, sample_rate, 1, track.params)[:samples, 0]
        features[i] = extract(track.features, feature_paths)
        popularity[i] = track.popularity
        groups.append(str(track.features.get("artist", {}).get("id", f"unknown-{i}")))
    return TrackTable(
        features, popularity, np.array(groups), tuple(feature_paths),
        f"synthetic(n={n}, seed={seed})", None, waveforms, np.ones(n, dtype=bool), True,
    )  # fmt: skip
