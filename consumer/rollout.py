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

Every step is fenced by the promotion epoch that step 1 raises: a promotion that stalled
(its lock expired) and meets a later one's epoch stops at its next step instead of writing its
version over the later one's.

Hashes go first: a live write of the new version during step 2 moves its track between the
view's days from the hash's own pointer, and step 3 then copies leaderboards that already agree
with the new version's hashes, so every track ends on the one day its hash names. Until its
day's step 3 a reader can find a track whose hash is already the new model's while the day's
leaderboard still ranks by the old one; its ``model_version`` field says which. Promotion is
idempotent: run it again after an interruption and it finishes the job.
"""

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge
from redis.cluster import RedisCluster
from redis.crc import key_slot

from consumer.cluster_sink import SCRIPTS, board_ops_calls
from consumer.errors import PopscoreError
from consumer.redis_client import AnyRedis, NodePipelines, Script, keys_for, scan_prefix
from schemas.redis_keys import KEY_PREFIX, RedisKeys, model_prefix

log = logging.getLogger(__name__)
SCAN_COUNT = 1000
BATCH_TRACKS = 500
LOCK_TTL_MS = 60_000  # a crashed promotion frees the lock within a minute
LOCK_REFRESH_S = 10.0
VIEW_CHECK_S = 15.0
STALE_S = 3600.0  # a version nobody wrote for this long is probably scored by no one
VIEW_LEADERBOARD_PREFIX = f"{KEY_PREFIX}:leaderboard:"
VIEW_SCORE_PREFIX = f"{KEY_PREFIX}:score:"

# Step 1 on either layout. KEYS: the promotion hash, the pointer, the epoch (one slot on a
# cluster); ARGV: from, to, started_at. Cluster writers read the epoch with the pointer.
# The epoch never goes back, even when its key was lost (a failover before replication, an
# eviction): it is at least the server's clock in ms, so a promotion run again after such a loss
# gets an epoch above every hash the lost one stamped.
BEGIN_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'from', ARGV[1], 'to', ARGV[2], 'state', 'switching',
  'started_at', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
local clock = redis.call('TIME')
local floor = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local epoch = redis.call('INCR', KEYS[3])
if epoch < floor then
  redis.call('SET', KEYS[3], string.format('%d', floor))
  epoch = floor
end
return epoch
"""

# Step 2 on a cluster: PROMOTE_LUA's rule, for the tracks of one hash slot, with the cluster
# sink's write sequence and epoch. ARGV[4]: the epoch. Returns {replaced, the leaderboard
# changes as JSON} for the sink's step 4, which replaces step 3 (a COPY between day slots is
# refused on a cluster): each track moves between the view's days by itself.
PROMOTE_CLUSTER_LUA = """
local version, model_boards, view_boards = ARGV[1], ARGV[2], ARGV[3]
local epoch = ARGV[4]
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local moved, ops = 0, {}
for i = 1, #KEYS, 2 do
  local src, dst = KEYS[i], KEYS[i + 1]
  local flat = redis.call('HGETALL', src)
  if #flat > 0 then
    local f = {}
    for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
    local cur = redis.call('HMGET', dst, '_order', 'event_id', '_leaderboard', 'model_version',
      '_seq', '_prev_leaderboard', 'popularity', '_epoch')
    local order, mine = tonumber(cur[1]), tonumber(f._order)
    local kept = cur[4] == version and order and
      (order > mine or (order == mine and cur[2] >= f.event_id))
    if (tonumber(cur[8]) or 0) > tonumber(epoch) then
      -- A later promotion (or a consumer writing under it) owns this hash: leave it alone.
      kept = 'newer'
    elseif kept and cur[3] and cur[5] and cur[7] then
      -- Already switched (a rerun after a promotion that stopped between this step and the
      -- leaderboard changes, or a newer live write): repeat the changes its hash records, at
      -- its sequence; the day boards skip what they already applied.
      if cur[6] and cur[6] ~= '' and cur[6] ~= cur[3] then
        ops[#ops + 1] = {cur[6], f.track_id, cur[5], ''}
      end
      ops[#ops + 1] = {cur[3], f.track_id, cur[5], cur[7]}
    end
    if not kept then
      local zkey = view_boards .. string.sub(f._leaderboard, #model_boards + 1)
      local seq = string.format('%d', math.max((tonumber(cur[5]) or 0) + 1, now_us))
      f._leaderboard, f._seq, f._epoch = zkey, seq, epoch
      f._prev_leaderboard = ''
      if cur[3] and cur[3] ~= zkey then f._prev_leaderboard = cur[3] end
      local args = {}
      for k, v in pairs(f) do
        args[#args + 1] = k
        args[#args + 1] = v
      end
      redis.call('DEL', dst)
      redis.call('HSET', dst, unpack(args))
      local pttl = redis.call('PTTL', src)
      if pttl > 0 then redis.call('PEXPIRE', dst, pttl) end
      if cur[3] and cur[3] ~= zkey then ops[#ops + 1] = {cur[3], f.track_id, seq, ''} end
      ops[#ops + 1] = {zkey, f.track_id, seq, f.popularity}
      moved = moved + 1
    end
  end
end
return {moved, cjson.encode(ops)}
"""

# KEYS[1]: the promotion epoch; then pairs (the model's hash, the view's hash). ARGV[1]: the
# model version; ARGV[2]: its leaderboard key prefix; ARGV[3]: the view's; ARGV[4]: this
# promotion's epoch. Replaces each view hash by the model's record (leaderboard field pointed at
# the view's day key, TTL carried over) unless the view already holds a newer record of the same
# version; removes the track from the old record's day leaderboard when that was another day.
# Returns how many were replaced, or -1 (nothing written) once a later promotion has begun.
PROMOTE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[4] then return -1 end
local version, model_boards, view_boards = ARGV[1], ARGV[2], ARGV[3]
local moved = 0
for i = 2, #KEYS, 2 do
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


# Step 3 on one node. KEYS: the promotion epoch, the version's day leaderboard, the view's of
# that day; ARGV[1]: this promotion's epoch. -1 (nothing copied) once a later one has begun.
COPY_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('COPY', KEYS[2], KEYS[3], 'REPLACE')
"""

# The end, on either layout. KEYS: the promotion hash, the epoch (one slot on a cluster);
# ARGV: this promotion's epoch, then the fields to set. -1 once a later one has begun.
FINISH_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# The lock, held by its token. KEYS[1]: the lock; ARGV[1]: the token; ARGV[2]: ms, or 0 to
# release it. 1 while the token holds it, 0 once it does not.
LOCK_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


class PromotionError(PopscoreError):
    """The promotion cannot start (unknown version, another one running), or a later one
    superseded it while it ran."""


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


def current_model(client: AnyRedis) -> str | None:
    """The version the view shows; None before the first promotion."""
    value = client.get(keys_for(client).current_model)
    return _text(value) if value is not None else None


class ViewWatch:
    """Whether this consumer's scores reach the view (popscore_view_fed): once a version is
    promoted, only that version's writes do, so a live consumer serving another one (a reload or
    rollout after ``popscore promote``) scores on while the view stands still. Checked from
    the sink stage at most every VIEW_CHECK_S; a change is logged (a warning on the live
    consumer, where it is a fault; a backfill's model reaches the view only once promoted)."""

    def __init__(self, client: AnyRedis, gauge: Gauge, live: bool) -> None:
        self.client, self.gauge, self.live = client, gauge, live
        self.fed: bool | None = None
        self._checked = -VIEW_CHECK_S

    def check(self, primary: str, shadow: str | None) -> None:
        if time.monotonic() - self._checked < VIEW_CHECK_S:
            return
        try:
            current = current_model(self.client)
        except Exception as exc:  # a gauge never fails a batch: the next check reads again
            log.debug("current model not read: %s", exc)
            return
        self._checked = time.monotonic()
        fed = current in (primary, shadow) if current else self.live
        self.gauge.set(int(fed))
        if fed != self.fed:
            self._log(fed, current, primary)
        self.fed = fed

    def _log(self, fed: bool, current: str | None, primary: str) -> None:
        if fed:
            log.info("this consumer's scores reach the view (current model: %s)",
                     current or f"none promoted: {primary}, the live primary")  # fmt: skip
        elif self.live:
            log.warning(
                "the view shows %s (popscore promote), so this consumer's scores of %s reach "
                "only its own namespace: promote %s, or serve %s (docs/OPERATIONS.md, "
                '"Roll out a model")', current, primary, primary, current,
            )  # fmt: skip


def models(client: AnyRedis) -> list[ModelEntry]:
    """Every version that has written a score, the most recently written first."""
    keys = keys_for(client)
    current = current_model(client)
    entries = []
    for raw in client.smembers(keys.models):
        version = _text(raw)
        tracks, last = client.hmget(keys.model_info(version), ["tracks", "last_write_ms"])
        when = datetime.fromtimestamp(int(last) / 1000, UTC) if last else None
        entries.append(ModelEntry(version, int(tracks or 0), when, version == current))
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(entries, key=lambda e: e.last_write or epoch, reverse=True)


def promote(
    client: AnyRedis,
    version: str,
    progress: Callable[[int, int], None] | None = None,
    ttl_s: int = 0,
    force: bool = False,
    min_replicas: int = 0,
) -> Promotion:
    """Make ``version`` current and copy its namespace into the view (module docstring).
    ``ttl_s``: the scores' TTL (POPSCORE_REDIS_TTL_S); a version whose last write is older has
    none left, and is refused unless ``force``. ``min_replicas`` (a cluster's
    POPSCORE_REDIS_MIN_REPLICAS): each step's writes wait for that many replicas, as the
    sink's do: a pointer lost in a failover would leave the switched hashes' epoch above the
    epoch key, refusing every view write of them."""
    keys = keys_for(client)
    _namespace_name(keys, version)
    if not client.sismember(keys.models, version):
        raise PromotionError(
            f"no scores of {version!r} in Redis: score with it first (shadow or backfill); "
            "`popscore models` lists the versions there are"
        )
    _check_fresh(client, keys, version, ttl_s, force)
    layout = _steady_layout(client)
    start = time.monotonic()
    with _lock(client, keys, version) as lock:
        previous = current_model(client)
        epoch = _begin(client, keys, previous, version, min_replicas)
        fence = _Fence(client, keys, epoch, lock, min_replicas)
        seen, replaced = _switch_tracks(client, keys, version, fence, progress)
        while (now := _steady_layout(client)) != layout:  # a slot moved during the scan
            log.warning("the cluster's slots moved during the switch: switching again")
            layout = now
            seen, replaced = _switch_tracks(client, keys, version, fence, progress)
        # On a cluster each track moved between the view's days in step 2 already.
        days = 0 if keys.cluster else _switch_leaderboards(client, version, fence)
        fence.finish({"state": "done", "finished_at": _now(), "days": days, "tracks": replaced})
    promotion = Promotion(previous, version, days, seen, replaced, time.monotonic() - start)
    log.info("%s", promotion.report())
    return promotion


def _check_fresh(client: AnyRedis, keys: RedisKeys, version: str, ttl_s: int, force: bool) -> None:
    """After a promotion only ``version``'s writes change the view: refuse one whose scores
    have all expired (unless ``force``), warn about one nobody has written for an hour."""
    last = client.hget(keys.model_info(version), "last_write_ms")
    idle_s = time.time() - int(last) / 1000 if last else float("inf")
    if ttl_s and idle_s > ttl_s and not force:
        raise PromotionError(
            f"every score of {version} has expired (no write for {_ago(idle_s)}, "
            f"POPSCORE_REDIS_TTL_S is {ttl_s}): the view would keep the old records until "
            f"{version} scores again; --force promotes it anyway"
        )
    if idle_s > STALE_S:
        log.warning(
            "no consumer has written a score of %s for %s: after the promotion the view changes "
            "only as %s scores, so serve or shadow it (docs/OPERATIONS.md, \"Roll out a model\")",
            version, _ago(idle_s), version,
        )  # fmt: skip


def _ago(seconds: float) -> str:
    if seconds == float("inf"):
        return "ever"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def drop(client: AnyRedis, version: str) -> int:
    """Delete a retired version's namespace (its hashes, leaderboards, event claims, info) and
    forget it; the current version is refused. Returns how many keys went."""
    keys = keys_for(client)
    _namespace_name(keys, version)
    if not client.sismember(keys.models, version):
        raise PromotionError(f"no scores of {version!r} in Redis (`popscore models`)")
    layout = _steady_layout(client)
    with _lock(client, keys, version) as lock:  # never while a promotion copies from it
        if version == current_model(client):
            raise PromotionError(f"{version} is the current model: promote another one first")
        client.srem(keys.models, version)  # first: a consumer still scoring it adds it back
        gone = _unlink_namespace(client, keys, version, lock)
        while (now := _steady_layout(client)) != layout:  # a slot moved during the scan
            layout = now
            gone += _unlink_namespace(client, keys, version, lock)
        return gone


def _unlink_namespace(client: AnyRedis, keys: RedisKeys, version: str, lock: "_Lock") -> int:
    gone, batch = 0, []
    for key in _scan(client, model_prefix(version)):
        batch.append(key)
        if len(batch) >= SCAN_COUNT:
            gone += int(client.unlink(*batch))
            batch = []
            lock.refresh()  # a namespace of millions of keys outlives the lock's minute
    if batch:
        gone += int(client.unlink(*batch))
    if keys.cluster:  # the info hash lives in the {meta} slot, outside the prefix
        gone += int(client.unlink(keys.model_info(version)))
    return gone


def _steady_layout(client: AnyRedis) -> str:
    """Which primary serves which slots ("" on one node). A slot being migrated is refused:
    promote and drop scan node by node, and a key moving meanwhile would be missed; a layout
    that changed by the end of a scan (a migration that began and ended during it) means the
    scan runs again."""
    if not isinstance(client, RedisCluster):
        return ""
    layout: set[str] = set()
    for node in client.get_primaries():  # type: ignore[no-untyped-call]
        nodes = client.execute_command("CLUSTER NODES", target_nodes=node)  # type: ignore[no-untyped-call]
        for address, info in nodes.items():
            if "myself" in info["flags"] and info["migrations"]:
                moving = ", ".join(f"{m['slot']} {m['state']}" for m in info["migrations"])
                raise PromotionError(
                    f"slots are being moved ({address}: {moving}): run it once the reshard "
                    "is over (`redis-cli --cluster check` lists open slots, `--cluster fix` "
                    "closes one left open)"
                )
            if "master" in info["flags"]:
                layout.add(f"{info['node_id']} {info['slots']}")
    return "\n".join(sorted(layout))


def _namespace_name(keys: RedisKeys, version: str) -> None:
    """Artifacts refuse a ":" or a brace in model_version: such a name would share another's
    key prefix or move its keys to another cluster slot."""
    try:
        keys.version(version)
    except ValueError as exc:
        raise PromotionError(f"{version!r} is no model_version: {exc}") from None


def _begin(
    client: AnyRedis, keys: RedisKeys, previous: str | None, version: str, min_replicas: int
) -> int:
    """Step 1: the pointer and the promotion's state in one script; returns the new epoch."""
    names = [keys.promotion, keys.current_model, keys.promotion_epoch]
    args = [previous or "", version, _now()]
    if isinstance(client, RedisCluster) and min_replicas:
        nodes = NodePipelines(client, [], min_replicas)  # the script, then WAIT, on one connection
        # First a write-free round with its WAIT: a {meta} primary short of replicas is refused
        # before the pointer moves, not after (which left the view half promoted).
        nodes.run([(names[0], ("EXISTS", names[0]))])
        return int(nodes.run([(names[0], ("EVAL", BEGIN_LUA, len(names), *names, *args))])[0])
    return int(client.eval(BEGIN_LUA, len(names), *names, *args))


class _Fence:
    """This promotion's epoch and lock: each step checks them, and stops the promotion once a
    later one has begun (its epoch is higher), so a stalled promotion never writes its version
    over a later one's."""

    def __init__(
        self, client: AnyRedis, keys: RedisKeys, epoch: int, lock: "_Lock", min_replicas: int = 0
    ) -> None:
        self.client, self.keys, self.epoch, self.lock = client, keys, epoch, lock
        self.min_replicas = min_replicas

    def checked(self, reply: Any) -> int:
        """A fenced script's reply: its count, or PromotionError when it found a later epoch."""
        if int(reply) == -1:
            self.superseded()
        self.lock.refresh()
        return int(reply)

    def check(self) -> None:
        """Before a step no script can fence (on a cluster the epoch is in another slot)."""
        now = self.client.get(self.keys.promotion_epoch)
        if int(now or 0) != self.epoch:
            self.superseded()
        self.lock.refresh()

    def finish(self, fields: dict[str, Any]) -> None:
        """The promotion's state, unless a later promotion's is there by now."""
        flat = [str(item) for pair in fields.items() for item in pair]
        keys = (self.keys.promotion, self.keys.promotion_epoch)
        self.checked(self.client.eval(FINISH_LUA, 2, *keys, self.epoch, *flat))

    def superseded(self) -> None:
        raise PromotionError(
            f"a later promotion began while this one ran (epoch {self.epoch} is no longer "
            "current): stopped; `popscore models` shows the current version"
        )


def _switch_leaderboards(client: AnyRedis, version: str, fence: _Fence) -> int:
    """Step 3: each of the version's day leaderboards replaces the view's, one command each."""
    prefix = f"{model_prefix(version)}leaderboard:"
    epoch_key = fence.keys.promotion_epoch
    days = 0
    for key in _scan(client, prefix):
        day = key[len(prefix) :]
        fence.checked(client.eval(COPY_LUA, 3, epoch_key, key, VIEW_LEADERBOARD_PREFIX + day,
                                  fence.epoch))  # fmt: skip
        days += 1
    return days


def _switch_tracks(
    client: AnyRedis,
    keys: RedisKeys,
    version: str,
    fence: _Fence,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Step 2: every track's hash, BATCH_TRACKS per round trip."""
    source = f"{model_prefix(version)}score:"
    if isinstance(client, RedisCluster):
        switch: Callable[[list[str]], int] = _ClusterSwitch(client, version, fence).run
    else:
        script = client.register_script(PROMOTE_LUA)
        args = [version, f"{model_prefix(version)}leaderboard:", VIEW_LEADERBOARD_PREFIX]
        args.append(str(fence.epoch))

        def switch(pairs: list[str]) -> int:
            return fence.checked(script(keys=[keys.promotion_epoch, *pairs], args=args))

    seen = replaced = 0
    batch: list[str] = []
    for key in _scan(client, source):
        batch += [key, VIEW_SCORE_PREFIX + key[len(source) :]]
        if len(batch) >= 2 * BATCH_TRACKS:
            replaced += switch(batch)
            seen += len(batch) // 2
            batch = []
            if progress:
                progress(seen, replaced)
    if batch:
        replaced += switch(batch)
        seen += len(batch) // 2
    return seen, replaced


class _ClusterSwitch:
    """Step 2 on a cluster: one PROMOTE_CLUSTER_LUA call per hash slot, then the leaderboard
    changes they return, by the cluster sink's step 4."""

    def __init__(self, client: RedisCluster, version: str, fence: _Fence) -> None:
        self.script = Script(PROMOTE_CLUSTER_LUA)
        scripts = [self.script, *SCRIPTS.values()]
        self.nodes = NodePipelines(client, scripts, fence.min_replicas)
        prefix = model_prefix(version)
        self.args = [version, f"{prefix}leaderboard:", VIEW_LEADERBOARD_PREFIX, fence.epoch]
        self.fence = fence

    def run(self, pairs: list[str]) -> int:
        # The epoch lives in another slot: checked before each batch; within one, a hash a
        # later promotion already switched carries its higher epoch and is left alone.
        self.fence.check()
        by_slot: dict[int, list[str]] = defaultdict(list)
        for i in range(0, len(pairs), 2):
            by_slot[key_slot(pairs[i].encode())] += pairs[i : i + 2]
        calls = [(keys[0], self.script.command(keys, self.args)) for keys in by_slot.values()]
        replaced, ops = 0, list[list[str]]()
        for moved, changes in self.nodes.run(calls):
            replaced += int(moved)
            ops += json.loads(changes) if changes != b"{}" else []
        if ops:
            self.nodes.run(board_ops_calls(ops, ttl_s=0))
        return replaced


def _scan(client: AnyRedis, prefix: str) -> Iterator[str]:
    return scan_prefix(client, prefix, SCAN_COUNT)


class _Lock:
    """The promotion lock, held by a token: refreshed and released only while the token still
    holds it (an expired lock may be another promotion's by then)."""

    def __init__(self, client: AnyRedis, keys: RedisKeys, version: str) -> None:
        self.client, self.key = client, keys.promotion_lock
        self.token = f"{version} {uuid.uuid4().hex[:8]} {_now()}"
        self.refreshed = time.monotonic()

    def take(self) -> None:
        if not self.client.set(self.key, self.token, nx=True, px=LOCK_TTL_MS):
            held = self.client.get(self.key)
            raise PromotionError(f"another promotion is running ({_text(held or b'?')})")

    def refresh(self) -> None:
        """At most every LOCK_REFRESH_S. A lost lock (this process stalled past its TTL) is
        taken again when free; the epoch, not the lock, keeps a later promotion's work safe."""
        if time.monotonic() - self.refreshed < LOCK_REFRESH_S:
            return
        if not self.client.eval(LOCK_LUA, 1, self.key, self.token, LOCK_TTL_MS):
            log.warning("the promotion lock expired while this promotion stalled; taking it again")
            self.take()
        self.refreshed = time.monotonic()

    def release(self) -> None:
        self.client.eval(LOCK_LUA, 1, self.key, self.token, 0)


@contextmanager
def _lock(client: AnyRedis, keys: RedisKeys, version: str) -> Iterator[_Lock]:
    """One promotion at a time: a second one is refused while the first holds the lock."""
    lock = _Lock(client, keys, version)
    lock.take()
    try:
        yield lock
    finally:
        lock.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _text(value: bytes | str | Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
