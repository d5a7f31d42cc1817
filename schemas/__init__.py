"""The wire contract of popscore: typed messages, their JSON Schemas and Redis key names.

Downstream services import this package to read what popscore writes:
``ScoreRecord.from_redis(redis.hgetall(score_key(track_id)))``.
"""

from schemas.dead_letter import DeadLetterReason
from schemas.events import (
    Artist,
    AudioFeatures,
    Engagement,
    Release,
    ReleaseEvent,
)
from schemas.redis_keys import leaderboard_key, score_key
from schemas.scores import ScoreRecord

__all__ = [
    "Artist",
    "AudioFeatures",
    "DeadLetterReason",
    "Engagement",
    "Release",
    "ReleaseEvent",
    "ScoreRecord",
    "leaderboard_key",
    "score_key",
]
