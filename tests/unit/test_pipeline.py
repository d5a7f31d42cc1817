"""parse_event: every way a Kafka value can be bad maps to its dead-letter reason."""

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from confluent_kafka import Message
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import DeadLetter
from consumer.pipeline import parse_event
from popscore.artifact import extract
from schemas.dead_letter import DeadLetterReason as Reason

GOOD = {
    "event_id": "e1",
    "track_id": "t1",
    "emitted_at": "2026-11-27T10:00:00+01:00",
    "audio_uri": "https://cdn.example.com/a.mp3",
}


def message(value: bytes | None) -> Message:
    return Message(topic="releases", partition=0, offset=7, key=b"t1", value=value)


def reason(value: bytes | None, max_bytes: int = 1024 * 1024) -> Reason:
    with pytest.raises(DeadLetter) as info:
        parse_event(message(value), max_bytes)
    return info.value.reason


def test_good_event_parses() -> None:
    assert parse_event(message(json.dumps(GOOD).encode())).track_id == "t1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Reason.INVALID_JSON),
        (b"", Reason.INVALID_JSON),
        (b"{", Reason.INVALID_JSON),
        (b'{"event_id": "\xff\xfe"}', Reason.INVALID_JSON),  # not UTF-8
        (b"[]", Reason.INVALID_EVENT),
        (json.dumps({**GOOD, "track_id": 5}).encode(), Reason.INVALID_EVENT),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "audio_uri"}).encode(),
            Reason.INVALID_EVENT,
        ),
        (json.dumps({**GOOD, "artist": {"followers": -1}}).encode(), Reason.INVALID_EVENT),
        (
            json.dumps(GOOD).replace('"e1"', '"e1", "engagement": {"streams": NaN}').encode(),
            Reason.INVALID_EVENT,
        ),
    ],
)
def test_bad_values_get_their_reason(value: bytes | None, expected: Reason) -> None:
    assert reason(value) is expected


def test_oversize_message_is_not_parsed() -> None:
    big = json.dumps({**GOOD, "padding": "x" * 5000}).encode()
    assert reason(big, max_bytes=4096) is Reason.MESSAGE_TOO_LARGE


def test_detail_names_the_field() -> None:
    with pytest.raises(DeadLetter) as info:
        parse_event(message(json.dumps({**GOOD, "artist": {"popularity": 300}}).encode()))
    assert info.value.detail.startswith("artist.popularity:")


@given(
    st.dictionaries(
        st.sampled_from([*list(GOOD), "artist", "engagement"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.floats(allow_nan=False), st.booleans()
        ),
    )
)
def test_any_json_object_is_parsed_or_dead_lettered(doc: dict[str, object]) -> None:
    try:
        parse_event(message(json.dumps(doc).encode()))
    except DeadLetter as exc:
        assert exc.reason in (Reason.INVALID_EVENT, Reason.INVALID_JSON)


@pytest.mark.parametrize("followers", [10**400, 10**39])
def test_a_huge_count_is_a_missing_feature_not_an_error(followers: int) -> None:
    """A 400-digit follower count is a valid JSON integer; as a feature it cannot be a float.
    10**39 fits a float64 but not the float32 row, where it would be inf and score."""
    doc = {**GOOD, "artist": {"followers": followers, "popularity": 50}}
    event = parse_event(message(json.dumps(doc).encode()))
    row = extract(event.model_dump(), ["artist.followers", "artist.popularity"])
    assert np.isnan(row[0]) and row[1] == 50.0


def test_an_event_from_the_future_is_refused_beyond_the_clock_skew() -> None:
    """Newer wins in Redis: one event stamped far ahead (a producer with a fast clock) would
    keep its track's score for ever, every real event after it being older."""
    ahead = datetime.now(UTC) + timedelta(days=365)
    with pytest.raises(DeadLetter) as info:
        parse_event(message(json.dumps({**GOOD, "emitted_at": ahead.isoformat()}).encode()))
    assert info.value.reason is Reason.INVALID_EVENT
    assert "emitted_at" in info.value.detail and "future" in info.value.detail
    near = datetime.now(UTC) + timedelta(seconds=60)  # within the default hour: accepted
    assert parse_event(message(json.dumps({**GOOD, "emitted_at": near.isoformat()}).encode()))
    strict = {**GOOD, "emitted_at": near.isoformat()}
    with pytest.raises(DeadLetter):
        parse_event(message(json.dumps(strict).encode()), max_future_skew_s=10)
