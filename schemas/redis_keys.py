"""Redis key names (docs/INTERFACE.md, "Redis"), shared by the writer and every reader.

Readers read the *current view*: ``score_key`` and ``leaderboard_key`` always show the current
model's scores. Each model version also keeps its own namespace (``model_*`` keys), written by
whichever consumer scores with it (live, shadow or backfill); ``popscore promote`` copies a
namespace into the view and makes its version current.
"""

from datetime import date

KEY_PREFIX = "popscore"
CURRENT_MODEL_KEY = f"{KEY_PREFIX}:current_model"
"""STRING: the model version the view shows; absent until the first ``popscore promote`` (then
the live consumers' primary model writes the view)."""
MODELS_KEY = f"{KEY_PREFIX}:models"
"""SET of every model version that has written a score."""
PROMOTION_KEY = f"{KEY_PREFIX}:promotion"
"""HASH: the latest promotion (from, to, state, started_at, finished_at, counts)."""


def score_key(track_id: str) -> str:
    """HASH holding the current model's latest ScoreRecord of one track."""
    return f"{KEY_PREFIX}:score:{track_id}"


def leaderboard_key(day: date) -> str:
    """ZSET of track ids by the current model's predicted popularity, for the UTC day the
    release event was emitted."""
    return f"{KEY_PREFIX}:leaderboard:{day.isoformat()}"


def model_prefix(model_version: str) -> str:
    """Every key of one model version's namespace starts with this."""
    return f"{KEY_PREFIX}:model:{model_version}:"


def model_score_key(model_version: str, track_id: str) -> str:
    """HASH: the latest ScoreRecord of one track by one model version."""
    return f"{model_prefix(model_version)}score:{track_id}"


def model_leaderboard_key(model_version: str, day: date) -> str:
    """ZSET: one model version's day leaderboard."""
    return f"{model_prefix(model_version)}leaderboard:{day.isoformat()}"


def model_info_key(model_version: str) -> str:
    """HASH: ``tracks`` (score hashes this version created), ``last_write_ms``."""
    return f"{model_prefix(model_version)}info"


def event_key(event_id: str, model_version: str) -> str:
    """STRING naming the Kafka record (topic/partition/offset) that first carried an event id
    to this model version: the writer's duplicate detection (the same event scored again by the
    same version is a duplicate; by another version it is not), expiring after
    POPSCORE_DEDUPE_TTL_S."""
    return f"{model_prefix(model_version)}event:{event_id}"
