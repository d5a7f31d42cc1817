"""A backfill yields to live traffic: it pauses while the live consumer group lags.

Checked every CHECK_S seconds from the live group's committed offsets (Kafka's admin API, so
nothing joins the live group) and the topic's high watermarks. Beside it, the backfill runs at a
lower CPU priority (POPSCORE_CPU_NICE): on a shared host the scheduler serves live first, and
the lag gate covers live consumers on other hosts.
"""

import logging
import time
import uuid

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)
CHECK_S = 2.0
QUERY_TIMEOUT_S = 5.0


class LiveTraffic:
    """Whether the live group (``group`` on ``topic``) lags by more than ``max_lag`` records."""

    def __init__(self, config: dict[str, str], group: str, topic: str, max_lag: int) -> None:
        self.group, self.topic, self.max_lag = group, topic, max_lag
        self.admin = AdminClient(dict[str, str | int | float | bool](config))
        # A group of its own, never subscribed: only asks the brokers for watermarks.
        self.watermarks = Consumer({**config, "group.id": f"popscore-yield-{uuid.uuid4().hex}"})
        self.lag = 0
        self._checked = 0.0
        self._warned: set[str] = set()

    def busy(self) -> bool:
        """True while live lags (the last answer is kept when a check fails)."""
        now = time.monotonic()
        if now - self._checked >= CHECK_S:
            self._checked = now
            try:
                self.lag = self._live_lag()
            except (KafkaException, OSError, RuntimeError) as exc:
                log.warning("live lag of group %s unknown: %s", self.group, exc)
        return self.lag > self.max_lag

    def close(self) -> None:
        self.watermarks.close()

    def _live_lag(self) -> int:
        meta = self.watermarks.list_topics(self.topic, timeout=QUERY_TIMEOUT_S).topics[self.topic]
        parts = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
        request = [ConsumerGroupTopicPartitions(self.group, parts)]
        result = self.admin.list_consumer_group_offsets(request, request_timeout=QUERY_TIMEOUT_S)
        committed = result[self.group].result().topic_partitions
        lag = 0
        for tp in committed:
            if tp.offset < 0:
                # No commit of the live group here: no live consumer to yield to (a wrong
                # group name would otherwise pause the backfill for ever).
                self._warn_once(f"group {self.group} has committed nothing on "
                                f"{self.topic}[{tp.partition}]: not counted")  # fmt: skip
                continue
            low, high = self.watermarks.get_watermark_offsets(
                TopicPartition(self.topic, tp.partition), timeout=QUERY_TIMEOUT_S
            )
            lag += max(high - max(tp.offset, low), 0)
        return lag

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
