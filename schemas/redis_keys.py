"""Redis key names (CONTRACT §6), shared by the writer and every reader."""

from datetime import date

KEY_PREFIX = "popscore"


def score_key(track_id: str) -> str:
    """HASH holding the latest ScoreRecord of one track."""
    return f"{KEY_PREFIX}:score:{track_id}"


def leaderboard_key(day: date) -> str:
    """ZSET of track ids by predicted popularity, for the UTC day the release event was emitted."""
    return f"{KEY_PREFIX}:leaderboard:{day.isoformat()}"
