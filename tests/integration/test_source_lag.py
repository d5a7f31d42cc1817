"""The consumer's lag against a real broker: end offsets a read_committed reader can reach, asked
on the admin client's own connection, minus the consumer's position."""

import time
import uuid

import pytest
from confluent_kafka import Producer

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
