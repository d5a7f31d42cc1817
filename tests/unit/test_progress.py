"""The backfill's ETA and a Parquet catalog turned into ReleaseEvent records."""

import json
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from consumer.progress import WINDOW_S, Progress
from popscore.cli.rollout import parquet_records
from schemas import ReleaseEvent


def test_eta_is_the_remaining_records_at_the_last_minutes_rate() -> None:
    progress = Progress()
    assert progress.eta_s(100, now=0.0) == -1.0, "no rate yet"
    progress.committed(50, now=0.0)
    progress.committed(50, now=10.0)
    assert progress.eta_s(1000, now=10.0) == 100.0  # 100 records in 10 s
    assert progress.eta_s(0, now=10.0) == 0.0
    assert progress.eta_s(1000, now=10.0 + WINDOW_S + 1) == -1.0, "the window has passed"


def test_parquet_rows_become_release_events_and_bad_rows_stay_as_they_are(
    tmp_path: Path,
) -> None:
    table = pa.table(
        {
            "event_id": ["e1", "e2"],
            "track_id": ["t1", "t2"],
            "emitted_at": [datetime(2026, 11, 30, 12), datetime(2026, 11, 30, 13)],
            "audio_uri": ["s3://bucket/a.mp3", "ftp://nope"],
            "artist": [{"followers": 1200, "popularity": 40}, {"followers": 5, "popularity": 1}],
            "audio_features.energy": [0.5, 0.9],
        }
    )
    pq.write_table(table, tmp_path / "c.parquet")
    records = list(parquet_records(tmp_path / "c.parquet"))
    assert [key for key, _v in records] == [b"t1", b"t2"]
    first = ReleaseEvent.from_json(records[0][1])
    assert first.emitted_at.isoformat() == "2026-11-30T12:00:00+00:00"  # naive = UTC
    assert first.artist is not None and first.artist.followers == 1200
    assert first.audio_features is not None and first.audio_features.energy == 0.5
    assert json.loads(records[1][1])["audio_uri"] == "ftp://nope", "sent as is: dead-lettered"
