"""Redis Cluster: the same upsert as ``RedisSink``, written so that every script call touches
the keys of one hash slot (docs/RELIABILITY.md, "Redis Cluster").

A batch is four idempotent steps, each one round trip per primary node:

1. the pointer and the promotion epoch (``{meta}`` slot), and each version's bookkeeping;
2. each event's duplicate marker, claimed by ``SET … NX GET`` (its own slot): a marker that
   names this Kafka record is ours (a replay), another record's makes the event a duplicate;
3. each track's hashes, view and model (``{track_id}`` slot), by a script with the
   newer-wins rule of the single-node one; it stamps each hash with a write sequence and
   returns the leaderboard changes the write implies (add to the new day, remove from the old);
4. the leaderboard changes (``{day}`` slot), each applied only when its sequence is newer than
   the one the day last saw for that track, so a late or replayed change never undoes a newer
   one; with them the pointer is read again, and 3 and 4 redone if a promotion began meanwhile.

A crash between steps leaves the offsets uncommitted: the replay finds its own markers, rewrites
the same hashes (same record: no change a reader can see) and re-applies the same leaderboard
changes. View writes carry the promotion epoch they read in step 1; a view hash a newer
promotion already switched refuses them, and those records go through step 3 again with the
new pointer.
"""

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import TryAgainError

from consumer.dead_letters import internal_error
from consumer.errors import DeadLetter
from consumer.redis_client import NodePipelines, Script
from consumer.sinks import RedisSink, Upsert, as_text, utc_day
from schemas.dead_letter import DeadLetterReason
from schemas.redis_keys import CLUSTER
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
EPOCH_MOVED = -1
MAX_EPOCH_RETRIES = 5
# The current version and the promotion epoch ({meta} slot), read together; _pointer decodes it.
POINTER_CALL = (CLUSTER.current_model, ("MGET", CLUSTER.current_model, CLUSTER.promotion_epoch))


class EpochMoving(TryAgainError):
    """Promotions kept starting while one batch was written: retried with backoff, like a
    failover (never fatal)."""


# Step 3. KEYS: per record (view hash, model hash). ARGV[1]: score ttl (0 = none); ARGV[2]: the
# current version ('' = none); ARGV[3]: '1' when the live primary's records write the view
# while none is current; ARGV[4]: the promotion epoch read in step 1; ARGV[4 + i]: record i
# as JSON {order, event_id, member, zscore, version, fields, view_board, model_board}.
# Returns per record {code (Upsert, or -1: the view moved to a newer epoch), created (1 when
# the model hash is new), the leaderboard changes as JSON [[board, member, seq, zscore|'']]}.
HASHES_LUA = """
local ttl, current, primary = tonumber(ARGV[1]), ARGV[2], ARGV[3] == '1'
local epoch = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- Newer-wins as in the single-node script. Each write takes a sequence above the hash's last
-- one and above the clock (a hash that expired and came back still moves forward).
-- ``cur``: the hash's fields as read() returned them.
local function read(hkey)
  return redis.call('HMGET', hkey, '_order', 'event_id', '_leaderboard', 'model_version',
    '_seq', '_epoch', '_prev_leaderboard')
end

local function put(hkey, zkey, rec, any_model, view, ops, cur)
  if view and (tonumber(cur[6]) or 0) > epoch then return -1 end
  local order = tonumber(cur[1])
  local blocks = any_model or cur[4] == rec.version
  if order and blocks and (order > rec.order or (order == rec.order and cur[2] > rec.event_id)) then
    return 0
  end
  -- The day this write takes the track away from. A rewrite of the very record the hash holds
  -- (a retry, or the replay after a crash between steps 3 and 4) finds the day already moved:
  -- it repeats the removal the first try recorded, which step 4 may never have applied.
  local prev = false
  if cur[3] and cur[3] ~= zkey then
    prev = cur[3]
  elseif order == rec.order and cur[2] == rec.event_id and cur[7] and cur[7] ~= ''
    and cur[7] ~= zkey then
    prev = cur[7]
  end
  local seq = string.format('%d', math.max((tonumber(cur[5]) or 0) + 1, now_us))
  local args = {'_order', string.format('%d', rec.order), '_leaderboard', zkey, '_seq', seq,
    '_prev_leaderboard', prev or ''}
  if view then
    args[#args + 1] = '_epoch'
    args[#args + 1] = string.format('%d', epoch)
  end
  for k, v in pairs(rec.fields) do
    args[#args + 1] = k
    args[#args + 1] = v
  end
  redis.call('HSET', hkey, unpack(args))
  if ttl > 0 then redis.call('EXPIRE', hkey, ttl) end
  if prev then ops[#ops + 1] = {prev, rec.member, seq, ''} end
  ops[#ops + 1] = {zkey, rec.member, seq, rec.zscore}
  if order then return 1 end
  return 3
end

local out = {}
for i = 5, #ARGV do
  local rec = cjson.decode(ARGV[i])
  local k = 2 * (i - 5)
  local ops = {}
  -- Both hashes are read before the record writes anything: one holding another type fails
  -- the script here, so a dead-lettered record leaves nothing behind.
  local in_view = current == rec.version or (current == '' and primary)
  local mine = read(KEYS[k + 2])
  local shown = in_view and read(KEYS[k + 1])
  local wrote = put(KEYS[k + 2], rec.model_board, rec, true, false, ops, mine)
  local code = math.min(wrote, 1)
  if in_view then
    if put(KEYS[k + 1], rec.view_board, rec, current == '', true, ops, shown) == -1 then
      code = -1
    end
  end
  local created = 0
  if wrote == 3 then created = 1 end
  out[#out + 1] = {code, created, cjson.encode(ops)}
end
return out
"""

# Step 4. KEYS: pairs (a day leaderboard, its companion HASH member -> sequence of the change
# that last touched it). ARGV[1]: ttl; then 4 per change: pair index, member, seq, zscore or ''
# to remove. A change older than the one the day last applied is skipped.
BOARDS_LUA = """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local k, member, seq, zscore = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local board, seqs = KEYS[k], KEYS[k + 1]
  local held = tonumber(redis.call('HGET', seqs, member))
  if not held or held < tonumber(seq) then
    redis.call('HSET', seqs, member, seq)
    if zscore == '' then
      redis.call('ZREM', board, member)
    else
      redis.call('ZADD', board, zscore, member)
    end
    if ttl > 0 then
      redis.call('EXPIRE', board, ttl)
      redis.call('EXPIRE', seqs, ttl)
    end
  end
end
return (#ARGV - 1) / 4
"""

# KEYS[1]: an event marker; ARGV[1]: the record that may hold it. Deleted only if it does.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SCRIPTS = {
    name: Script(text)
    for name, text in (
        ("hashes", HASHES_LUA),
        ("boards", BOARDS_LUA),
        ("release", RELEASE_LUA),
    )
}


def board_seqs_key(board: str) -> str:
    """A day leaderboard's companion (same slot: the name keeps the board's hash tag)."""
    return f"{board}:seq"


@dataclass
class _Write:
    """One record on its way through the steps."""

    record: ScoreRecord
    source: str
    item: str
    keys: tuple[str, str]
    code: Upsert | None = None
    created: bool = False
    ops: list[list[str]] = field(default_factory=list)


class ClusterRedisSink(RedisSink):
    """``RedisSink``'s guarantees on Redis Cluster (module docstring)."""

    def __init__(
        self,
        client: RedisCluster,
        ttl_s: int = 0,
        marker_ttl_s: int = 7 * 86_400,
        min_replicas: int = 0,
        replica_wait_ms: int = 2000,
    ) -> None:
        self.client = client  # type: ignore[assignment]
        self.ttl_s = ttl_s
        self.marker_ttl_s = marker_ttl_s
        self.failing = None
        scripts = list(SCRIPTS.values())
        self.nodes = NodePipelines(client, scripts, min_replicas, replica_wait_ms)

    def write(
        self,
        records: Sequence[ScoreRecord],
        sources: Sequence[str],
        stop: threading.Event,
        primary: bool = True,
    ) -> list[Upsert | DeadLetter]:
        built = [_built(record, source) for record, source in zip(records, sources, strict=True)]
        writes = [item for item in built if isinstance(item, _Write)]
        codes = iter(self._isolated(writes, stop, primary))
        return [item if isinstance(item, DeadLetter) else next(codes) for item in built]

    def _write_batch(
        self, writes: list[_Write], stop: threading.Event, primary: bool
    ) -> list[Upsert]:
        self.retrying(lambda: self._write_all(writes, primary), stop)
        return [_code(write) for write in writes]

    def _expected_types(
        self, write: _Write, stop: threading.Event
    ) -> tuple[dict[str, str], dict[str, str]]:
        record, day = write.record, utc_day(write.record)
        version = record.model_version
        shared = {
            CLUSTER.current_model: "string",
            CLUSTER.promotion_epoch: "string",
            CLUSTER.models: "set",
            CLUSTER.model_info(version): "hash",
        }
        named = self._boards_named(list(write.keys), ("_leaderboard", "_prev_leaderboard"), stop)
        boards = [CLUSTER.leaderboard(day), CLUSTER.model_leaderboard(version, day), *named]
        for board in boards:
            shared |= {board: "zset", board_seqs_key(board): "hash"}
        own = {
            write.keys[0]: "hash",
            write.keys[1]: "hash",
            CLUSTER.event(record.event_id, version): "string",
        }
        return shared, own

    def release(self, claims: Sequence[tuple[str, str, str]], stop: threading.Event) -> None:
        calls = []
        for event_id, version, source in claims:
            key = CLUSTER.event(event_id, version)
            calls.append((key, SCRIPTS["release"].command([key], [source])))
        if calls:
            self.retrying(lambda: self.nodes.run(calls), stop)

    def _recover(self, exc: Exception) -> None:
        try:
            self.nodes.refresh()
        except Exception as failed:
            log.warning("redis cluster slot map not refreshed: %s", failed)

    def _write_all(self, writes: list[_Write], primary: bool) -> None:
        for write in writes:  # a retried attempt starts over: every step is idempotent
            # created too: a failed round trip may have counted it already (short, never over)
            write.code, write.ops, write.created = None, [], False
        # Steps 1 and 2 are independent: one round trip.
        meta = self._meta_calls(writes)
        replies = self.nodes.run(meta + self._claim_calls(writes))
        current, epoch = _pointer(replies[0])
        claimed = self._claimed(writes, replies[len(meta) :])
        bookkeeping = True
        for _ in range(MAX_EPOCH_RETRIES):
            current, epoch = self._settled_hashes(claimed, current, epoch, primary)
            # Step 4, the bookkeeping (once) and the pointer again, in one round trip: a
            # promotion that began after step 1 may have scanned past a track before step 3
            # created its hash, so step 3 is redone under the new pointer (same records:
            # newer-wins makes it a rewrite, plus the view write the new pointer asks for).
            ops = [op for write in claimed for op in write.ops]
            calls = board_ops_calls(ops, self.ttl_s)
            if bookkeeping:
                calls += self._count_calls(claimed)
            now_current, now_epoch = _pointer(self.nodes.run([*calls, POINTER_CALL])[-1])
            bookkeeping = False
            if now_epoch == epoch:
                return
            current, epoch = now_current, now_epoch
            for write in claimed:
                write.ops = []
        raise EpochMoving("the promotion epoch kept moving during one batch")

    def _settled_hashes(
        self, writes: list[_Write], current: str, epoch: int, primary: bool
    ) -> tuple[str, int]:
        """Step 3 until no view refuses a write for a newer epoch; the pointer it ended on."""
        pending = writes
        for _ in range(MAX_EPOCH_RETRIES):
            moved = self._hashes(pending, current, epoch, primary)
            if not moved:
                return current, epoch
            used = epoch
            current, epoch = _pointer(self.nodes.run(self._meta_calls(moved))[0])
            if epoch <= used:
                # Refused for a newer epoch, yet the epoch is where it was: the hash carries one
                # the epoch key never reached again (lost in a failover before replication,
                # evicted, deleted). Retrying cannot help; promoting again sets it above.
                raise EpochMoving(
                    f"a view hash ({CLUSTER.score(moved[0].record.track_id)}) carries a "
                    f"promotion epoch above {CLUSTER.promotion_epoch} ({epoch}): the key went "
                    f"back (a failover before replication, eviction); run `popscore promote "
                    f"{current or '<version>'}` again"
                )
            pending = moved
        raise EpochMoving("the promotion epoch kept moving during one batch")

    def _meta_calls(self, writes: list[_Write]) -> list[tuple[str, tuple[Any, ...]]]:
        """Step 1: the pointer and the epoch first; each version joins the models set."""
        versions = sorted({w.record.model_version for w in writes})
        now_ms = str(_now_ms())
        calls: list[tuple[str, tuple[Any, ...]]] = [
            POINTER_CALL,
            (CLUSTER.models, ("SADD", CLUSTER.models, *versions)),
        ]
        return calls + [
            (CLUSTER.model_info(v), ("HSET", CLUSTER.model_info(v), "last_write_ms", now_ms))
            for v in versions
        ]

    def _claim_calls(self, writes: list[_Write]) -> list[tuple[str, tuple[Any, ...]]]:
        """Step 2: one claim per event."""
        calls = []
        for w in writes:
            key = CLUSTER.event(w.record.event_id, w.record.model_version)
            # SET … NX GET (Redis >= 7.0): claims the event, or answers who holds it.
            command = ("SET", key, w.source, "NX", "GET", "EX", self.marker_ttl_s)
            calls.append((key, command))
        return calls

    def _claimed(self, writes: list[_Write], holders: list[Any]) -> list[_Write]:
        """The writes whose event this record holds (now, or since an earlier try)."""
        claimed = []
        for w, held in zip(writes, holders, strict=True):
            if held is None or as_text(held) == w.source:
                claimed.append(w)
            else:
                w.code = Upsert.DUPLICATE
        return claimed

    def _hashes(
        self, writes: list[_Write], current: str, epoch: int, primary: bool
    ) -> list[_Write]:
        """Step 3, one script call per slot; returns the writes a newer epoch refused."""
        by_slot: dict[int, list[_Write]] = defaultdict(list)
        for w in writes:
            by_slot[key_slot(w.keys[0].encode())].append(w)
        calls, groups = [], []
        head = [self.ttl_s, current, int(primary), epoch]
        for group in by_slot.values():
            keys = [key for w in group for key in w.keys]
            calls.append((keys[0], SCRIPTS["hashes"].command(keys, head + [w.item for w in group])))
            groups.append(group)
        moved = []
        for group, replies in zip(groups, self.nodes.run(calls), strict=True):
            for w, (code, created, ops) in zip(group, replies, strict=True):
                w.created = w.created or bool(created)
                w.ops += json.loads(ops) if ops != b"{}" else []
                if int(code) == EPOCH_MOVED:
                    moved.append(w)
                else:
                    w.code = Upsert(int(code))
        return moved

    def _count_calls(self, writes: list[_Write]) -> list[tuple[str, tuple[Any, ...]]]:
        """The versions' ``tracks`` counters (bookkeeping: a crash right before this step
        leaves them short by the batch's new tracks)."""
        created: dict[str, int] = defaultdict(int)
        for w in writes:
            created[w.record.model_version] += int(w.created)
        return [
            (CLUSTER.model_info(v), ("HINCRBY", CLUSTER.model_info(v), "tracks", n))
            for v, n in created.items()
            if n
        ]


def board_ops_calls(ops: list[list[str]], ttl_s: int) -> list[tuple[str, tuple[Any, ...]]]:
    """Step 4: the leaderboard changes ``[board, member, seq, zscore or '']``, one script call
    per day slot."""
    by_slot: dict[int, list[list[str]]] = defaultdict(list)
    for op in ops:
        by_slot[key_slot(op[0].encode())].append(op)
    calls = []
    for group in by_slot.values():
        boards = list(dict.fromkeys(op[0] for op in group))
        keys = [key for board in boards for key in (board, board_seqs_key(board))]
        index = {board: 2 * i + 1 for i, board in enumerate(boards)}
        args: list[Any] = [ttl_s]
        for board, *rest in group:
            args += [index[board], *rest]
        calls.append((keys[0], SCRIPTS["boards"].command(keys, args)))
    return calls


def _built(record: ScoreRecord, source: str) -> _Write | DeadLetter:
    try:
        day, version, track = utc_day(record), record.model_version, record.track_id
        item = {
            "order": int(record.emitted_at.timestamp() * 1_000_000),
            "event_id": record.event_id,
            "member": track,
            "zscore": repr(float(record.popularity)),
            "version": version,
            "fields": record.redis_fields(),
            "view_board": CLUSTER.leaderboard(day),
            "model_board": CLUSTER.model_leaderboard(version, day),
        }
        keys = (CLUSTER.score(track), CLUSTER.model_score(version, track))
        return _Write(record, source, json.dumps(item), keys)
    except ValueError as exc:  # an id the cluster layout cannot place (RedisKeys)
        return DeadLetter(DeadLetterReason.INVALID_EVENT, str(exc))
    except Exception as exc:  # building one record's write costs that record alone
        return internal_error(exc)


def _pointer(reply: list[Any]) -> tuple[str, int]:
    current, epoch = reply
    return as_text(current or b""), int(epoch or 0)


def _code(write: _Write) -> Upsert:
    if write.code is None:
        raise RuntimeError("a write finished without a code")
    return write.code


def _now_ms() -> int:
    return int(time.time() * 1000)
