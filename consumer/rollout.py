"""Which model readers see: ``popscore promote`` copies a model version's namespace into the view
and makes it current; ``popscore models`` lists the versions Redis holds (``--drop`` deletes a
retired one's namespace).

The switch, as a reader observes it (docs/INTERFACE.md, "Redis"):

1. ``popscore:current_model`` is set to the new version (one command, with the promotion's state
   in ``popscore:promotion``). From then on every consumer's write of the new version reaches
   the view and no other version's does.
2. Each track's hash is replaced by the new version's in one script call (whole records, never a
   mix of fields), in batches; a track the new version never scored keeps the old record. A
   record the new version wrote meanwhile is newer and kept.
3. Each of the new version's day leaderboards replaces the view's of that day in one command
   (``COPY … REPLACE``). A day the new version never scored keeps the old ranking.

Hashes go first: a live write of the new version during step 2 moves its track between the
view's days from the hash's own pointer, and step 3 then copies leaderboards that already agree
with the new version's hashes, so every track ends on the one day its hash names. Until its
day's step 3 a reader can find a track whose hash is already the new model's while the day's
leaderboard still ranks by the old one; its ``model_version`` field says which. Promotion is
idempotent: run it again after an interruption and it finishes the job.
"""

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from redis.typing import EncodableT, FieldT

from consumer.errors import PopscoreError
from schemas.redis_keys import (
    CURRENT_MODEL_KEY,
    KEY_PREFIX,
    MODELS_KEY,
    PROMOTION_KEY,
    model_info_key,
    model_prefix,
)

log = logging.getLogger(__name__)
SCAN_COUNT = 1000
BATCH_TRACKS = 500
LOCK_KEY = f"{KEY_PREFIX}:promotion:lock"
LOCK_TTL_MS = 60_000  # refreshed every batch: a crashed promotion frees the lock within a minute
VIEW_LEADERBOARD_PREFIX = f"{KEY_PREFIX}:leaderboard:"

# KEYS: pairs (the model's hash, the view's hash). ARGV[1]: the model version; ARGV[2]: its
# leaderboard key prefix; ARGV[3]: the view's. Replaces each view hash by the model's record
# (leaderboard field pointed at the view's day key, TTL carried over) unless the view already
# holds a newer record of the same version; removes the track from the old record's day
# leaderboard when that was another day. Returns how many were replaced.
PROMOTE_LUA = """
local version, model_boards, view_boards = ARGV[1], ARGV[2], ARGV[3]
local moved = 0
for i = 1, #KEYS, 2 do
  local src, dst = KEYS[i], KEYS[i + 1]
  local flat = redis.call('HGETALL', src)
  if #flat > 0 then
    local f = {}
    for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
    local cur = redis.call('HMGET', dst, '_order', 'event_id', '_leaderboard', 'model_version')
    local order, mine = tonumber(cur[1]), tonumber(f._order)
    local kept = cur[4] == version and order and
      (order > mine or (order == mine and cur[2] >= f.event_id))
    if not kept then
      local zkey = view_boards .. string.sub(f._leaderboard, #model_boards + 1)
      f._leaderboard = zkey
      local args = {}
      for k, v in pairs(f) do
        args[#args + 1] = k
        args[#args + 1] = v
      end
      redis.call('DEL', dst)
      redis.call('HSET', dst, unpack(args))
      local pttl = redis.call('PTTL', src)
      if pttl > 0 then redis.call('PEXPIRE', dst, pttl) end
      if cur[3] and cur[3] ~= zkey then redis.call('ZREM', cur[3], f.track_id) end
      moved = moved + 1
    end
  end
end
return moved
"""


class PromotionError(PopscoreError):
    """The promotion cannot start (unknown version, another one running)."""


@dataclass(frozen=True)
class ModelEntry:
    """One model version Redis holds scores of."""

    version: str
    tracks: int
    """Score hashes the version created (expired ones included when a TTL is set)."""
    last_write: datetime | None
    current: bool


@dataclass(frozen=True)
class Promotion:
    """What one promotion did."""

    previous: str | None
    version: str
    days: int
    tracks_seen: int
    tracks_replaced: int
    seconds: float

    def report(self) -> str:
        before = self.previous or "(none: the live primary model)"
        return (
            f"promoted {self.version} (was {before}): {self.days} day leaderboards and "
            f"{self.tracks_replaced} of {self.tracks_seen} track scores switched in "
            f"{self.seconds:.1f} s"
        )


def current_model(client: redis.Redis) -> str | None:
    """The version the view shows; None before the first promotion."""
    value = client.get(CURRENT_MODEL_KEY)
    return _text(value) if value is not None else None


def models(client: redis.Redis) -> list[ModelEntry]:
    """Every version that has written a score, the most recently written first."""
    current = current_model(client)
    entries = []
    for raw in client.smembers(MODELS_KEY):
        version = _text(raw)
        tracks, last = client.hmget(model_info_key(version), ["tracks", "last_write_ms"])
        when = datetime.fromtimestamp(int(last) / 1000, UTC) if last else None
        entries.append(ModelEntry(version, int(tracks or 0), when, version == current))
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(entries, key=lambda e: e.last_write or epoch, reverse=True)


def promote(
    client: redis.Redis, version: str, progress: Callable[[int, int], None] | None = None
) -> Promotion:
    """Make ``version`` current and copy its namespace into the view (module docstring)."""
    _namespace_name(version)
    if not client.sismember(MODELS_KEY, version):
        raise PromotionError(
            f"no scores of {version!r} in Redis: score with it first (shadow or backfill); "
            "`popscore models` lists the versions there are"
        )
    start = time.monotonic()
    with _lock(client, version):
        previous = current_model(client)
        _begin(client, previous, version)
        seen, replaced = _switch_tracks(client, version, progress)
        days = _switch_leaderboards(client, version)
        client.hset(
            PROMOTION_KEY,
            mapping={"state": "done", "finished_at": _now(), "days": days, "tracks": replaced},
        )
    promotion = Promotion(previous, version, days, seen, replaced, time.monotonic() - start)
    log.info("%s", promotion.report())
    return promotion


def drop(client: redis.Redis, version: str) -> int:
    """Delete a retired version's namespace (its hashes, leaderboards, event claims, info) and
    forget it; the current version is refused. Returns how many keys went."""
    _namespace_name(version)
    if version == current_model(client):
        raise PromotionError(f"{version} is the current model: promote another one first")
    if not client.sismember(MODELS_KEY, version):
        raise PromotionError(f"no scores of {version!r} in Redis (`popscore models`)")
    client.srem(MODELS_KEY, version)  # first: a consumer still scoring it adds it back
    gone, batch = 0, []
    for key in _scan(client, model_prefix(version)):
        batch.append(key)
        if len(batch) >= SCAN_COUNT:
            gone += int(client.unlink(*batch))
            batch = []
    if batch:
        gone += int(client.unlink(*batch))
    return gone


def _namespace_name(version: str) -> None:
    """Artifacts refuse a ":" in model_version: such a name would share another's key prefix."""
    if ":" in version or not version:
        raise PromotionError(f"{version!r} is no model_version (empty, or holds ':')")


def _begin(client: redis.Redis, previous: str | None, version: str) -> None:
    """Step 1: the pointer and the promotion's state, in one transaction."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(PROMOTION_KEY)
    state: dict[FieldT, EncodableT] = {
        "from": previous or "",
        "to": version,
        "state": "switching",
        "started_at": _now(),
    }
    pipe.hset(PROMOTION_KEY, mapping=state)
    pipe.set(CURRENT_MODEL_KEY, version)
    pipe.execute()


def _switch_leaderboards(client: redis.Redis, version: str) -> int:
    """Step 3: each of the version's day leaderboards replaces the view's, one command each."""
    prefix = f"{model_prefix(version)}leaderboard:"
    days = 0
    for key in _scan(client, prefix):
        day = key[len(prefix) :]
        client.copy(key, VIEW_LEADERBOARD_PREFIX + day, replace=True)
        days += 1
    return days


def _switch_tracks(
    client: redis.Redis, version: str, progress: Callable[[int, int], None] | None
) -> tuple[int, int]:
    """Step 2: every track's hash, BATCH_TRACKS per script call."""
    script = client.register_script(PROMOTE_LUA)
    source = f"{model_prefix(version)}score:"
    view = f"{KEY_PREFIX}:score:"
    args = [version, f"{model_prefix(version)}leaderboard:", VIEW_LEADERBOARD_PREFIX]
    seen = replaced = 0
    batch: list[str] = []
    for key in _scan(client, source):
        batch += [key, view + key[len(source) :]]
        if len(batch) >= 2 * BATCH_TRACKS:
            replaced += int(script(keys=batch, args=args))
            seen += len(batch) // 2
            batch = []
            _refresh_lock(client)
            if progress:
                progress(seen, replaced)
    if batch:
        replaced += int(script(keys=batch, args=args))
        seen += len(batch) // 2
    return seen, replaced


def _scan(client: redis.Redis, prefix: str) -> Iterator[str]:
    """Every key starting with ``prefix`` (glob characters in it taken literally)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    for key in client.scan_iter(match=pattern, count=SCAN_COUNT):
        yield _text(key)


@contextmanager
def _lock(client: redis.Redis, version: str) -> Iterator[None]:
    """One promotion at a time: a second one is refused while the first holds the lock."""
    token = f"{version} {uuid.uuid4().hex[:8]} {_now()}"
    if not client.set(LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
        held = client.get(LOCK_KEY)
        raise PromotionError(f"another promotion is running ({_text(held or b'?')})")
    try:
        yield
    finally:
        if client.get(LOCK_KEY) == token.encode():
            client.delete(LOCK_KEY)


def _refresh_lock(client: redis.Redis) -> None:
    client.pexpire(LOCK_KEY, LOCK_TTL_MS)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
