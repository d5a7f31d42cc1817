"""Redis key names (docs/INTERFACE.md, "Redis"), shared by the writer and every reader."""

from datetime import date

KEY_PREFIX = "popscore"


def score_key(track_id: str) -> str:
    """HASH holding the latest ScoreRecord of one track."""
    return f"{KEY_PREFIX}:score:{track_id}"


def leaderboard_key(day: date) -> str:
    """ZSET of track ids by predicted popularity, for the UTC day the release event was emitted."""
    return f"{KEY_PREFIX}:leaderboard:{day.isoformat()}"


def event_key(event_id: str) -> str:
    """STRING naming the Kafka record (topic/partition/offset) that first carried an event id;
    the writer's duplicate detection, expiring after POPSCORE_DEDUPE_TTL_S."""
    return f"{KEY_PREFIX}:event:{event_id}"
