"""The prepared audio cache (training.cache) and catalogs (training.catalog): the service's
clips, shards, failures listed, resumable, and Parquet or CSV alike."""

import csv
import json
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from consumer.audio import AudioPolicy, load_clip
from consumer.soxr_resample import SoxrResampler
from popscore.cli.main import main
from popscore.training import cache as cache_module
from popscore.training.cache import Manifest, feature_rules, prepare, read_table, shard_name
from popscore.training.catalog import read_catalog
from popscore.training.data import PAPER_FEATURES

RATE, SECONDS = 8000, 0.5
GOOD = 6


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    """8 rows: 6 real WAV files of different rates, one missing file, one that is not audio."""
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(GOOD):
        rate = (8000, 16000, 22050)[i % 3]
        sf.write(audio / f"t{i}.wav", rng.uniform(-0.5, 0.5, (rate, 2)).astype(np.float32), rate)
        names.append(f"audio/t{i}.wav")
    (audio / "bad.wav").write_bytes(b"not audio at all")
    names += ["audio/missing.wav", "audio/bad.wav"]
    path = tmp_path / "catalog.csv"
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["name", "popularity", "artist", "artist_popularity", "tempo", "audio"])
        for i, name in enumerate(names):
            out.writerow([f"Song {i} (Remix)" if i == 1 else f"Song {i}", 40 + 5 * i,
                          f"A{i % 3}", 50 + i, 100 + i, name])  # fmt: skip
    return path


def _prepare(catalog: Path, cache: Path, **kw: object) -> object:
    policy = AudioPolicy.create((catalog.parent,))
    args = {"sample_rate": RATE, "clip_seconds": SECONDS, "shard_rows": 3, "workers": 2,
            "progress": False} | kw  # fmt: skip
    return prepare(catalog, "audio", cache, policy, PAPER_FEATURES, **args)  # type: ignore[arg-type]


def test_prepare_writes_the_services_clips_in_shards_and_lists_failures(
    catalog: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    result = _prepare(catalog, cache)
    assert (result.rows, result.shards, result.skipped_shards, result.failures) == (8, 3, 0, 2)
    table = read_table(cache)
    assert table.rows.tolist() == list(range(8))
    assert table.audio_ok.tolist() == [True] * GOOD + [False, False]
    assert table.popularity.tolist() == [40 + 5 * i for i in range(8)]
    assert table.groups.tolist() == [f"A{i % 3}" for i in range(8)]
    remix = PAPER_FEATURES.index("release.title.remix")
    assert table.features[:, remix].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    # Each clip is what the service would score for that file (float16 on disk).
    policy, resampler = AudioPolicy.create((catalog.parent,)), SoxrResampler(RATE, SECONDS)
    for i in range(GOOD):
        clips = np.load(cache / shard_name(i // 3, ".npy"))
        served = load_clip((catalog.parent / f"audio/t{i}.wav").as_uri(), policy, resampler)
        np.testing.assert_allclose(clips[i % 3].astype(np.float32), served, atol=1e-3)
    with (cache / "failures.csv").open() as handle:
        failures = list(csv.DictReader(handle))
    assert [f["row"] for f in failures] == ["6", "7"]
    assert failures[0]["reason"].startswith("audio_fetch_failed")
    assert failures[1]["reason"].startswith("audio_decode_failed")


def test_prepare_resumes_where_it_stopped(catalog: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    before = np.load(cache / shard_name(1, ".npy"))
    # A run killed while decoding shard 1: its table was never written.
    (cache / shard_name(1, ".parquet")).unlink()
    (cache / shard_name(1, ".npy")).rename(cache / shard_name(1, ".npy.partial"))
    result = _prepare(catalog, cache)
    assert (result.shards, result.skipped_shards) == (3, 2)
    np.testing.assert_array_equal(np.load(cache / shard_name(1, ".npy")), before)
    assert not (cache / shard_name(1, ".npy.partial")).exists()
    assert len(read_table(cache).rows) == 8


def test_a_rerun_decodes_the_failed_rows_again_and_keeps_the_rest(
    catalog: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    kept = np.load(cache / shard_name(2, ".npy"))[1]  # row 7, not audio: silence
    # The missing file (row 6) arrives after the first run.
    sf.write(catalog.parent / "audio/missing.wav", np.full((RATE, 1), 0.25, np.float32), RATE)
    # train and evaluate prepare too: they never fetch the dead links again at each start
    unasked = _prepare(catalog, cache)
    assert (unasked.retried, unasked.failures) == (0, 2)
    result = _prepare(catalog, cache, retry_failed=True)  # `popscore prepare`
    assert (result.skipped_shards, result.retried, result.recovered) == (3, 2, 1)
    assert result.failures == 1
    table = read_table(cache)
    assert table.audio_ok.tolist() == [True] * 7 + [False]
    clips = np.load(cache / shard_name(2, ".npy"))
    served = load_clip(
        (catalog.parent / "audio/missing.wav").as_uri(),
        AudioPolicy.create((catalog.parent,)),
        SoxrResampler(RATE, SECONDS),
    )
    np.testing.assert_allclose(clips[0].astype(np.float32), served, atol=1e-3)
    np.testing.assert_array_equal(clips[1], kept)
    with (cache / "failures.csv").open() as handle:
        assert [f["row"] for f in csv.DictReader(handle)] == ["7"]


def test_a_rerun_with_nothing_to_change_leaves_the_cache_readable(
    catalog: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    before = (cache / "complete.json").stat()
    result = _prepare(catalog, cache, retry_failed=True)  # both fail again: nothing changes
    assert (result.skipped_shards, result.retried, result.recovered) == (3, 2, 0)
    after = (cache / "complete.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_cache_of_other_feature_rules_is_refused(
    catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    assert json.loads((cache / "manifest.json").read_text())["feature_rules"] == feature_rules()
    monkeypatch.setattr(cache_module, "feature_rules", lambda: 2)
    with pytest.raises(ValueError, match=r"prepared under feature-extraction rules 1, these are 2"):
        _prepare(catalog, cache)


def test_a_cache_from_before_the_rules_were_recorded_is_of_the_first_rules(
    catalog: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["feature_rules"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert _prepare(catalog, cache).skipped_shards == 3
    manifest["feature_rules"] = "0123456789abcdef"  # a few commits recorded a source digest
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert _prepare(catalog, cache).skipped_shards == 3


def test_a_cache_of_other_settings_is_refused(catalog: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    with pytest.raises(ValueError, match="clip_seconds differ"):
        _prepare(catalog, cache, clip_seconds=1.0)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["clip_seconds"] == SECONDS and manifest["sample_rate"] == RATE


def test_parquet_struct_columns_read_like_the_csv(catalog: Path, tmp_path: Path) -> None:
    [csv_rows] = list(read_catalog(catalog, "audio"))
    rows = zip(csv_rows.popularity, csv_rows.events, csv_rows.audio, strict=True)
    records = [
        {
            "popularity": float(p),
            "artist": {"name": e["artist"]["name"], "popularity": e["artist"]["popularity"]},
            "release": {"title": e["release"]["title"]},
            "audio_features.tempo": e["audio_features"]["tempo"],
            "audio": uri,
        }
        for p, e, uri in rows
    ]
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    batches = list(read_catalog(path, "audio", batch_rows=3))
    assert [len(b.events) for b in batches] == [3, 3, 2] and batches[2].first == 6
    events = [e for b in batches for e in b.events]
    assert events == csv_rows.events
    assert [g for b in batches for g in b.groups] == csv_rows.groups  # grouped by artist name
    assert [u for b in batches for u in b.audio] == csv_rows.audio


def test_a_catalog_without_its_columns_or_labels_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("popularity,artist\n50,A\n")
    with pytest.raises(ValueError, match="no column audio"):
        list(read_catalog(path, "audio"))
    path.write_text("popularity,artist\n150,A\n")
    with pytest.raises(ValueError, match=r"row 0: popularity '150' is not a number in 0\.\.100"):
        list(read_catalog(path))


def test_popscore_prepare_command(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    args = ["prepare", "--data", str(catalog), "--audio-column", "audio", "--cache", str(cache)]
    assert main([*args, "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "8 tracks in 1 shards (0 already prepared), 2 without usable audio" in out
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(1 already prepared; 2 failed rows tried again, 0 recovered), 2 without" in out
    for bad, needle in [
        (["--audio-column", "audio", "--workers", "0"], "--workers"),
        (["--audio-column", "nope"], "no column nope"),
    ]:
        with pytest.raises(SystemExit) as info:
            main([*args[:3], *bad, "--cache", str(tmp_path / "other"), "--quiet"])
        assert info.value.code == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "other").exists()  # nothing written for a refused catalog


def test_a_cache_that_prepare_did_not_finish_is_refused(catalog: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _prepare(catalog, cache)
    (cache / "complete.json").unlink()  # as if prepare died after its last shard
    with pytest.raises(ValueError, match="not completely prepared"):
        read_table(cache)
    _prepare(catalog, cache)  # a rerun skips every shard and completes it
    assert len(read_table(cache).rows) == 8


def test_the_row_table_is_read_without_a_python_object_per_value(tmp_path: Path) -> None:
    """50,000 rows of 20 features: the reader's peak (Python and NumPy allocations) stays
    within a small multiple of the arrays it returns, not a boxed float per value."""
    rows, per_shard = 50_000, 12_500
    manifest = Manifest("c.csv", 1, 1, "audio", RATE, SECONDS, PAPER_FEATURES, per_shard)
    (tmp_path / "manifest.json").write_text(json.dumps(asdict(manifest)))
    rng = np.random.default_rng(0)
    for index in range(rows // per_shard):
        first = index * per_shard
        features = rng.normal(size=(per_shard, len(PAPER_FEATURES))).astype(np.float32)
        shard = pa.table(
            {
                "row": pa.array(np.arange(first, first + per_shard)),
                "popularity": pa.array(rng.uniform(0, 100, per_shard).astype(np.float32)),
                "group": pa.array([f"A{i % 500}" for i in range(per_shard)]),
                "features": pa.FixedSizeListArray.from_arrays(
                    features.ravel(), len(PAPER_FEATURES)
                ).cast(pa.list_(pa.float32())),
                "audio_ok": pa.array(np.ones(per_shard, dtype=bool)),
            }
        )
        pq.write_table(shard, tmp_path / shard_name(index, ".parquet"))
    (tmp_path / "complete.json").write_text(json.dumps({"shards": 4, "rows": rows}))
    tracemalloc.start()
    try:
        table = read_table(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.features.shape == (rows, len(PAPER_FEATURES))
    assert table.rows.tolist() == list(range(rows)) and table.offset[per_shard] == 0
    assert table.shard[-1] == 3 and table.groups[501] == "A1"
    arrays = (table.rows, table.popularity, table.groups, table.features, table.audio_ok)
    returned = sum(a.nbytes for a in (*arrays, table.shard, table.offset))
    assert peak < 3 * returned, (peak, returned)
