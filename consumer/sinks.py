"""Where scores go: Redis (one idempotent Lua upsert per batch), the results topic and the DLQ.

Redis is written first; Kafka records are produced and flushed next; only then may the source
commit offsets. A replay after a crash rewrites Redis idempotently: the script never lets an
older event (by ``emitted_at``, then ``event_id``) overwrite a newer score.
"""

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date
from typing import Any

import redis
from confluent_kafka import KafkaError, Message, Producer

from consumer.errors import DeadLetter, SinkError
from schemas.dead_letter import (
    HEADER_DETAIL,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
)
from schemas.redis_keys import leaderboard_key, score_key
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
ORDER_FIELD = "_order"
BOARD_FIELD = "_leaderboard"
MAX_DETAIL = 1000

# KEYS: per record its hash key then its leaderboard key. ARGV[1]: ttl seconds (0 = none);
# ARGV[1 + i]: record i as JSON {order, event_id, member, score, fields}.
# Returns per record 1 when written, 0 when a newer score was already there.
UPSERT_LUA = """
local ttl = tonumber(ARGV[1])
local written = {}
for i = 2, #ARGV do
  local rec = cjson.decode(ARGV[i])
  local hkey, zkey = KEYS[2 * i - 3], KEYS[2 * i - 2]
  local cur = redis.call('HMGET', hkey, '_order', 'event_id', '_leaderboard')
  local order = tonumber(cur[1])
  if order and (order > rec.order or (order == rec.order and cur[2] > rec.event_id)) then
    written[#written + 1] = 0
  else
    local args = {'_order', string.format('%d', rec.order), '_leaderboard', zkey}
    for k, v in pairs(rec.fields) do
      args[#args + 1] = k
      args[#args + 1] = v
    end
    redis.call('HSET', hkey, unpack(args))
    if ttl > 0 then redis.call('EXPIRE', hkey, ttl) end
    if cur[3] and cur[3] ~= zkey then redis.call('ZREM', cur[3], rec.member) end
    redis.call('ZADD', zkey, rec.score, rec.member)
    written[#written + 1] = 1
  end
end
return written
"""


class RedisSink:
    """Score hashes and day leaderboards, one script call (one round trip) per batch."""

    def __init__(self, client: redis.Redis, ttl_s: int = 0, retries: int = 5) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.retries = retries
        self._upsert = client.register_script(UPSERT_LUA)

    def write(self, records: Sequence[ScoreRecord]) -> list[bool]:
        """Upsert every record; True where it was newer than what Redis held."""
        if not records:
            return []
        keys: list[str] = []
        args: list[Any] = [self.ttl_s]
        for record in records:
            keys += [score_key(record.track_id), leaderboard_key(_utc_day(record))]
            args.append(json.dumps(_script_item(record)))
        result = self._with_retries(lambda: self._upsert(keys=keys, args=args))
        return [bool(flag) for flag in result]

    def _with_retries(self, call: Any) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == self.retries:
                    raise SinkError(f"redis unavailable after {attempt + 1} tries: {exc}") from exc
                log.warning("redis write failed (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")


def _utc_day(record: ScoreRecord) -> date:
    return record.emitted_at.astimezone(UTC).date()


def _script_item(record: ScoreRecord) -> dict[str, Any]:
    return {
        "order": int(record.emitted_at.timestamp() * 1_000_000),
        "event_id": record.event_id,
        "member": record.track_id,
        "score": record.popularity,
        "fields": record.redis_fields(),
    }


@dataclass(frozen=True)
class Rejected:
    """A consumed message that goes to the DLQ, and why."""

    message: Message
    error: DeadLetter


class KafkaSink:
    """Results and dead letters through one idempotent producer; ``flush`` confirms delivery."""

    def __init__(self, config: dict[str, Any], results_topic: str, dlq_topic: str) -> None:
        self.producer = Producer(
            {
                **config,
                "logger": logging.getLogger("librdkafka.producer"),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "zstd",
            }
        )
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self._failures: list[str] = []

    def write_scores(self, records: Sequence[ScoreRecord]) -> None:
        """One record per score, keyed by track id so a track's scores stay ordered."""
        for record in records:
            self._produce(self.results_topic, record.track_id.encode(), record.encode(), None)

    def write_dead_letters(self, rejected: Sequence[Rejected]) -> None:
        """The original bytes, untouched, with reason and source headers (CONTRACT §3)."""
        for item in rejected:
            msg = item.message
            headers = [
                (HEADER_REASON, item.error.reason.value.encode()),
                (HEADER_DETAIL, item.error.detail[:MAX_DETAIL].encode()),
                (HEADER_TOPIC, (msg.topic() or "").encode()),
                (HEADER_PARTITION, str(msg.partition()).encode()),
                (HEADER_OFFSET, str(msg.offset()).encode()),
            ]
            self._produce(self.dlq_topic, msg.key(), msg.value(), headers)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every delivery report; any failure raises, so nothing gets committed."""
        remaining = self.producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise SinkError(f"{remaining} records not delivered within {timeout_s}s")
        if failures:
            raise SinkError(f"{len(failures)} records failed delivery: {failures[0]}")

    def close(self) -> None:
        """Deliver what is queued."""
        self.producer.flush(10.0)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=self._report)
                return
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self.producer.poll(0.5)

    def _report(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.append(str(err))
