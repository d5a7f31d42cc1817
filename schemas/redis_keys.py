"""Redis key names (docs/INTERFACE.md, "Redis"), shared by the writer and every reader.

Readers read the *current view*: ``score_key`` and ``leaderboard_key`` always show the current
model's scores. Each model version also keeps its own namespace (``model_*`` keys), written by
whichever consumer scores with it (live, shadow or backfill); ``popscore promote`` copies a
namespace into the view and makes its version current.

Two layouts, one per deployment. On a single Redis node (and Sentinel) the names are the ones
below. On Redis Cluster (``POPSCORE_REDIS_CLUSTER=true``) every key one script call touches
must hash to one slot, so names carry a hash tag (docs/INTERFACE.md, "Redis Cluster"): a
track's hashes ``{track_id}``, a day's leaderboards ``{day}``, the pointer and bookkeeping
``{meta}``. Readers build names with ``RedisKeys.for_cluster(...)`` and decode a hash with
``ScoreRecord.from_redis``; the module-level functions are the single-node layout.
"""

from dataclasses import dataclass
from datetime import date

KEY_PREFIX = "popscore"
CURRENT_MODEL_KEY = f"{KEY_PREFIX}:current_model"
"""STRING: the model version the view shows; absent until the first ``popscore promote`` (then
the live consumers' primary model writes the view)."""
MODELS_KEY = f"{KEY_PREFIX}:models"
"""SET of every model version that has written a score."""
PROMOTION_KEY = f"{KEY_PREFIX}:promotion"
"""HASH: the latest promotion (from, to, state, started_at, finished_at, counts)."""
_META_TAG = "{meta}"


def crash_journal_key(group_id: str, topic: str) -> str:
    """HASH: per partition of ``topic``, the highest offset the group's consumers handed to
    their stages, and the record being processed alone (``consumer.crashguard``)."""
    return f"{KEY_PREFIX}:crash_journal:{group_id}:{topic}"


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


@dataclass(frozen=True)
class RedisKeys:
    """Every key name of one layout: ``RedisKeys.for_cluster(False)`` is the single-node one
    (the functions above), ``RedisKeys.for_cluster(True)`` Redis Cluster's."""

    cluster: bool = False

    @classmethod
    def for_cluster(cls, cluster: bool) -> "RedisKeys":
        return CLUSTER if cluster else SINGLE

    def score(self, track_id: str) -> str:
        """The current view's HASH of one track (decode with ``ScoreRecord.from_redis``)."""
        return f"{KEY_PREFIX}:score:{self._tag(track_id)}"

    def leaderboard(self, day: date) -> str:
        """The current view's day ZSET (member: track id, score: popularity)."""
        return f"{KEY_PREFIX}:leaderboard:{self._tag(day.isoformat())}"

    def model_score(self, model_version: str, track_id: str) -> str:
        return f"{model_prefix(self.version(model_version))}score:{self._tag(track_id)}"

    def model_leaderboard(self, model_version: str, day: date) -> str:
        version = self.version(model_version)
        return f"{model_prefix(version)}leaderboard:{self._tag(day.isoformat())}"

    def event(self, event_id: str, model_version: str) -> str:
        """The duplicate marker: one key per script call on either layout, so no hash tag."""
        return event_key(event_id, self.version(model_version))

    def model_info(self, model_version: str) -> str:
        if self.cluster:
            return f"{KEY_PREFIX}:{_META_TAG}:model:{self.version(model_version)}:info"
        return model_info_key(model_version)

    @property
    def current_model(self) -> str:
        """STRING: the version the view shows (absent before the first promotion)."""
        return self._meta(CURRENT_MODEL_KEY)

    @property
    def models(self) -> str:
        return self._meta(MODELS_KEY)

    @property
    def promotion(self) -> str:
        return self._meta(PROMOTION_KEY)

    @property
    def promotion_lock(self) -> str:
        return self._meta(f"{PROMOTION_KEY}:lock")

    @property
    def promotion_epoch(self) -> str:
        """Cluster only: INCR'd by every promotion; a view write stamped with an older epoch
        is refused and retried (docs/RELIABILITY.md, "Redis Cluster")."""
        return self._meta(f"{PROMOTION_KEY}:epoch")

    def version(self, model_version: str) -> str:
        """The version, checked: a ':' would share another version's key prefix, a brace would
        move its keys' hash slot on a cluster."""
        if (
            not model_version
            or ":" in model_version
            or (self.cluster and ("{" in model_version or "}" in model_version))
        ):
            raise ValueError(f"{model_version!r} cannot name a model's keys (empty, ':' or brace)")
        return model_version

    def _tag(self, name: str) -> str:
        if not self.cluster:
            return name
        # Redis hashes the text between the first "{" and the next "}": an id that starts
        # with "}" would leave an empty tag and split a track's keys over two slots.
        if name.startswith("}"):
            raise ValueError(f"{name[:40]!r} starts with '}}': no Redis Cluster hash tag")
        return "{" + name + "}"

    def _meta(self, single_name: str) -> str:
        if not self.cluster:
            return single_name
        return f"{KEY_PREFIX}:{_META_TAG}:{single_name[len(KEY_PREFIX) + 1 :]}"


SINGLE = RedisKeys(cluster=False)
CLUSTER = RedisKeys(cluster=True)
