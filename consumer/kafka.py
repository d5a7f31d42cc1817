"""The one Kafka client layer: config builders, a produce that waits out a full local queue, the
error mapping, topic creation and clean-up, and librdkafka's log lines through Python logging.

    Consumer(consumer_config(settings.kafka_config("consumer"), group_id))
    Producer(producer_config(settings.kafka_config("producer")))        # idempotent
    Producer(transactional_config(settings.kafka_config("producer"), transactional_id))
    produce(producer, topic, value, key)                                 # never BufferError

Each builder puts its defaults first, the user's ``POPSCORE_KAFKA_PROPERTIES`` over them, and
the properties popscore's guarantees depend on last, where no setting can change them.
"""

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from consumer.errors import ConfigError, PopscoreError

T = TypeVar("T")
Config = dict[str, Any]
DeliveryCallback = Callable[[KafkaError | None, Any], None]
Header = tuple[str, str | bytes | None]
# An open transaction of a crashed process blocks read_committed readers until it times out
# (unless a restart with the same transactional.id fences it first): keep it short.
TRANSACTION_TIMEOUT_MS = 60_000
_QUEUE_FULL_WAIT_S = 0.5
# A topic's metadata is asked this often (0.5 s apart) before it counts as missing: one created
# a moment ago may lag in a broker's metadata.
TOPIC_LOOKUPS = 4
STARTUP_WAIT_S = 120.0  # about what init_transactions used to wait out at start-up
MIN_DELETE_TAG = 8  # delete_topics: a shorter tag is too likely to be part of others' names
log = logging.getLogger(__name__)


# --- config builders -----------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """A librdkafka property popscore sets itself."""

    value: str | None
    """What popscore sets it to; None where a setting gives it (named by ``why``)."""
    why: str
    roles: tuple[str, ...] = ("consumer", "producer", "admin")
    """The kinds of client it is set on."""


_CONSUMER, _PRODUCER = ("consumer",), ("producer",)
_OFFSETS = "offsets commit in the batch's transaction"
# The properties popscore's guarantees rest on, aliases included: the builders below set them
# last, and POPSCORE_KAFKA_PROPERTIES may name one only to restate its value (settings.py).
OWNED_PROPERTIES: dict[str, Owned] = {
    "bootstrap.servers": Owned(None, "POPSCORE_KAFKA_BOOTSTRAP"),
    "metadata.broker.list": Owned(None, "POPSCORE_KAFKA_BOOTSTRAP"),
    "group.id": Owned(None, "POPSCORE_GROUP_ID", _CONSUMER),
    "transactional.id": Owned(None, "POPSCORE_TRANSACTIONAL_ID", _PRODUCER),
    "isolation.level": Owned("read_committed", "read_committed, for exactly once", _CONSUMER),
    "enable.auto.commit": Owned("false", _OFFSETS, _CONSUMER),
    "auto.commit.enable": Owned("false", _OFFSETS, _CONSUMER),
    "enable.auto.offset.store": Owned("false", _OFFSETS, _CONSUMER),
    "enable.partition.eof": Owned("true", "--stop-at-end reads partition ends", _CONSUMER),
    "partition.assignment.strategy": Owned(
        "cooperative-sticky", "incremental rebalances", _CONSUMER
    ),
    "enable.idempotence": Owned("true", "a retried send never writes a record twice", _PRODUCER),
    # With the default "rebootstrap", a send_offsets_to_transaction() in flight while every
    # broker is away can block past their return (docs/RELIABILITY.md, "Failure modes").
    "metadata.recovery.strategy": Owned(
        "none", "a transaction never outlives a broker outage", _PRODUCER
    ),
}


def owned(*names: str) -> Config:
    """The values popscore gives these properties."""
    return {name: OWNED_PROPERTIES[name].value for name in names}


def consumer_config(
    base: Mapping[str, Any], group_id: str, fixed: Mapping[str, Any] | None = None
) -> Config:
    """A consumer that moves no offset by itself, reads only committed records and reports the
    end of each partition; ``fixed`` adds properties the caller relies on."""
    return {
        "auto.offset.reset": "earliest",
        **base,  # tunables (session.timeout.ms, fetch sizes) may be overridden
        "logger": librdkafka_logger("consumer"),
        "group.id": group_id,
        # Upstream producers may be transactional: never read an aborted record.
        **owned("isolation.level", "enable.auto.commit", "enable.auto.offset.store"),
        **owned("enable.partition.eof"),
        **(fixed or {}),
    }


def producer_config(base: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> Config:
    """An idempotent producer batching for 20 ms unless the properties say otherwise (produce,
    replay-dlq, the benchmark's senders): a retried send never writes a record twice; ``fixed``
    overrides, e.g. another linger."""
    return {
        "linger.ms": 20,
        **base,
        "logger": librdkafka_logger("producer"),
        **owned("enable.idempotence"),
        **(fixed or {}),
    }


def transactional_config(
    base: Mapping[str, Any], transactional_id: str, topic_limit: int | None = None
) -> Config:
    """The service's producer: scores, dead letters and input offsets in one transaction.
    ``topic_limit``: the smallest ``max.message.bytes`` of the topics it writes; its batches
    stay within it, so a record the broker would refuse (aborting the batch, and its replay,
    for ever) is refused at ``produce`` instead, where a dead letter falls back to a smaller
    form."""
    limited = {} if topic_limit is None else _within(base, topic_limit)
    return {
        "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
        "linger.ms": 5,
        "compression.type": "zstd",
        **base,
        **limited,
        **owned("enable.idempotence", "metadata.recovery.strategy"),
        "logger": librdkafka_logger("producer"),
        "transactional.id": transactional_id,
    }


# librdkafka checks a record against message.max.bytes without the record batch's own header
# (61 bytes) and per-record overhead, which the broker counts: a record within this many bytes
# of the topic's limit passed produce() and was refused by the broker, aborting its batch.
BATCH_OVERHEAD = 512


def _within(base: Mapping[str, Any], topic_limit: int) -> Config:
    """message.max.bytes no larger than the topics take, less a batch's overhead (librdkafka's
    default is 1,000,000)."""
    own = int(base.get("message.max.bytes", 1_000_000))
    return {"message.max.bytes": max(min(own, topic_limit - BATCH_OVERHEAD), 1000)}


def admin_config(base: Mapping[str, Any]) -> Config:
    """An admin client (topic creation)."""
    return {**base, "logger": librdkafka_logger("admin")}


# --- producing and errors ------------------------------------------------------------------


def produce(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: list[Header] | None = None,
    on_delivery: DeliveryCallback | None = None,
) -> None:
    """Queue one record; while librdkafka's local queue is full, serve delivery reports until
    there is room (a full queue is backpressure, not an error)."""
    extra: dict[str, Any] = {} if on_delivery is None else {"on_delivery": on_delivery}
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, **extra)
            return
        except BufferError:
            producer.poll(_QUEUE_FULL_WAIT_S)


def error_of(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if any."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def client(build: Callable[[], T]) -> T:
    """Build a Kafka client; a configuration librdkafka refuses (an unknown property, a bad
    value, a combination it does not allow) can only come from a setting: ConfigError. Every
    client popscore makes is built through here."""
    try:
        return build()
    except KafkaException as exc:
        error = error_of(exc)
        if error is not None and error.code() == KafkaError._INVALID_ARG:
            raise ConfigError(f"POPSCORE_KAFKA_PROPERTIES: {error.str()}") from None
        raise


def output_topics_limit(base: Mapping[str, Any], named: Mapping[str, str]) -> int | None:
    """Check that the topics the service writes exist (``named``: variable -> topic) and return
    the smallest ``max.message.bytes`` among them, or None when the brokers do not say (no
    DescribeConfigs right). A missing one is a ConfigError naming its variable: produced to,
    it aborted every batch that reached it, for ever (a broker with auto-create off)."""
    admin = client(lambda: AdminClient(admin_config(base)))
    missing = dict(named)
    for attempt in range(TOPIC_LOOKUPS):  # a topic created a moment ago may lag in metadata
        existing = _topics_waiting(admin, base)
        missing = {var: t for var, t in missing.items() if not existing.get(t)}
        if not missing or attempt == TOPIC_LOOKUPS - 1:
            break
        time.sleep(0.5)
    for variable, topic in missing.items():
        raise ConfigError(
            f"{variable}: topic {topic!r} does not exist; create it (`popscore topics --create` "
            "makes every topic the settings name)"
        )
    return _smallest_limit(admin, sorted(set(named.values())))


def _topics_waiting(admin: AdminClient, base: Mapping[str, Any]) -> dict[str, Any]:
    """The brokers' topics, waiting up to STARTUP_WAIT_S for brokers that are not up yet (a
    restart of the whole stack starts popscore and Kafka together)."""
    deadline = time.monotonic() + STARTUP_WAIT_S
    while True:
        try:
            return dict(admin.list_topics(timeout=10).topics)
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                where = base.get("bootstrap.servers", "?")
                raise PopscoreError(f"Kafka unreachable at {where} for {STARTUP_WAIT_S:.0f} s "
                                    f"(POPSCORE_KAFKA_BOOTSTRAP): {exc}") from None  # fmt: skip
            log.warning("Kafka not reachable yet (%s); waiting", exc)
            time.sleep(2)


def _smallest_limit(admin: AdminClient, topics: list[str]) -> int | None:
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    limits = []
    try:
        for future in admin.describe_configs(resources, request_timeout=10).values():
            entry = future.result().get("max.message.bytes")
            if entry is not None and entry.value is not None:
                limits.append(int(entry.value))
    except (KafkaException, ValueError) as exc:
        log.warning("the output topics' max.message.bytes is unknown (%s): dead letters are "
                    "sized to the producer's message.max.bytes only", exc)  # fmt: skip
        return None
    return min(limits, default=None)


def ensure_topics(
    base: Mapping[str, Any], topics: list[str], partitions: int = 3, replication: int = 1
) -> None:
    """Create the topics that do not exist yet (replication 1 by default: the local stack has
    one broker; -1 takes the brokers' default). For ``produce``, ``topics --create``, the
    benchmark and the tests; the service creates none."""
    admin = client(lambda: AdminClient(admin_config(base)))
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [NewTopic(t, num_partitions=partitions, replication_factor=replication)
               for t in topics if t not in existing]  # fmt: skip
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=15).items():
        try:
            future.result()
        except KafkaException as exc:
            error = error_of(exc)
            if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise PopscoreError(f"cannot create topic {topic}: {exc}") from exc


def delete_topics(base: Mapping[str, Any], tag: str) -> int:
    """Delete every topic whose name contains ``tag`` (the benchmark's and the tests' own, once
    they are done: a local broker loads every partition at start-up, so left-overs slow it
    down run after run). Best effort: a topic that cannot be deleted is logged and left.
    Returns how many were asked to go. A tag under 8 characters, or one that could name a
    broker's own topic (``__``...), is refused with ValueError: it would match others' topics."""
    if len(tag) < MIN_DELETE_TAG or tag.startswith("__"):
        raise ValueError(f"delete_topics: tag {tag!r} could match topics that are not its own")
    admin = client(lambda: AdminClient(admin_config(base)))
    try:
        doomed = [t for t in admin.list_topics(timeout=10).topics
                  if tag in t and not t.startswith("__")]  # fmt: skip
    except KafkaException as exc:  # e.g. the broker is down after a chaos test
        log.warning("cannot list topics to delete (%s): %s", tag, exc)
        return 0
    if not doomed:
        return 0
    for topic, future in admin.delete_topics(doomed, operation_timeout=15).items():
        try:
            future.result()
        except KafkaException as exc:
            log.warning("cannot delete topic %s: %s", topic, exc)
    return len(doomed)


# --- librdkafka's log lines ----------------------------------------------------------------

FOLD_WINDOW_S = 30.0
MAX_KINDS = 1000  # kinds of line remembered; the least recently seen is forgotten first
# Parts of a line that change between otherwise identical repeats.
_VOLATILE = re.compile(r"\d+ms|\d+ ms")


class FoldRepeats(logging.Filter):
    """Passes a record unless an identical one (timings aside) passed within ``window_s``; the
    next one after the window says how many were folded. A broker that is down makes librdkafka
    log a line per connection attempt (docs/RELIABILITY.md, "Failure modes")."""

    def __init__(self, window_s: float = FOLD_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()  # librdkafka logs from its own threads

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _VOLATILE.sub("N ms", record.getMessage()))
        now = time.monotonic()
        with self._lock:
            last, folded = self._seen.pop(key, (-self.window_s, 0))  # re-added as the newest
            if now - last < self.window_s:
                self._seen[key] = (last, folded + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > MAX_KINDS:  # O(1): many distinct lines (debug logging)
                self._seen.popitem(last=False)
        if folded:
            record.msg = (
                f"{record.getMessage()} (and {folded} more like it in {self.window_s:.0f} s)"
            )
            record.args = None
        return True


_logger_lock = threading.Lock()


def librdkafka_logger(kind: str) -> logging.Logger:
    """The logger a librdkafka client of ``kind`` (consumer, producer, admin) writes to."""
    logger = logging.getLogger(f"librdkafka.{kind}")
    with _logger_lock:
        if not any(isinstance(f, FoldRepeats) for f in logger.filters):
            logger.addFilter(FoldRepeats())
    return logger


def topic_records(base: Mapping[str, Any], topic: str, timeout_s: float = 10.0) -> int:
    """How many records the topic holds now (high minus low watermark, summed). A topic just
    created may have no leaders yet: retried until ``timeout_s``."""
    reader = Consumer(consumer_config(base, f"popscore-count-{uuid.uuid4().hex}"))
    deadline = time.monotonic() + timeout_s
    try:
        meta = reader.list_topics(topic, timeout=timeout_s).topics[topic]
        return sum(_partition_records(reader, topic, p, deadline) for p in meta.partitions)
    finally:
        reader.close()


# What a partition of a topic created a moment ago answers until its leader is elected.
_NO_LEADER_YET = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
)


def _partition_records(reader: Consumer, topic: str, partition: int, deadline: float) -> int:
    low, high = watermarks(reader, TopicPartition(topic, partition), deadline)
    return high - low


def watermarks(reader: Consumer, tp: TopicPartition, deadline: float) -> tuple[int, int]:
    """A partition's low and high offsets, asked again until ``deadline`` (monotonic) while
    it has no leader yet (a topic created a moment ago, an election in progress)."""
    while True:
        try:
            low, high = reader.get_watermark_offsets(tp, timeout=5)
            return int(low), int(high)
        except KafkaException as exc:
            code = exc.args[0].code()
            if time.monotonic() > deadline or code not in _NO_LEADER_YET:
                raise
            time.sleep(0.2)
