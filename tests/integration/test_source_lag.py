"""The consumer's lag against a real broker: end offsets a read_committed reader can reach, asked
on the admin client's own connection, minus the consumer's position."""

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.metrics import Metrics
from consumer.source import KafkaSource

pytestmark = pytest.mark.integration


def test_lag_counts_what_is_left_to_read_and_not_an_open_transaction(
    stack: dict[str, str], topics: dict[str, str]
) -> None:
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    producer = Producer(kafka)
    for i in range(12):
        producer.produce(topics["input"], f"r{i}".encode(), partition=i % 3)
    producer.flush(10)
    open_txn = Producer({**kafka, "transactional.id": f"lag-{uuid.uuid4().hex[:8]}"})
    open_txn.init_transactions(30)
    open_txn.begin_transaction()
    for i in range(5):  # not committed: no read_committed reader can get to these yet
        open_txn.produce(topics["input"], b"pending", partition=i % 3)
    open_txn.flush(10)

    src = KafkaSource(kafka, topics["group"], topics["input"], Metrics(),
                      lambda gone: None, lambda gone: None)  # fmt: skip
    try:
        read = []
        deadline = time.monotonic() + 60
        while len(read) < 5 and time.monotonic() < deadline:
            read += src.fetch(5 - len(read), 0.5)
        assert len(read) == 5
        src.refresh_lag(force=True)
        assert src.kafka_problem is None
        assert src.remaining == 12 - 5
        per_partition = [
            src.metrics.registry.get_sample_value(
                "popscore_consumer_lag", {"topic": topics["input"], "partition": str(p)}
            )
            for p in range(3)
        ]
        assert sum(v or 0 for v in per_partition) == 12 - 5
    finally:
        open_txn.abort_transaction(10)
        src.close()


def lag_of(src: KafkaSource, topic: str, partitions: int) -> list[float | None]:
    return [
        src.metrics.registry.get_sample_value(
            "popscore_consumer_lag", {"topic": topic, "partition": str(p)}
        )
        for p in range(partitions)
    ]


def committed_at_the_ends(stack: dict[str, str], topic: str, group: str) -> None:
    """Three partitions holding 3, 2 and 1 records, the group committed at each end."""
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    producer = Producer(kafka)
    for i in range(6):
        producer.produce(topic, f"r{i}".encode(), partition=[0, 0, 0, 1, 1, 2][i])
    producer.flush(10)
    committer = Consumer({**kafka, "group.id": group})
    ends = [committer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in range(3)]
    assert ends == [3, 2, 1]
    committer.commit(offsets=[TopicPartition(topic, p, e) for p, e in enumerate(ends)],
                     asynchronous=False)  # fmt: skip
    committer.close()


@pytest.mark.parametrize("paused", [False, True])
def test_a_partition_read_to_its_end_before_this_member_has_no_lag(
    stack: dict[str, str], topics: dict[str, str], paused: bool
) -> None:
    """After a restart or a rebalance a quiet partition gives the consumer no position (one is
    known only once a record is consumed): its lag was exported as the whole log, which fired
    PopscoreNoScoresWritten on a healthy idle service. Now: where its end event left it, or,
    assigned while paused (no fetch at all), the group's committed offset."""
    committed_at_the_ends(stack, topics["input"], topics["group"])
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    src = KafkaSource(kafka, topics["group"], topics["input"], Metrics(),
                      lambda gone: None, lambda gone: None)  # fmt: skip
    src.paused = paused  # as the App's loop is in backpressure when the rebalance assigns
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert src.fetch(5, 0.5) == []
            src.refresh_lag(force=True)
            if len(src.assignment) == 3 and lag_of(src, topics["input"], 3) == [0, 0, 0]:
                break
        assert lag_of(src, topics["input"], 3) == [0, 0, 0]
        assert src.remaining == 0
        producer = Producer(kafka)
        producer.produce(topics["input"], b"new", partition=0)
        producer.flush(10)
        src.refresh_lag(force=True)  # nothing fetched meanwhile: one record to read
        assert lag_of(src, topics["input"], 3) == [1, 0, 0] and src.remaining == 1
        src._on_lost(src.consumer, [TopicPartition(t, p) for t, p in sorted(src.assignment)])
        assert src.metrics.registry.get_sample_value("popscore_remaining_records") == 0
    finally:
        src.close()
