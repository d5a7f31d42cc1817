"""ReleaseEvent / ScoreRecord validation, JSON Schema currency, Redis round trip."""

import contextlib
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from popscore.artifact.features import extract
from schemas import ReleaseEvent, ScoreRecord, leaderboard_key, score_key
from schemas.jsonschema import EXPORTED, JSON_DIR, render

VALID = {
    "event_id": "e-1",
    "track_id": "t-1",
    "emitted_at": "2026-11-27T10:00:00Z",
    "audio_uri": "file:///music/a.mp3",
    "artist": {"id": "a", "name": "A", "popularity": 71, "followers": 120000, "genres": ["pop"]},
    "release": {"date": "2026-11-27", "market": "SE", "explicit": False, "duration_ms": 201000},
    "audio_features": {
        "danceability": 0.7,
        "energy": 0.8,
        "loudness": -5.2,
        "tempo": 120.0,
        "time_signature": 4,
        "key": 5,
        "mode": 1,
    },
    "engagement": {"window_hours": 24, "streams": 5000, "saves": 300, "skips": 20},
}


def parse(doc: object) -> ReleaseEvent:
    return ReleaseEvent.from_json(json.dumps(doc))


def with_field(path: str, value: object) -> dict[str, object]:
    doc = json.loads(json.dumps(VALID))
    *parents, leaf = path.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node[leaf] = value
    return doc


def test_valid_event_parses_with_all_groups() -> None:
    event = parse(VALID)
    assert event.artist is not None and event.artist.followers == 120000
    assert event.emitted_at == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert event.schema_version == 1


def test_minimal_event_needs_only_the_four_required_fields() -> None:
    event = parse({k: VALID[k] for k in ("event_id", "track_id", "emitted_at", "audio_uri")})
    assert event.artist is None and event.engagement is None


@pytest.mark.parametrize("missing", ["event_id", "track_id", "emitted_at", "audio_uri"])
def test_missing_required_field_is_rejected(missing: str) -> None:
    doc = {k: v for k, v in VALID.items() if k != missing}
    with pytest.raises(ValidationError) as info:
        parse(doc)
    assert info.value.errors()[0]["loc"] == (missing,)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("artist.followers", "120000"),  # a string is not a number
        ("artist.followers", 1.5),  # not an integer
        ("artist.popularity", True),
        ("release.explicit", "yes"),
        ("track_id", 42),
        ("audio_features.tempo", "fast"),
        ("artist.genres", "pop"),
        ("emitted_at", 1764237600),
    ],
)
def test_wrong_types_are_rejected(path: str, value: object) -> None:
    with pytest.raises(ValidationError):
        parse(with_field(path, value))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("artist.popularity", 101),
        ("artist.followers", -1),
        ("audio_features.danceability", 1.01),
        ("audio_features.tempo", -3.0),
        ("audio_features.key", 12),
        ("engagement.streams", -5),
        ("engagement.window_hours", 0),
        ("track_id", ""),
        ("track_id", "x" * 129),
        ("emitted_at", "2026-11-27T10:00:00"),  # RFC 3339 needs an offset
        # valid RFC 3339, but outside what UTC can represent (the Redis write converts)
        ("emitted_at", "9999-12-31T23:59:59-01:00"),
        ("emitted_at", "0001-01-01T00:00:00+14:00"),
        ("schema_version", 2),
        ("release.date", "2024-13"),
        ("release.date", "2023-02-29"),
        ("release.date", "24"),
        ("release.date", "2024-03-05T10:00:00Z"),
    ],
)
def test_out_of_range_values_are_rejected(path: str, value: object) -> None:
    with pytest.raises(ValidationError):
        parse(with_field(path, value))


@pytest.mark.parametrize("date", ["2024-02-29", "2024-03", "1981"])
def test_a_release_date_may_know_only_its_month_or_year(date: str) -> None:
    """Spotify's release_date_precision: old catalogue entries often carry just the year."""
    event = parse(with_field("release.date", date))
    assert event.release is not None and event.release.date == date
    assert extract(event.model_dump(), ["release.year"])[0] == int(date[:4])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_rejected(literal: str) -> None:
    text = json.dumps(VALID).replace('"energy": 0.8', f'"energy": {literal}')
    with pytest.raises(ValidationError):
        ReleaseEvent.from_json(text)


def test_unknown_extra_fields_are_ignored() -> None:
    doc = with_field("artist.label", "Big Label")
    doc["new_top_level"] = {"anything": [1, 2]}
    assert parse(doc).artist is not None


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"", b"[1, 2]", b"null"])
def test_garbage_is_a_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        ReleaseEvent.from_json(raw)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_validation_error(raw: bytes) -> None:
    with contextlib.suppress(ValidationError):
        ReleaseEvent.from_json(raw)


def test_encode_round_trips() -> None:
    event = parse(VALID)
    assert ReleaseEvent.from_json(event.encode()) == event


def make_record(**overrides: object) -> ScoreRecord:
    fields: dict[str, object] = {
        "event_id": "e-1",
        "track_id": "t-1",
        "model_version": "m1",
        "popularity": 71.25,
        "hit_probability": 0.63,
        "is_hit": True,
        "audio_used": True,
        "emitted_at": datetime(2026, 11, 27, 10, tzinfo=UTC),
        "scored_at": datetime(2026, 11, 27, 10, 0, 1, 500000, tzinfo=UTC),
        "latency_ms": 1500.0,
    }
    fields.update(overrides)
    return ScoreRecord.model_validate(fields)


def test_score_record_redis_round_trip_with_bytes_and_str() -> None:
    record = make_record()
    as_str = record.redis_fields()
    as_bytes = {k.encode(): v.encode() for k, v in as_str.items()}
    as_bytes[b"_order"] = b"123"  # the writer's private fields are ignored
    assert ScoreRecord.from_redis(as_str) == record
    assert ScoreRecord.from_redis(as_bytes) == record


def test_score_record_json_round_trip() -> None:
    record = make_record(is_hit=False, hit_probability=0.2)
    assert ScoreRecord.from_json(record.encode()) == record


@pytest.mark.parametrize(("field", "value"), [("popularity", 100.5), ("hit_probability", -0.1)])
def test_score_record_ranges(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        make_record(**{field: value})


def test_redis_keys() -> None:
    assert score_key("t-1") == "popscore:score:t-1"
    assert leaderboard_key(datetime(2026, 11, 27).date()) == "popscore:leaderboard:2026-11-27"


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_committed_json_schemas_are_current(name: str) -> None:
    committed = (JSON_DIR / name).read_text()
    assert committed == render(EXPORTED[name]), "run `python -m schemas` and commit the result"


def test_cluster_layout_puts_what_one_script_touches_in_one_slot() -> None:
    from redis.crc import key_slot

    from schemas.redis_keys import CLUSTER, SINGLE

    day = datetime(2026, 11, 27).date()
    assert SINGLE.score("t-1") == score_key("t-1"), "one node: the names readers know"
    assert CLUSTER.score("t-1") == "popscore:score:{t-1}"
    for track in ("t-1", "a}b", "ü{x", "x" * 128):
        slots = {
            key_slot(k.encode()) for k in (CLUSTER.score(track), CLUSTER.model_score("v1", track))
        }
        assert len(slots) == 1, track
    boards = (
        CLUSTER.leaderboard(day),
        CLUSTER.model_leaderboard("v1", day),
        CLUSTER.model_leaderboard("v2", day),
    )
    assert (
        len(
            {key_slot(f"{k}:seq".encode()) for k in boards} | {key_slot(k.encode()) for k in boards}
        )
        == 1
    )
    meta = (CLUSTER.current_model, CLUSTER.models, CLUSTER.promotion, CLUSTER.promotion_epoch,
            CLUSTER.promotion_lock, CLUSTER.model_info("v1"))  # fmt: skip
    assert len({key_slot(k.encode()) for k in meta}) == 1
    assert all(k.startswith("popscore:") for k in meta), "one ACL pattern covers every key"
    with pytest.raises(ValueError, match="starts with '}'"):
        CLUSTER.score("}x")
    with pytest.raises(ValueError, match="brace"):
        CLUSTER.model_score("v{1}", "t")
