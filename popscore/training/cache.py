"""A catalog's audio, prepared once: each track's window decoded with the service's own intake
(`consumer.audio.load_clip`: URI policy, fetch, centred window, mono, resample) in parallel
worker processes, into shards on disk that training and evaluation stream from.

    manifest = prepare(Path("tracks.parquet"), "audio_uri", Path("tracks.cache"), policy)
    table = read_table(Path("tracks.cache"))       # labels, groups, features: no audio

The layout of DIR, and why these formats:

    manifest.json        what the cache holds and from which catalog, under which feature-
                         extraction rules (a changed catalog, setting or rule is refused,
                         not silently mixed in)
    shard-00000.npy      float16 [rows, clip_samples], NumPy's .npy format: every row is one
                         contiguous slice at a computable offset, so a training crop is one
                         `pread` of just its bytes, in any order (grouped folds need random
                         access by row, which sequential tar shards such as WebDataset do not
                         give), and nothing stays mapped into the process (a memory-mapped
                         Arrow file would count every page it touched in the reader's RSS).
                         float16: half the disk and I/O of float32, and its 11-bit mantissa
                         (relative error 2^-11, ~66 dB) is far below what a log-Mel frontend
                         resolves.
    shard-00000.parquet  one row per track: catalog `row`, `popularity`, `group`, `features`
                         (list<float32>, NaN = missing), `audio_ok`, `reason` — small, typed,
                         columnar, readable by pandas or DuckDB. Written last: a shard whose
                         .parquet exists is complete, so a rerun skips it (resumable) and
                         decodes only its failed rows again (a file added since).
    complete.json        written last by a finished prepare (shards, rows, failures): a folder
                         without it is refused by read_table, never read half-made. A rerun
                         removes it only once it is about to change something.
    failures.csv         row, uri, reason of every track whose audio could not be used (its
                         row stays, with audio_ok false: it trains on its features alone).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from consumer.audio import AudioPolicy, load_clip
from consumer.errors import DeadLetter
from consumer.redact import redact
from consumer.resample import Resampler
from consumer.soxr_resample import SoxrResampler
from popscore.artifact.features import FEATURE_RULES, extract
from popscore.training.catalog import CatalogRows, catalog_rows, read_catalog

CLIP_DTYPE = np.float16
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What a cache holds; two caches with different manifests are not interchangeable."""

    catalog: str
    catalog_bytes: int
    catalog_mtime_ns: int
    audio_column: str
    sample_rate: int
    clip_seconds: float
    feature_paths: tuple[str, ...]
    shard_rows: int
    version: int = FORMAT_VERSION
    feature_rules: int = FEATURE_RULES

    @property
    def clip_samples(self) -> int:
        return round(self.sample_rate * self.clip_seconds)

    @classmethod
    def of(
        cls,
        catalog: Path,
        audio_column: str,
        sample_rate: int,
        clip_seconds: float,
        feature_paths: Sequence[str],
        shard_rows: int,
    ) -> Manifest:
        info = catalog.stat()
        return cls(
            str(catalog.resolve()),
            info.st_size,
            info.st_mtime_ns,
            audio_column,
            sample_rate,
            clip_seconds,
            tuple(feature_paths),
            shard_rows,
            feature_rules=feature_rules(),
        )


def feature_rules() -> int:
    """The version of the rules that turn a catalog row into its feature row (the catalog's
    column mapping, popscore.artifact.features' extraction): cached rows of another version
    are stale. A number bumped by hand, not a digest of the code: a comment or a reformat
    must not throw away hours of prepared audio."""
    return FEATURE_RULES


@dataclass(frozen=True)
class Shard:
    """One shard's rows, ready for a worker: catalog row numbers and audio URIs."""

    index: int
    rows: list[int]
    uris: list[str | None]


@dataclass(frozen=True)
class Prepared:
    manifest: Manifest
    rows: int
    shards: int
    skipped_shards: int  # already complete (a resumed run)
    failures: int
    retried: int = 0  # rows of complete shards that had failed and were decoded again
    recovered: int = 0  # of those, the ones whose audio could be used this time


# Decodes in flight: each worker's future, its shard and catalog rows, and for a retry the
# offsets (within the shard) of the rows decoded again (None: the whole shard).
Running = dict[Future[list[str | None]], tuple[Shard, CatalogRows, list[int] | None]]


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}{suffix}"


def prepare(
    catalog: Path,
    audio_column: str,
    directory: Path,
    policy: AudioPolicy,
    feature_paths: Sequence[str],
    sample_rate: int = 22050,
    clip_seconds: float = 30.0,
    shard_rows: int = 256,
    workers: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> Prepared:
    """Decode every row's audio window into DIR's shards, `workers` processes at a time;
    complete shards are kept, and with `retry_failed` their failed rows are tried again (the
    ``popscore prepare`` command: not each train or evaluate run, which would fetch every dead
    link again at each start). ValueError when DIR holds another catalog's or setting's cache."""
    manifest = Manifest.of(
        catalog, audio_column, sample_rate, clip_seconds, feature_paths, shard_rows
    )
    next(read_catalog(catalog, audio_column, batch_rows=1))  # its columns, before any write
    _claim(directory, manifest)
    total = catalog_rows(catalog)
    workers = workers or os.cpu_count() or 1
    with (
        tqdm(total=total, desc="preparing audio", unit="track", disable=not progress) as bar,
        ProcessPoolExecutor(
            workers,
            multiprocessing.get_context("spawn"),
            _start_worker,
            (policy, sample_rate, clip_seconds),
        ) as pool,
    ):
        run = _Run(directory, manifest, bar, retry_failed)
        for shard, rows in _shards(catalog, audio_column, shard_rows):
            if len(run.running) >= 2 * workers:  # bounded: a shard's rows wait, not the catalog's
                run.finish(wait(run.running, return_when=FIRST_COMPLETED).done)
            run.submit(pool, shard, rows)
        run.finish(wait(run.running).done)
    return run.complete(total)


@dataclass
class _Run:
    """One prepare's progress: what is decoding, what was kept, and whether DIR changed."""

    directory: Path
    manifest: Manifest
    bar: tqdm
    retry_failed: bool
    running: Running = field(default_factory=dict)
    shards: int = 0
    skipped: int = 0
    retried: int = 0
    recovered: int = 0
    changed: bool = False

    def submit(self, pool: ProcessPoolExecutor, shard: Shard, rows: CatalogRows) -> None:
        self.shards += 1
        table = self.directory / shard_name(shard.index, ".parquet")
        if not table.exists():
            self._invalidate()
            self.running[pool.submit(_decode_shard, shard, self.directory)] = (shard, rows, None)
            return
        self.skipped += 1
        # A row that failed (a file missing then, added since) is decoded again; a row the
        # catalog gives no audio has nothing to retry.
        again = [i for i in _failed_rows(table) if shard.uris[i] is not None]
        if not again or not self.retry_failed:
            self.bar.update(len(shard.rows))
            return
        self.retried += len(again)
        future = pool.submit(_redecode_rows, shard, again, self.directory)
        self.running[future] = (shard, rows, again)

    def finish(self, finished: set[Future[list[str | None]]]) -> None:
        for future in finished:
            shard, rows, again = self.running.pop(future)
            path = self.directory / shard_name(shard.index, ".parquet")
            reasons: list[str | None] | None = future.result()
            if again is not None and reasons is not None:
                reasons = self._merge(path, again, reasons)
            if reasons is not None:
                _write_table(path, shard, rows, reasons, self.manifest.feature_paths)
            self.bar.update(len(shard.rows))

    def _merge(
        self, path: Path, again: list[int], retried: list[str | None]
    ) -> list[str | None] | None:
        """The shard's reasons with the retried rows' new ones; None when none recovered."""
        recovered = sum(reason is None for reason in retried)
        if not recovered:
            return None
        self.recovered += recovered
        self._invalidate()
        reasons = _reasons(path)
        for offset, reason in zip(again, retried, strict=True):
            reasons[offset] = reason
        return reasons

    def _invalidate(self) -> None:
        # Only once something will change: a rerun with nothing to do keeps the cache readable.
        if not self.changed:
            (self.directory / "complete.json").unlink(missing_ok=True)
            self.changed = True

    def complete(self, total: int) -> Prepared:
        done = self.directory / "complete.json"
        failures = _count_failures(self.directory, self.shards)
        if self.changed or not done.exists():
            _write_failures(self.directory, self.shards)
            # Last: the cache is whole. read_table refuses a folder without it.
            summary = {"shards": self.shards, "rows": total, "failures": failures}
            done.write_text(json.dumps(summary) + "\n")
        return Prepared(
            self.manifest, total, self.shards, self.skipped, failures, self.retried, self.recovered
        )


def _claim(directory: Path, manifest: Manifest) -> None:
    """Write the manifest, or check that the one there matches (a resumed run)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.json"
    wanted = asdict(manifest)
    if path.exists():
        found = json.loads(path.read_text())
        found["feature_paths"] = tuple(found.get("feature_paths", ()))
        if not isinstance(found.get("feature_rules"), int):
            # Before the key, or a digest of the sources (a few commits used one): the rules of
            # then, which are version 1.
            found["feature_rules"] = 1
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            if changed == ["feature_rules"]:
                raise ValueError(
                    f"{directory} was prepared under feature-extraction rules "
                    f"{found['feature_rules']}, these are {wanted['feature_rules']}: its "
                    "feature rows are stale; delete it or use another --cache folder"
                )
            raise ValueError(
                f"{directory} holds a cache of another catalog or setting "
                f"({', '.join(changed)} differ): use another --cache folder"
            )
        return
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def _shards(
    catalog: Path, audio_column: str, shard_rows: int
) -> Iterator[tuple[Shard, CatalogRows]]:
    """Consecutive catalog rows in shards of `shard_rows`, each with its rows' batch."""
    for index, batch in enumerate(read_catalog(catalog, audio_column, batch_rows=shard_rows)):
        rows = list(range(batch.first, batch.first + len(batch.events)))
        yield Shard(index, rows, batch.audio), batch


# --- the worker processes -------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start_worker(policy: AudioPolicy, sample_rate: int, clip_seconds: float) -> None:
    # One core per worker: torch's own thread pool would fight the other workers for it.
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    _WORKER.update(policy=policy, resampler=SoxrResampler(sample_rate, clip_seconds))


def _decode_shard(shard: Shard, directory: Path) -> list[str | None]:
    """Decode the shard's clips into its .npy (written whole, then renamed into place); the
    reason each row failed, None where it did not. One clip in memory at a time."""
    resampler: Resampler = _WORKER["resampler"]
    final = directory / shard_name(shard.index, ".npy")
    partial = final.with_suffix(".npy.partial")
    reasons: list[str | None] = []
    with partial.open("wb") as out:
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(CLIP_DTYPE)),
            "fortran_order": False,
            "shape": (len(shard.rows), resampler.clip_samples),
        }
        np.lib.format.write_array_header_1_0(out, header)
        for uri in shard.uris:
            clip, reason = _clip(uri, _WORKER["policy"], resampler)
            reasons.append(reason)
            out.write(clip.astype(CLIP_DTYPE).tobytes())
    partial.replace(final)
    return reasons


def _redecode_rows(shard: Shard, offsets: list[int], directory: Path) -> list[str | None]:
    """Decode the shard's rows at `offsets` again, writing each clip that now loads in place
    of its silence in the shard's .npy; the reason each still fails, None where it did not."""
    resampler: Resampler = _WORKER["resampler"]
    path = directory / shard_name(shard.index, ".npy")
    row_bytes = resampler.clip_samples * np.dtype(CLIP_DTYPE).itemsize
    reasons: list[str | None] = []
    with path.open("r+b") as out:
        np.lib.format.read_magic(out)
        np.lib.format.read_array_header_1_0(out)
        start = out.tell()
        for offset in offsets:
            clip, reason = _clip(shard.uris[offset], _WORKER["policy"], resampler)
            reasons.append(reason)
            if reason is None:  # a failed row keeps its silence
                out.seek(start + offset * row_bytes)
                out.write(clip.astype(CLIP_DTYPE).tobytes())
    return reasons


def _clip(
    uri: str | None, policy: AudioPolicy, resampler: Resampler
) -> tuple[np.ndarray, str | None]:
    """The service's clip for `uri`, or silence and the reason it could not be had."""
    if uri is None:
        return np.zeros(resampler.clip_samples, np.float32), "no audio in the catalog"
    try:
        return load_clip(uri, policy, resampler), None
    except DeadLetter as exc:
        return np.zeros(resampler.clip_samples, np.float32), str(exc)


# --- the row table --------------------------------------------------------------------------


def _write_table(
    path: Path,
    shard: Shard,
    rows: CatalogRows,
    reasons: list[str | None],
    feature_paths: Sequence[str],
) -> None:
    import pyarrow as pa  # noqa: PLC0415 (a training-only dependency)
    import pyarrow.parquet as pq  # noqa: PLC0415

    features = [extract(event, feature_paths).tolist() for event in rows.events]
    table = pa.table(
        {
            "row": pa.array(shard.rows, pa.int64()),
            "popularity": pa.array(rows.popularity, pa.float32()),
            "group": pa.array(rows.groups, pa.string()),
            "features": pa.array(features, pa.list_(pa.float32())),
            "audio_ok": pa.array([r is None for r in reasons], pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
            # Presigned URLs carry credentials in their query: never on disk.
            "uri": pa.array([None if u is None else redact(u) for u in shard.uris], pa.string()),
        }
    )
    partial = path.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    partial.replace(path)  # last: the shard is complete


def _failed_rows(path: Path) -> list[int]:
    """The offsets of a complete shard's rows whose audio could not be used."""
    return [i for i, reason in enumerate(_reasons(path)) if reason is not None]


def _reasons(path: Path) -> list[str | None]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    reasons: list[str | None] = pq.read_table(path, columns=["reason"])["reason"].to_pylist()
    return reasons


def _count_failures(directory: Path, shards: int) -> int:
    return sum(len(_failed_rows(directory / shard_name(i, ".parquet"))) for i in range(shards))


def _write_failures(directory: Path, shards: int) -> None:
    """failures.csv from every shard's table."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    with (directory / "failures.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["row", "uri", "reason"])
        for index in range(shards):
            table = pq.read_table(
                directory / shard_name(index, ".parquet"), columns=["row", "uri", "reason"]
            ).to_pylist()
            for record in table:
                if record["reason"] is not None:
                    out.writerow([record["row"], record["uri"], record["reason"]])


@dataclass(frozen=True)
class CachedTable:
    """Every prepared row, without audio: what folds, normalisers and samplers need."""

    directory: Path
    manifest: Manifest
    rows: np.ndarray  # catalog row number
    popularity: np.ndarray
    groups: np.ndarray
    features: np.ndarray  # [n, F] float32, NaN = missing
    audio_ok: np.ndarray  # [n] bool
    shard: np.ndarray  # [n] shard index of each row
    offset: np.ndarray  # [n] row within its shard


def read_manifest(directory: Path) -> Manifest:
    try:
        found = json.loads((directory / "manifest.json").read_text())
        return Manifest(**{**found, "feature_paths": tuple(found["feature_paths"])})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{directory} is not a prepared cache ({exc!r})") from None


def read_table(directory: Path) -> CachedTable:
    """The rows of every complete shard (ValueError when a shard is missing: prepare first)."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    manifest = read_manifest(directory)
    try:
        complete = json.loads((directory / "complete.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"{directory} is not completely prepared: run prepare again") from None
    columns = ["row", "popularity", "group", "features", "audio_ok"]
    parts = [
        pq.read_table(directory / shard_name(index, ".parquet"), columns=columns)
        for index in range(int(complete["shards"]))
    ]
    sizes = [part.num_rows for part in parts]
    if sum(sizes) != complete["rows"]:
        raise ValueError(f"{directory}: its shards do not hold {complete['rows']} rows")
    # Arrow's buffers straight into NumPy: Python lists of every value would take ~10x the RAM.
    table = pa.concat_tables(parts)

    def column(name: str) -> Any:
        return table[name].combine_chunks()

    features = column("features").flatten().to_numpy(zero_copy_only=False)
    return CachedTable(
        directory=directory,
        manifest=manifest,
        rows=column("row").to_numpy().astype(np.int64, copy=False),
        popularity=column("popularity").to_numpy().astype(np.float32, copy=False),
        groups=column("group").to_numpy(zero_copy_only=False).astype(str),
        features=features.astype(np.float32, copy=False).reshape(-1, len(manifest.feature_paths)),
        audio_ok=column("audio_ok").to_numpy(zero_copy_only=False).astype(bool),
        shard=np.repeat(np.arange(len(sizes)), sizes),
        offset=np.concatenate([np.arange(size) for size in sizes]),
    )
