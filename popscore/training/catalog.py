"""Catalogs as users keep them: one row per track, in Parquet or CSV, read in batches.

    for rows in read_catalog(Path("tracks.parquet"), audio_column="audio_uri"):
        rows.events[i], rows.popularity[i], rows.groups[i], rows.audio[i]

A row holds ReleaseEvent fields in any of three spellings: the flat columns of Spotify's API
export (`artist_popularity`, `duration_ms`, ...: `CSV_COLUMNS`), dotted ReleaseEvent
paths (`artist.popularity`), or, in Parquet, struct columns named after ReleaseEvent's groups
(`artist: {popularity, followers, ...}`). Besides: a `popularity` label, an `artist` (or any
`group` column) that keeps an artist's tracks in one fold, and optionally an audio column
holding a path (relative to the catalog) or a `file://`, `http(s)://` or `s3://` URI.

Memory is one batch of rows whatever the catalog's size: Parquet is read with pyarrow's
`iter_batches`, CSV line by line.
"""

from __future__ import annotations

import csv
import itertools
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popscore.artifact.features import AUDIO_FEATURE_NAMES

# CSV column -> dotted ReleaseEvent path. Columns absent from a file are simply missing.
# A change to how a row maps to ReleaseEvent fields changes the feature rules: bump
# popscore.artifact.features.FEATURE_RULES with it (prepared caches then refuse the old rows).
CSV_COLUMNS: dict[str, str] = {
    "name": "release.title",
    "artist": "artist.name",
    "artist_popularity": "artist.popularity",
    "artist_followers": "artist.followers",
    "release_date": "release.date",
    "duration_ms": "release.duration_ms",
    "explicit": "release.explicit",
    **{name: f"audio_features.{name}" for name in AUDIO_FEATURE_NAMES},
}
GROUPS = ("artist", "release", "audio_features", "engagement")
TEXT_PATHS = frozenset({"release.date", "release.title", "artist.name", "artist.id"})
URI_SCHEMES = ("file", "http", "https", "s3")
BATCH_ROWS = 4096


@dataclass(frozen=True)
class CatalogRows:
    """One batch of catalog rows; `first` is the catalog row number of the batch's first."""

    first: int
    events: list[dict[str, Any]]  # ReleaseEvent-shaped
    popularity: np.ndarray  # float32 label per row
    groups: list[str]  # the fold group (artist) per row
    audio: list[str | None]  # a URI per row (paths made file:// URIs), None when absent


def catalog_rows(path: Path) -> int:
    """How many rows the catalog holds (Parquet: from its footer; CSV: one pass of lines)."""
    if _is_parquet(path):
        import pyarrow.parquet as pq  # noqa: PLC0415 (a training-only dependency)

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open(newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def read_catalog(
    path: Path,
    audio_column: str | None = None,
    target: str = "popularity",
    group: str = "artist",
    batch_rows: int = BATCH_ROWS,
) -> Iterator[CatalogRows]:
    """The catalog's rows in batches; ValueError naming the problem for a missing column or an
    unusable label."""
    records = _parquet_records(path, batch_rows) if _is_parquet(path) else _csv_records(path)
    first = 0
    for batch in _batched(records, batch_rows):
        if first == 0:
            _check_columns(path, batch[0], (target, group, audio_column))
        yield _rows(path, first, batch, audio_column, target, group)
        first += len(batch)
    if first == 0:
        raise ValueError(f"{path}: no rows")


def row_event(record: Mapping[str, Any]) -> dict[str, Any]:
    """One catalog record (flat, dotted or struct columns) -> a ReleaseEvent-shaped dict."""
    event: dict[str, Any] = {}
    for column, raw in record.items():
        if isinstance(raw, Mapping) and column in GROUPS:  # a Parquet struct column
            for field, value in raw.items():
                _put(event, f"{column}.{field}", value)
        elif column in CSV_COLUMNS:
            _put(event, CSV_COLUMNS[column], raw)
        elif column.count(".") == 1 and column.split(".")[0] in GROUPS:
            _put(event, column, raw)
    return event


def _put(event: dict[str, Any], path: str, raw: Any) -> None:
    value = _value(raw, keep_text=path in TEXT_PATHS)
    if value is None:
        return
    group, field = path.split(".")
    event.setdefault(group, {})[field] = value


def _value(raw: Any, keep_text: bool) -> Any:
    # CSV gives text; Parquet gives typed values, kept as they are.
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return None
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if not text:
        return None
    return text if keep_text else _number(text)


def _number(text: str) -> float | int | bool | None:
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def audio_uri(raw: Any, base: Path) -> str | None:
    """A catalog's audio cell -> a URI: a URI stays as it is, a path (relative to the catalog's
    folder) becomes an absolute file:// URI; empty -> None."""
    if raw is None or not str(raw).strip():
        return None
    text = str(raw).strip()
    if urllib.parse.urlsplit(text).scheme.lower() in URI_SCHEMES:
        return text
    path = Path(text)
    return (path if path.is_absolute() else base / path).resolve().as_uri()


def _rows(
    path: Path,
    first: int,
    batch: list[dict[str, Any]],
    audio_column: str | None,
    target: str,
    group: str,
) -> CatalogRows:
    popularity = np.empty(len(batch), dtype=np.float32)
    for i, record in enumerate(batch):
        label = _value(record.get(target), keep_text=False)
        if not isinstance(label, int | float) or not 0 <= label <= 100:
            raise ValueError(
                f"{path}: row {first + i}: {target} {record.get(target)!r} "
                "is not a number in 0..100"
            )
        popularity[i] = label
    return CatalogRows(
        first=first,
        events=[row_event(record) for record in batch],
        popularity=popularity,
        groups=[_group(record.get(group)) for record in batch],
        audio=[_audio(record, audio_column, path.parent) for record in batch],
    )


def _audio(record: Mapping[str, Any], column: str | None, base: Path) -> str | None:
    return audio_uri(record.get(column), base) if column else None


def _group(raw: Any) -> str:
    # A struct artist column groups by its id, else its name.
    if isinstance(raw, Mapping):
        raw = raw.get("id") or raw.get("name")
    return "" if raw is None else str(raw)


def _check_columns(path: Path, record: Mapping[str, Any], needed: tuple[str | None, ...]) -> None:
    missing = [c for c in needed if c and c not in record]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in {".parquet", ".pq"}


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _parquet_records(path: Path, batch_rows: int) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # noqa: PLC0415 (a training-only dependency)

    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def _batched(records: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(itertools.islice(records, size)):
        yield batch
