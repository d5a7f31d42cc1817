"""``popscore replay-dlq``: re-publish dead letters to the input topic once their cause is fixed.

The DLQ is read from its start (or from ``--since``, by record timestamp) up to the end offsets
it had when the command started, so it always terminates, even while the service keeps adding
dead letters. A throwaway consumer group is used and nothing is committed: the command can be
repeated, and a dry run changes nothing anywhere. Keys and values are re-published untouched;
the ``popscore.*`` headers of the dead letter are dropped and replaced by one provenance header.
"""

import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumer.dead_letters import foreign_headers, headers_of
from consumer.errors import ConfigError, SinkError
from consumer.kafka import (
    DeliveryCallback,
    client,
    consumer_config,
    produce,
    producer_config,
    watermarks,
)
from consumer.settings import Settings
from consumer.source import record_id
from schemas.dead_letter import HEADER_REASON, HEADER_REPLAYED_FROM, HEADER_VALUE_OMITTED

log = logging.getLogger(__name__)
UNKNOWN_REASON = "unknown"
_POLL_S = 1.0
# A partition that delivers nothing for this long while short of its end offset (e.g. the
# rest are transaction markers or were deleted by retention) counts as read.
_STALL_S = 15.0
LEADER_WAIT_S = 30.0
"""How long a dead-letter topic's partitions may have no leader (created a moment ago, an
election in progress) before the replay gives up."""


@dataclass(frozen=True)
class Selection:
    """Which dead letters to replay."""

    reasons: frozenset[str] | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def of(
        cls,
        reasons: list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> "Selection":
        """By reasons (None: all) and a window of dead-letter timestamps [since, until)."""
        if since and until and since >= until:
            raise ConfigError("--since must be before --until")
        return cls(frozenset(reasons) if reasons else None, _epoch_ms(since), _epoch_ms(until))

    def matches(self, reason: str, timestamp_ms: int) -> bool:
        """The record's reason and timestamp are selected."""
        if self.reasons is not None and reason not in self.reasons:
            return False
        if self.since_ms is not None and timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or timestamp_ms < self.until_ms


@dataclass
class ReplayCount:
    """What a replay read and (would have) re-published, by reason."""

    read: int = 0
    replayed: Counter[str] = field(default_factory=Counter)
    value_omitted: int = 0
    """Selected, but left out: the dead letter has no value to replay (too large to copy)."""
    superseded: int = 0
    """Selected, but left out: replayed before, and that replay failed again (its own dead
    letter, later in the topic, is the one replayed)."""

    def report(self, source: str, target: str, dry_run: bool) -> str:
        """The lines the command prints."""
        verb = "would replay" if dry_run else "replayed"
        total = sum(self.replayed.values())
        lines = [f"{verb} {total} of {self.read} dead letters read from {source} to {target}"]
        lines += [f"  {reason:<22} {n}" for reason, n in sorted(self.replayed.items())]
        if self.value_omitted:
            lines.append(f"skipped {self.value_omitted} without a value ({HEADER_VALUE_OMITTED}):"
                         " re-publish those from their source offsets")  # fmt: skip
        if self.superseded:
            lines.append(f"skipped {self.superseded} replayed before whose replay failed again: "
                         "their later dead letters stand for them")  # fmt: skip
        return "\n".join(lines)


def replay(
    settings: Settings,
    source: str,
    target: str,
    selection: Selection,
    dry_run: bool = False,
) -> ReplayCount:
    """Copy the selected dead letters of ``source`` to ``target``; return the counts."""
    if source == target:
        raise ConfigError(f"--to-topic must differ from the dead-letter topic ({source})")
    count = ReplayCount()
    config = producer_config(settings.kafka_config("producer"))
    producer = None if dry_run else client(lambda: Producer(config))
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    positions = _start_positions(settings, source, selection.since_ms, target)
    # First pass: which dead letters a later one replaced (its replay failed again); replaying
    # every one of them each run doubled the copies of a failing event run after run.
    # Only a later dead letter this run replays stands for an earlier one.
    superseded = {_replayed_from(msg) for msg in _read(settings, source, positions)
                  if _replayable(msg, selection)}  # fmt: skip
    for msg in _read(settings, source, positions):
        count.read += 1
        reason = _reason(msg)
        if not selection.matches(reason, msg.timestamp()[1]):
            continue
        if _value_omitted(msg):
            count.value_omitted += 1
            continue
        if record_id(msg) in superseded:
            count.superseded += 1
            continue
        count.replayed[reason] += 1
        if producer is not None:
            _publish(producer, target, msg, delivered)
    if producer is not None:
        left = producer.flush(30)
        if left or failures:
            detail = failures[0] if failures else f"{left} records not confirmed"
            raise SinkError(f"replay to {target} incomplete: {detail}")
    return count


def _consumer(settings: Settings) -> Consumer:
    # A throwaway group, and read_committed: dead letters of aborted transactions were never
    # real (their batch was retried).
    group = f"popscore-replay-{uuid.uuid4().hex}"
    config = consumer_config(
        settings.kafka_config("consumer"), group, {"auto.offset.reset": "earliest"}
    )
    return client(lambda: Consumer(config))


def _start_positions(
    settings: Settings, topic: str, since_ms: int | None, target: str
) -> dict[int, tuple[int, int]]:
    """Partition → (first offset to read, end offset as of now), for partitions with something
    to read: both passes read the same records. ``target`` must exist too: one that does not is
    a typo (a broker with auto-create would make it, and the replay would report success into
    a topic nobody reads)."""
    consumer = _consumer(settings)
    try:
        positions = _positions(consumer, topic, since_ms)
        _metadata(consumer, target, f"--to-topic: topic {target!r} does not exist")
        return positions
    finally:
        consumer.close()


def _metadata(consumer: Consumer, topic: str, missing: str) -> Any:
    """The topic's metadata; ConfigError ``missing`` when it does not exist (a consumer's
    lookup never creates it)."""
    found = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if found is None or found.error is not None:
        raise ConfigError(missing)
    return found


def _read(settings: Settings, topic: str, ends: dict[int, tuple[int, int]]) -> Iterator[Message]:
    """Every record of ``topic`` within ``ends`` (from ``_start_positions``)."""
    if not ends:
        return
    consumer = _consumer(settings)
    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in ends.items()])
        remaining = {p: end for p, (_, end) in ends.items()}
        last_progress = time.monotonic()
        while remaining:
            msg = consumer.poll(_POLL_S)
            if msg is None:
                if time.monotonic() - last_progress > _STALL_S:
                    log.warning("partitions %s stopped short of their end", sorted(remaining))
                    return
                continue
            last_progress = time.monotonic()
            partition, offset = msg.partition() or 0, msg.offset() or 0
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    remaining.pop(partition, None)
                    continue
                raise SinkError(f"reading {topic}[{partition}]: {err}")
            end = remaining.get(partition)
            if end is None or offset >= end:
                continue
            yield msg
            if offset >= end - 1:
                remaining.pop(partition)
    finally:
        consumer.close()


def _positions(consumer: Consumer, topic: str, since_ms: int | None) -> dict[int, tuple[int, int]]:
    metadata = _metadata(consumer, topic, f"dead-letter topic {topic} does not exist")
    positions: dict[int, tuple[int, int]] = {}
    deadline = time.monotonic() + LEADER_WAIT_S
    for partition in sorted(metadata.partitions):
        low, high = watermarks(consumer, TopicPartition(topic, partition), deadline)
        start = low
        if since_ms is not None and high > low:
            [found] = consumer.offsets_for_times(
                [TopicPartition(topic, partition, since_ms)], timeout=10
            )
            start = high if found.offset < 0 else max(found.offset, low)
        if high > start:
            positions[partition] = (start, high)
    return positions


def _publish(producer: Producer, topic: str, msg: Message, on_delivery: DeliveryCallback) -> None:
    headers = foreign_headers(msg)
    headers.append((HEADER_REPLAYED_FROM, record_id(msg)))
    produce(producer, topic, msg.value(), msg.key(), headers, on_delivery)


def _value_omitted(msg: Message) -> bool:
    return any(key == HEADER_VALUE_OMITTED for key, _ in headers_of(msg))


def _replayable(msg: Message, selection: Selection) -> bool:
    """Selected, and with a value to replay."""
    return selection.matches(_reason(msg), msg.timestamp()[1]) and not _value_omitted(msg)


def _replayed_from(msg: Message) -> str | None:
    """The dead letter this one's original was replayed from, if it was a replay."""
    for key, value in headers_of(msg):
        if key == HEADER_REPLAYED_FROM and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _reason(msg: Message) -> str:
    for key, value in headers_of(msg):
        if key == HEADER_REASON and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return UNKNOWN_REASON


def _epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)
