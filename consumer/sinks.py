"""Redis: one idempotent Lua upsert per batch (score hashes, day leaderboards, event markers).

Runs on the sink thread, before the batch's Kafka transaction. A replay rewrites what it wrote
before without changing anything visible, and the script never lets an older event (by
``emitted_at``, then ``event_id``) overwrite a newer score of the same model. Each event id is
claimed, per model version, by the Kafka record (topic/partition/offset) that first carried it:
a replay of that record is not a duplicate, another record with the same event id is; the same
event scored by another model version is no duplicate either.

Every record goes to its model version's namespace; it also goes to the view readers read
(``popscore:score:*``, ``popscore:leaderboard:*``) when its version is the current one
(``popscore:current_model``), or, before any promotion, when the live consumer's primary model
wrote it (docs/INTERFACE.md, "Redis").
"""

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date
from enum import IntEnum
from functools import partial
from typing import Any, TypeVar

import redis

from consumer.dead_letters import internal_error
from consumer.errors import DeadLetter, SinkError
from schemas.dead_letter import DeadLetterReason
from schemas.redis_keys import (
    CURRENT_MODEL_KEY,
    MODELS_KEY,
    event_key,
    leaderboard_key,
    model_info_key,
    model_leaderboard_key,
    model_score_key,
    score_key,
)
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BACKOFF_S = 5.0
MIGRATION_BACKOFF_S = 0.5
KEYS_PER_RECORD = 6

# KEYS[1]: the current-model pointer; KEYS[2]: the set of model versions; then per record its
# view hash, view day leaderboard, model hash, model day leaderboard, event marker, model info.
# ARGV[1]: score ttl (0 = none; a day's leaderboard expires that long after its last write);
# ARGV[2]: marker ttl; ARGV[3]: "1" when these records write the view while no model is current
# (the live primary's); ARGV[4]: now in ms; ARGV[4 + i]: record i as JSON {order, event_id,
# member, score, source, version, fields}. Returns per record an Upsert code (of its model's
# namespace: the view follows it when the version is current).
UPSERT_LUA = """
local ttl, marker_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local primary, now = ARGV[3] == '1', ARGV[4]
local current = redis.call('GET', KEYS[1])

-- Newer-wins: refuse when the stored record is newer. ``any_model``: a stored record of another
-- model blocks too (the view before any promotion); otherwise only the same model's does, so a
-- current model's record replaces the previous model's in the view.
-- ``cur``: the hash's fields as read() returned them.
local function read(hkey)
  return redis.call('HMGET', hkey, '_order', 'event_id', '_leaderboard', 'model_version')
end

local function put(hkey, zkey, rec, any_model, cur)
  local order = tonumber(cur[1])
  local blocks = any_model or cur[4] == rec.version
  if order and blocks and (order > rec.order or (order == rec.order and cur[2] > rec.event_id)) then
    return 0
  end
  local args = {'_order', string.format('%d', rec.order), '_leaderboard', zkey}
  for k, v in pairs(rec.fields) do
    args[#args + 1] = k
    args[#args + 1] = v
  end
  redis.call('HSET', hkey, unpack(args))
  if ttl > 0 then redis.call('EXPIRE', hkey, ttl) end
  if cur[3] and cur[3] ~= zkey then redis.call('ZREM', cur[3], rec.member) end
  redis.call('ZADD', zkey, rec.score, rec.member)
  if ttl > 0 then redis.call('EXPIRE', zkey, ttl) end
  if order then return 1 end
  return 3
end

local out = {}
local seen = {}
for i = 5, #ARGV do
  local rec = cjson.decode(ARGV[i])
  local k = 2 + ${per} * (i - 5)
  local ekey, info = KEYS[k + 5], KEYS[k + 6]
  local claimed = redis.call('GET', ekey)
  if claimed and claimed ~= rec.source then
    out[#out + 1] = 2
  else
    -- Both of the track's hashes are read before the record writes anything: one holding
    -- another type fails the script here, so a dead-lettered record leaves nothing behind.
    local in_view = (current and current == rec.version) or (not current and primary)
    local mine = read(KEYS[k + 3])
    local shown = in_view and read(KEYS[k + 1])
    if not claimed then redis.call('SET', ekey, rec.source, 'EX', marker_ttl) end
    local wrote = put(KEYS[k + 3], KEYS[k + 4], rec, true, mine)
    if wrote == 3 then redis.call('HINCRBY', info, 'tracks', 1) end
    if not seen[rec.version] then
      seen[rec.version] = true
      redis.call('SADD', KEYS[2], rec.version)
      redis.call('HSET', info, 'last_write_ms', now)
    end
    if in_view then put(KEYS[k + 1], KEYS[k + 2], rec, not current, shown) end
    out[#out + 1] = math.min(wrote, 1)
  end
end
return out
""".replace("${per}", str(KEYS_PER_RECORD))


# KEYS[i]: an event marker; ARGV[i]: the record that may hold it. Deleted only if it does.
RELEASE_LUA = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return #KEYS
"""


class Upsert(IntEnum):
    """What the script did with one record."""

    STALE = 0
    """A newer score of the track was already stored; the record is still a valid result."""
    WRITTEN = 1
    DUPLICATE = 2
    """Another Kafka record already carried this event id: not scored again, not emitted."""


class RedisSink:
    """Score hashes, leaderboards and event markers in one round trip per batch."""

    def __init__(self, client: redis.Redis, ttl_s: int = 0, marker_ttl_s: int = 7 * 86_400) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.marker_ttl_s = marker_ttl_s
        self.failing: str | None = None
        """Why the last write is being retried; None once one succeeds (read by /readyz)."""
        self._upsert = client.register_script(UPSERT_LUA)
        self._release = client.register_script(RELEASE_LUA)

    def write(
        self,
        records: Sequence[ScoreRecord],
        sources: Sequence[str],
        stop: threading.Event,
        primary: bool = True,
    ) -> list[Upsert | DeadLetter]:
        """Upsert every record (``sources[i]`` names its Kafka record) into its model's
        namespace, and into the view when its model is current (or, before any promotion, when
        ``primary``: the live consumer's own model). A record whose write cannot even be built
        gets its dead letter instead (internal_error), the others are written. Redis outages
        are retried with capped exponential backoff until it answers, or until ``stop`` is
        set."""
        built = [_built(record, source) for record, source in zip(records, sources, strict=True)]
        writes = [item for item in built if not isinstance(item, DeadLetter)]
        codes = iter(self._isolated(writes, stop, primary))
        return [item if isinstance(item, DeadLetter) else next(codes) for item in built]

    def _isolated(
        self, writes: list[Any], stop: threading.Event, primary: bool
    ) -> list[Upsert | DeadLetter]:
        """The writes' codes: the batch in one call; when a key holds the wrong type (a stray
        ``SET`` on a score hash, say), each half again, down to the records whose own keys are
        wrong (dead-lettered, the key named), so one such record costs itself alone and not
        a crash loop. Every step is idempotent, so rewriting a half is harmless; a record whose
        own key is wrong has written nothing (the script reads its keys first)."""
        if not writes:
            return []
        try:
            return list(self._write_batch(writes, stop, primary))
        except redis.ResponseError as exc:
            if not _wrong_type_reply(exc):
                raise  # any other error reply is a bug: it stops the process
            if len(writes) == 1:
                return [self._alone(writes[0], exc, stop, primary)]
            log.warning(
                "a key of %d records holds the wrong type; splitting the batch", len(writes)
            )
            half = len(writes) // 2
            return self._isolated(writes[:half], stop, primary) + self._isolated(
                writes[half:], stop, primary
            )

    def _write_batch(self, writes: list[Any], stop: threading.Event, primary: bool) -> list[Upsert]:
        return self._upsert_all(writes, stop, primary)

    def _alone(
        self, write: Any, exc: redis.ResponseError, stop: threading.Event, primary: bool
    ) -> Upsert | DeadLetter:
        """One record's write that met a key of the wrong type. Found no more (the failed
        script had already moved the hash off the day it was leaving, say), it is tried again
        once."""
        found = self._wrong_type(write, exc, stop)
        if found is not None:
            return found
        try:
            return self._write_batch([write], stop, primary)[0]
        except redis.ResponseError as again:
            if not _wrong_type_reply(again):
                raise
            return DeadLetter(DeadLetterReason.INTERNAL_ERROR, f"redis: {again}"[:300])

    def _wrong_type(
        self, write: Any, exc: redis.ResponseError, stop: threading.Event
    ) -> DeadLetter | None:
        """The dead letter naming the record's own key (its track's hashes, its event marker)
        of the wrong type; None when no key is wrong any more. A key many records write (the
        pointer, the models set, a day leaderboard, a version's info) stops the process
        instead, naming it: every record writing it would be dead-lettered, and the fault is
        the store's, not the events'."""
        shared, own = self._expected_types(write, stop)
        for keys, fatal in ((shared, True), (own, False)):
            for key, expected in keys.items():
                held = self._type(key, stop)
                if held not in ("none", expected):
                    what = f"redis key {key!r} holds a {held}, not a {expected}"
                    if fatal:
                        raise SinkError(f"{what}: fix or delete it") from exc
                    return DeadLetter(DeadLetterReason.INTERNAL_ERROR, what[:300])
        return None

    def _expected_types(
        self, write: Any, stop: threading.Event
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(keys many records write, this record's own keys), each with its type: the day
        leaderboards the track's hashes name (the day it leaves) count among the shared."""
        keys, _item = write
        hashes = [keys[0], keys[2]]
        shared = {
            CURRENT_MODEL_KEY: "string",
            MODELS_KEY: "set",
            keys[1]: "zset",
            keys[3]: "zset",
            keys[5]: "hash",
            **dict.fromkeys(self._boards_named(hashes, ("_leaderboard",), stop), "zset"),
        }
        return shared, {keys[0]: "hash", keys[2]: "hash", keys[4]: "string"}

    def _boards_named(
        self, hashes: list[str], fields: tuple[str, ...], stop: threading.Event
    ) -> list[str]:
        """The leaderboards these score hashes name in ``fields`` (those that are hashes)."""
        boards: list[str] = []
        for key in hashes:
            if self._type(key, stop) == "hash":
                named = self.retrying(partial(self.client.hmget, key, fields), stop)
                boards += [as_text(board) for board in named if board]
        return boards

    def _type(self, key: str, stop: threading.Event) -> str:
        return as_text(self.retrying(lambda: self.client.type(key), stop))

    def release(self, claims: Sequence[tuple[str, str, str]], stop: threading.Event) -> None:
        """Give up the event-id claims these records (``(event_id, model_version, source)``)
        hold: each was dead-lettered, so a later record with its event (``replay-dlq``) is no
        duplicate. An earlier, aborted attempt may have claimed it; a claim of another record
        stays."""
        if claims:
            keys = [event_key(event_id, version) for event_id, version, _ in claims]
            self._call(self._release, keys, [source for *_, source in claims], stop)

    def _upsert_all(
        self, writes: list[tuple[list[str], str]], stop: threading.Event, primary: bool
    ) -> list[Upsert]:
        keys = [CURRENT_MODEL_KEY, MODELS_KEY]
        keys += [key for record_keys, _ in writes for key in record_keys]
        now_ms = int(time.time() * 1000)
        args: list[Any] = [
            self.ttl_s,
            self.marker_ttl_s,
            int(primary),
            now_ms,
            *(item for _, item in writes),
        ]
        return [Upsert(int(code)) for code in self._call(self._upsert, keys, args, stop)]

    def _call(self, script: Any, keys: list[str], args: list[Any], stop: threading.Event) -> Any:
        return self.retrying(lambda: script(keys=keys, args=args), stop)

    def retrying(self, attempt: Callable[[], T], stop: threading.Event) -> T:
        """Run ``attempt`` (idempotent); Redis outages are retried with capped exponential
        backoff until it answers, or until ``stop`` is set (SinkError)."""
        delay = 0.1
        while True:
            try:
                result = attempt()
                self.failing = None
                return result
            except _TRANSIENT as exc:
                self.failing = str(exc)[:200]
                self._recover(exc)
                if stop.is_set():
                    raise SinkError(f"redis unavailable and stopping: {exc}") from exc
                log.warning("redis write failed (%s); retrying in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, _backoff_cap(exc))

    def _recover(self, exc: Exception) -> None:
        if isinstance(exc, redis.ReadOnlyError):
            # A failover left this connection on a replica: reconnect (the name may point at
            # the new primary by now).
            self.client.connection_pool.disconnect()


# Outages and the replies a Redis gives while failing over or out of memory: wait and retry
# (LOADING is a ConnectionError). Any other error reply is a bug and stops the process.
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.NoScriptError,  # a node lost its scripts again (a replica promoted meanwhile)
    redis.exceptions.ClusterDownError,
    # Redis Cluster: a slot moved or lost its primary (cluster_sink refreshes the slot map).
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterException,  # e.g. no node answers while the cluster re-elects
)


def _backoff_cap(exc: Exception) -> float:
    """A slot being migrated (TRYAGAIN: a multi-key call on keys the migration split) is
    over in milliseconds to seconds: retry it often, so writes resume as soon as it is. A
    replica short of a WAIT, or the promotion epoch moving, is not that."""
    # TRYAGAIN itself, not its subclasses (NotReplicated, EpochMoving); ASK and MOVED too.
    migrating = type(exc) is redis.exceptions.TryAgainError
    return (
        MIGRATION_BACKOFF_S
        if migrating or isinstance(exc, redis.exceptions.AskError)
        else MAX_BACKOFF_S
    )


def _wrong_type_reply(exc: redis.ResponseError) -> bool:
    # Anywhere in the reply: Redis 6 words a script's error differently from 7.
    return "WRONGTYPE" in str(exc)


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _built(record: ScoreRecord, source: str) -> tuple[list[str], str] | DeadLetter:
    """The record's keys (view hash and day leaderboard, its model's hash and day leaderboard,
    event marker, model info) and its script argument."""
    try:
        day, version, track = utc_day(record), record.model_version, record.track_id
        keys = [
            score_key(track),
            leaderboard_key(day),
            model_score_key(version, track),
            model_leaderboard_key(version, day),
            event_key(record.event_id, version),
            model_info_key(version),
        ]
        return keys, json.dumps(_script_item(record, source))
    except Exception as exc:  # building one record's write costs that record alone
        return internal_error(exc)


def utc_day(record: ScoreRecord) -> date:
    """The UTC day whose leaderboard ranks the record."""
    return record.emitted_at.astimezone(UTC).date()


def _script_item(record: ScoreRecord, source: str) -> dict[str, Any]:
    return {
        "order": int(record.emitted_at.timestamp() * 1_000_000),
        "event_id": record.event_id,
        "member": record.track_id,
        "score": record.popularity,
        "source": source,
        "version": record.model_version,
        "fields": record.redis_fields(),
    }
