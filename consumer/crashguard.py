"""Records that kill the process: found after the restart, tried alone, then dead-lettered.

A record whose processing kills the process itself — a native crash in a codec (a SIGSEGV in
libsndfile or mpg123), the OOM killer, a CUDA abort — raises nothing anyone can catch. Without
this module the restart reads the same batch, dies again, for ever, and the partition stops.

The journal is one Redis hash per consumer group and input topic (``crash_journal_key``), three
fields per partition, written before the stages start on a batch (one script call per batch):

- ``<partition>``: the highest offset handed to the stages;
- ``<partition>:low``: where the member that handed it had committed up to at the time (no
  record before it was in hand);
- ``<partition>:alone``: ``<offset>:<tries>``, the record being processed alone, and how many
  times it has been so.

A member that takes a partition reads its fields once, at its first batch of it. The records
from where it starts reading up to ``<partition>`` were in hand when the last owner stopped
without committing them: after a clean stop there are none (a clean stop commits or rewinds
what it has, and the next owner starts after it). Reading that starts before ``:low`` (offsets
reset by hand, a recreated topic) makes the journal stale: it names nothing.

These *suspects* are processed one at a time, with nothing else in flight in the process
until each is committed; a record whose tries alone reach ``POPSCORE_CRASH_LIMIT`` was in hand,
alone, at that many deaths of the process, and goes to the DLQ as ``process_crashed`` instead
of being tried again. Like SQS's ``maxReceiveCount``, but counting only the deaths with the
record alone: the records that merely shared the poison's batch are scored. A Python-level exit
(a clean stop, a failed stage, a wedged Kafka call) takes its try back (``forgive``), and so
does a batch dropped while the process goes on (``dropped``): only a death the process could
not see coming counts, and a device failure with the record alone (``blame``).
"""

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from confluent_kafka import Message

from consumer.errors import DeadLetter, SinkError
from consumer.source import Partition, partition_of
from schemas.dead_letter import DeadLetterReason
from schemas.redis_keys import crash_journal_key

log = logging.getLogger(__name__)
T = TypeVar("T")
Retry = Callable[[Callable[[], T], threading.Event], T]
JOURNAL_TTL_S = 30 * 86_400

# KEYS[1]: the journal. ARGV[1]: its ttl; ARGV[2], ARGV[3]: the field and value of the record
# processed alone ('' for none); then per partition of the batch: partition, where its member
# had committed up to, the batch's first and last offset. Raises each partition's highest
# offset (with its low mark); forgets a record processed alone before this batch's first
# (committed: nothing is in flight beside a record alone).
MARK_LUA = """
for i = 4, #ARGV, 4 do
  local p, low, first, last = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local high = tonumber(redis.call('HGET', KEYS[1], p) or '-1')
  if last > high then redis.call('HSET', KEYS[1], p, last, p .. ':low', low) end
  local alone = redis.call('HGET', KEYS[1], p .. ':alone')
  if alone and tonumber(string.match(alone, '^(%d+):')) < first then
    redis.call('HDEL', KEYS[1], p .. ':alone')
  end
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1]: the journal; ARGV: a record's alone field, the value this process set, the value to
# put back ('' deletes). Only if nobody wrote the field since.
FORGIVE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1])
  else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
end
return 1
"""


@dataclass(frozen=True)
class Journal:
    """What the journal said of one partition when this member first read it."""

    start: int
    """The first offset this member read of it."""
    last: int
    """The highest offset its last owner handed to the stages."""
    alone: tuple[int, int] | None
    """(offset, tries) of the record its last owners processed alone."""

    def suspect(self, offset: int) -> bool:
        return self.start <= offset <= self.last

    def tries(self, offset: int) -> int:
        return self.alone[1] if self.alone and self.alone[0] == offset else 0


@dataclass(frozen=True)
class Alone:
    """A record about to be processed alone: its journal field, the value that counts this
    try, and the value before it ('' when there was none)."""

    field: str
    value: str
    before: str


class CrashGuard:
    """The crash journal of one consumer: which records to process alone, and which to
    dead-letter. ``limit`` 0 turns it off (no journal is written or read)."""

    def __init__(
        self,
        client: Any,
        group: str,
        topic: str,
        limit: int,
        retry: Retry[Any],
    ) -> None:
        """``retry``: runs a Redis call until it answers, or raises SinkError once its event is
        set (the sink's)."""
        self.client = client
        self.key = crash_journal_key(group, topic)
        self.limit = limit
        self._retry = retry
        self._known: dict[Partition, Journal | None] = {}
        self._pending: Alone | None = None
        self._dropped: list[tuple[Future[Any], Alone]] = []
        if limit:
            self._mark = client.register_script(MARK_LUA)
            self._forgive = client.register_script(FORGIVE_LUA)

    def suspects(self, messages: Sequence[Message]) -> bool:
        """Whether any of ``messages`` was in hand at a death of the process (reading the
        journal of the partitions first seen since they were assigned: one call)."""
        if not self.limit:
            return False
        starts: dict[Partition, int] = {}
        for msg in messages:
            key = partition_of(msg)
            if key not in self._known:
                starts[key] = min(starts.get(key, msg.offset() or 0), msg.offset() or 0)
        if starts:
            self._read(starts)
        return any(self.suspect(msg) for msg in messages)

    def suspect(self, msg: Message) -> bool:
        journal = self._known.get(partition_of(msg))
        return journal is not None and journal.suspect(msg.offset() or 0)

    def verdict(self, msg: Message) -> DeadLetter | Alone:
        """A suspect's fate: its dead letter when its tries alone reached the limit, else the
        journal entry of one more try."""
        journal = self._known.get(partition_of(msg))
        offset = msg.offset() or 0
        tries = journal.tries(offset) if journal else 0
        if tries >= self.limit:
            detail = f"the consumer process died on {tries} tries at this record alone"
            return DeadLetter(DeadLetterReason.PROCESS_CRASHED, detail)
        field = f"{partition_of(msg)[1]}:alone"
        return Alone(field, f"{offset}:{tries + 1}", f"{offset}:{tries}" if tries else "")

    def mark(
        self,
        messages: Sequence[Message],
        alone: Alone | None,
        stop: threading.Event,
        lows: Mapping[Partition, int | None] | None = None,
    ) -> None:
        """Before the stages start on ``messages`` (on the prepare stage): raise their
        partitions' highest offsets, and count ``alone``'s try. ``lows``: where this member
        had committed each partition up to when it took the batch (default: the batch's first
        offset). A Redis that does not answer is waited for like the sink's (nothing can be
        committed without it); a refusal (the key holds another type, say) is logged and the
        batch goes on unguarded."""
        if not self.limit:
            return
        args: list[Any] = [
            JOURNAL_TTL_S,
            alone.field if alone else "",
            alone.value if alone else "",
        ]
        for key, (first, last) in _spans(messages).items():
            low = (lows or {}).get(key)
            args += [key[1], first if low is None else min(low, first), first, last]
        if alone:
            self._pending = alone
        try:
            self._retry(lambda: self._mark(keys=[self.key], args=args), stop)
        except SinkError:
            raise
        except redis.RedisError as exc:
            log.error("crash journal %s not written (%s): this batch is not guarded", self.key, exc)

    def settled(self) -> None:
        """The record processed alone is committed: its try stays counted only in a journal
        field the next batch's mark clears."""
        self._pending = None

    def blame(self) -> None:
        """The record processed alone failed the device: its try stays counted. The restart
        runs it on a fresh device context, after the start-up warm-up passed there: failing
        again alone, it is the record's doing, not a sick device's."""
        self._pending = None

    def dropped(self, future: Future[Any]) -> None:
        """The batch of the record alone was dropped uncommitted (a lost partition, a drain
        past the grace, an aborted transaction) and the process goes on: its try is taken back
        once that batch's stages are done with it (``tidy``). A death before then counts."""
        if self._pending is not None:
            self._dropped.append((future, self._pending))
            self._pending = None

    def dropped_running(self) -> bool:
        """A dropped batch of a record alone is still in its stages (a death counts)."""
        return not all(future.done() for future, _alone in self._dropped)

    def tidy(self) -> None:
        """Take back the tries of dropped batches whose stages are done (the main loop's)."""
        done = [alone for future, alone in self._dropped if future.done()]
        self._dropped = [(future, alone) for future, alone in self._dropped if not future.done()]
        for alone in done:
            self._take_back(alone)

    def forgive(self) -> None:
        """The process stops of its own accord (a clean stop, a failed stage, a wedged Kafka
        call): the tries of the records processed alone were not deaths, and are taken back."""
        tries = [alone for _future, alone in self._dropped]
        tries += [self._pending] if self._pending else []
        self._dropped, self._pending = [], None
        for alone in tries:
            self._take_back(alone)

    def _take_back(self, alone: Alone) -> None:
        try:
            self._forgive(keys=[self.key], args=[alone.field, alone.value, alone.before])
        except redis.RedisError as exc:
            log.warning("crash journal: the try of %s not taken back (%s)", alone.field, exc)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions this member no longer holds: read their journal again if they return."""
        for key in partitions:
            self._known.pop(key, None)

    def _read(self, starts: dict[Partition, int]) -> None:
        fields = [f"{p}{suffix}" for (_t, p) in starts for suffix in ("", ":alone", ":low")]
        try:
            values = self.client.hmget(self.key, fields)
        except redis.RedisError as exc:
            log.error(
                "crash journal %s unreadable (%s): its partitions are not guarded", self.key, exc
            )
            self._known.update(dict.fromkeys(starts))
            return
        for i, (key, start) in enumerate(starts.items()):
            last, alone, low = values[3 * i : 3 * i + 3]
            self._known[key] = self._journal(key, start, _int(last), alone, _int(low))

    def _journal(
        self, key: Partition, start: int, high: int | None, alone: Any, low: int | None
    ) -> Journal | None:
        if high is None or high < start:
            return None
        if low is not None and start < low:
            log.warning("crash journal: partition %s is read from offset %d, before %d, where "
                        "its last consumer had committed up to: offsets reset by hand or a "
                        "recreated topic; the journal is stale, ignored",
                        key, start, low)  # fmt: skip
            return None
        done = _alone(alone)
        spent = (
            f" (offset {done[0]} has spent {done[1]} of {self.limit} tries alone)" if done else ""
        )
        log.warning("partition %s: offsets %d-%d were in hand when its last consumer stopped "
                    "without committing them: processing them one at a time%s",
                    key, start, high, spent)  # fmt: skip
        return Journal(start, high, done)


def _spans(messages: Iterable[Message]) -> dict[Partition, tuple[int, int]]:
    spans: dict[Partition, tuple[int, int]] = {}
    for msg in messages:
        key, offset = partition_of(msg), msg.offset() or 0
        first, last = spans.get(key, (offset, offset))
        spans[key] = (min(first, offset), max(last, offset))
    return spans


def _text(value: Any) -> str:
    """A journal field as text ('' when absent): the client answers in bytes."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    text = _text(value)
    return int(text) if text.isdigit() else None


def _alone(value: Any) -> tuple[int, int] | None:
    offset, _, tries = _text(value).partition(":")
    first, count = _int(offset), _int(tries)
    return (first, count) if first is not None and count is not None else None
