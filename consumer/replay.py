"""``popscore replay-dlq``: re-publish dead letters to the input topic once their cause is fixed.

The DLQ is read from its start (or from ``--since``, by record timestamp) up to the end offsets
it had when the command started, so it always terminates, even while the service keeps adding
dead letters. A throwaway consumer group is used and nothing is committed: the command can be
repeated, and a dry run changes nothing anywhere. Keys and values are re-published untouched;
the ``popscore.*`` headers of the dead letter are dropped and replaced by one provenance header.
"""

import argparse
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from consumer.errors import ConfigError, SinkError
from consumer.kafkalog import librdkafka_logger
from consumer.settings import Settings
from consumer.source import foreign_headers, headers_of
from schemas.dead_letter import HEADER_REASON, HEADER_VALUE_OMITTED, DeadLetterReason

log = logging.getLogger(__name__)
# Where a replayed record came from: "<dlq topic>/<partition>/<offset>".
HEADER_REPLAYED_FROM = "popscore.replay.from"
UNKNOWN_REASON = "unknown"
_POLL_S = 1.0
# A partition that delivers nothing for this long while short of its end offset (e.g. the
# rest are transaction markers or were deleted by retention) counts as read.
_STALL_S = 15.0


def register(sub: "argparse._SubParsersAction[Any]") -> None:
    """Add the ``replay-dlq`` subcommand to the ``popscore`` parser."""
    parser = sub.add_parser(
        "replay-dlq",
        help="re-publish dead letters (all, or by reason / time) to the input topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_replay)
    reasons = [r.value for r in DeadLetterReason]
    parser.add_argument(
        "--reason",
        action="append",
        choices=reasons,
        metavar="REASON",
        help=f"replay only this reason; repeatable (one of: {', '.join(reasons)})",
    )
    parser.add_argument(
        "--since",
        type=_rfc3339,
        help="only dead letters written at or after this RFC 3339 time",
    )
    parser.add_argument(
        "--until",
        type=_rfc3339,
        help="only dead letters written before this RFC 3339 time",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; publish nothing"
    )
    parser.add_argument("--from-topic", help="dead-letter topic (default: POPSCORE_DLQ_TOPIC)")
    parser.add_argument("--to-topic", help="where to publish (default: POPSCORE_INPUT_TOPIC)")


@dataclass(frozen=True)
class Selection:
    """Which dead letters to replay."""

    reasons: frozenset[str] | None = None
    since_ms: int | None = None
    until_ms: int | None = None

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

    def report(self, source: str, target: str, dry_run: bool) -> str:
        """The lines the command prints."""
        verb = "would replay" if dry_run else "replayed"
        total = sum(self.replayed.values())
        lines = [f"{verb} {total} of {self.read} dead letters read from {source} to {target}"]
        lines += [f"  {reason:<22} {n}" for reason, n in sorted(self.replayed.items())]
        if self.value_omitted:
            lines.append(f"skipped {self.value_omitted} without a value ({HEADER_VALUE_OMITTED}):"
                         " re-publish those from their source offsets")  # fmt: skip
        return "\n".join(lines)


def replay(
    settings: Settings,
    source: str,
    target: str,
    selection: Selection,
    dry_run: bool = False,
) -> ReplayCount:
    """Copy the selected dead letters of ``source`` to ``target``; return the counts."""
    count = ReplayCount()
    producer = None if dry_run else _producer(settings)
    failures: list[str] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    for msg in _read_to_end(settings, source, selection.since_ms):
        count.read += 1
        reason = _reason(msg)
        if not selection.matches(reason, msg.timestamp()[1]):
            continue
        if any(key == HEADER_VALUE_OMITTED for key, _ in headers_of(msg)):
            count.value_omitted += 1
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


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    source = args.from_topic or settings.dlq_topic
    target = args.to_topic or settings.input_topic
    if source == target:
        raise ConfigError(f"--to-topic must differ from the dead-letter topic ({source})")
    if args.since and args.until and args.since >= args.until:
        raise ConfigError("--since must be before --until")
    selection = Selection(
        reasons=frozenset(args.reason) if args.reason else None,
        since_ms=_epoch_ms(args.since),
        until_ms=_epoch_ms(args.until),
    )
    count = replay(settings, source, target, selection, args.dry_run)
    print(count.report(source, target, args.dry_run))
    return 0


def _read_to_end(settings: Settings, topic: str, since_ms: int | None) -> Iterator[Message]:
    """Every record of ``topic`` from its start (or ``since_ms``) to its end offsets as of now."""
    consumer = Consumer(
        {
            **settings.kafka_config("consumer"),
            "logger": librdkafka_logger("consumer"),
            "group.id": f"popscore-replay-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            # Dead letters of aborted transactions were never real: the batch was retried.
            "isolation.level": "read_committed",
        }
    )
    try:
        ends = _start_positions(consumer, topic, since_ms)
        if not ends:
            return
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


def _start_positions(
    consumer: Consumer, topic: str, since_ms: int | None
) -> dict[int, tuple[int, int]]:
    """Partition → (first offset to read, end offset) for partitions with something to read."""
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise ConfigError(f"dead-letter topic {topic} does not exist")
    positions: dict[int, tuple[int, int]] = {}
    for partition in sorted(metadata.partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        start = low
        if since_ms is not None and high > low:
            [found] = consumer.offsets_for_times(
                [TopicPartition(topic, partition, since_ms)], timeout=10
            )
            start = high if found.offset < 0 else max(found.offset, low)
        if high > start:
            positions[partition] = (start, high)
    return positions


def _producer(settings: Settings) -> Producer:
    return Producer(
        {
            **settings.kafka_config("producer"),
            "logger": librdkafka_logger("producer"),
            "enable.idempotence": True,
            "linger.ms": 20,
        }
    )


def _publish(producer: Producer, topic: str, msg: Message, on_delivery: Any) -> None:
    headers = foreign_headers(msg)
    headers.append((HEADER_REPLAYED_FROM, f"{msg.topic()}/{msg.partition()}/{msg.offset()}"))
    while True:
        try:
            producer.produce(
                topic, msg.value(), msg.key(), headers=headers, on_delivery=on_delivery
            )
            return
        except BufferError:
            producer.poll(0.5)  # the local queue is full: let deliveries drain, then retry


def _reason(msg: Message) -> str:
    for key, value in headers_of(msg):
        if key == HEADER_REASON and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return UNKNOWN_REASON


def _rfc3339(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs a UTC offset (e.g. Z or +02:00): {text!r}")
    return value


def _epoch_ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)
