"""The wire contract of popscore: typed messages, their JSON Schemas and Redis key names.

Downstream services import this package to read what popscore writes:
``ScoreRecord.from_redis(redis.hgetall(score_key(track_id)))`` on one Redis node, or with the
layout of either deployment, ``keys = RedisKeys.for_cluster(cluster)``, then
``ScoreRecord.from_redis(redis.hgetall(keys.score(track_id)))`` and ``keys.leaderboard(day)``.

The names below are imported on first use (PEP 562), so ``schemas.dead_letter`` and
``schemas.redis_keys`` load without pydantic: the GPU check imports ``consumer.device`` on
machines that have only torch, torchaudio and numpy.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.dead_letter import DeadLetterReason
    from schemas.events import Artist, AudioFeatures, Engagement, Release, ReleaseEvent
    from schemas.redis_keys import (
        CURRENT_MODEL_KEY,
        RedisKeys,
        event_key,
        leaderboard_key,
        model_leaderboard_key,
        model_score_key,
        score_key,
    )
    from schemas.scores import ScoreRecord

_HOME = {
    "Artist": "schemas.events",
    "AudioFeatures": "schemas.events",
    "DeadLetterReason": "schemas.dead_letter",
    "Engagement": "schemas.events",
    "Release": "schemas.events",
    "ReleaseEvent": "schemas.events",
    "ScoreRecord": "schemas.scores",
    "CURRENT_MODEL_KEY": "schemas.redis_keys",
    "RedisKeys": "schemas.redis_keys",
    "event_key": "schemas.redis_keys",
    "leaderboard_key": "schemas.redis_keys",
    "model_leaderboard_key": "schemas.redis_keys",
    "model_score_key": "schemas.redis_keys",
    "score_key": "schemas.redis_keys",
}

__all__ = [
    "CURRENT_MODEL_KEY",
    "Artist",
    "AudioFeatures",
    "DeadLetterReason",
    "Engagement",
    "RedisKeys",
    "Release",
    "ReleaseEvent",
    "ScoreRecord",
    "event_key",
    "leaderboard_key",
    "model_leaderboard_key",
    "model_score_key",
    "score_key",
]


if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt name is still an error

    def __getattr__(name: str) -> Any:
        if name not in _HOME:
            raise AttributeError(f"module 'schemas' has no attribute {name!r}")
        value = getattr(import_module(_HOME[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_HOME))
