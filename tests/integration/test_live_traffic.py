"""The backfill's lag gate against a real broker: the live group's commits, and where each of
its partitions' logs starts and ends, asked with the admin API (nothing joins the group)."""

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.yielding import LiveTraffic

pytestmark = pytest.mark.integration


def test_the_live_groups_lag_is_what_it_can_still_read(
    stack: dict[str, str], topics: dict[str, str]
) -> None:
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    topic, group = topics["input"], topics["group"]
    producer = Producer(kafka)
    for i in range(26):
        producer.produce(topic, b"x", partition=0 if i < 20 else 1)
    producer.flush(10)
    admin = AdminClient(kafka)
    # The live group read 2 records of partition 0 and all 6 of partition 1; partition 2 it
    # never committed on (no records there either).
    commits = [TopicPartition(topic, 0, 2), TopicPartition(topic, 1, 6)]
    admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, commits)])[
        group
    ].result(10)
    live = LiveTraffic(kafka, group, topic, max_lag=15)
    assert live.lag == 20 - 2 and live.busy()
    # Retention removes partition 0's first 10 records, 8 of them unread: they no longer count.
    [future] = admin.delete_records([TopicPartition(topic, 0, 10)]).values()
    future.result(10)
    assert LiveTraffic(kafka, group, topic, max_lag=15).lag == 20 - 10


def test_a_group_that_never_committed_is_not_yielded_to(
    stack: dict[str, str], topics: dict[str, str]
) -> None:
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    live = LiveTraffic(kafka, "no-such-group-" + topics["group"], topics["input"], max_lag=0)
    assert live.lag == 0 and not live.busy()
