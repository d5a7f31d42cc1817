"""The Kafka side of the loop: poll micro-batches, track assignment and lag, commit offsets.

Auto-commit and auto offset store are off: offsets move only through ``commit``, which the app
calls after Redis and the results topic hold the batch.
"""

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumer.batcher import MicroBatcher
from consumer.metrics import Metrics

log = logging.getLogger(__name__)
LAG_REFRESH_S = 5.0


class KafkaSource:
    """One consumer in the group, subscribed to the input topic."""

    def __init__(
        self,
        config: dict[str, Any],
        group_id: str,
        topic: str,
        batcher: MicroBatcher,
        metrics: Metrics,
    ) -> None:
        self.consumer = Consumer(
            {
                **config,
                # librdkafka's own log lines go through Python logging, not raw stderr.
                "logger": logging.getLogger("librdkafka.consumer"),
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
            }
        )
        self.topic = topic
        self.batcher = batcher
        self.metrics = metrics
        self.assignment: set[tuple[str, int]] = set()
        self._at_end: set[tuple[str, int]] = set()
        self._lag_checked = 0.0
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def poll_batch(self, idle_timeout: float) -> list[Message]:
        """The next micro-batch of real messages (errors and end-of-partition events handled)."""
        return self.batcher.collect(self._fetch, idle_timeout)

    def caught_up(self) -> bool:
        """Every assigned partition has been read to its end (used by ``consume --stop-at-end``)."""
        return bool(self.assignment) and self.assignment <= self._at_end

    def commit(self, messages: Sequence[Message]) -> None:
        """Synchronously commit the offset after the last message of each partition."""
        next_offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            tp = (msg.topic() or "", msg.partition() or 0)
            next_offsets[tp] = max(next_offsets.get(tp, 0), (msg.offset() or 0) + 1)
        if next_offsets:
            offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def refresh_lag(self, force: bool = False) -> None:
        """Set ``popscore_consumer_lag`` from the high watermarks, at most every few seconds."""
        now = time.monotonic()
        if not force and now - self._lag_checked < LAG_REFRESH_S:
            return
        self._lag_checked = now
        parts = [TopicPartition(t, p) for t, p in sorted(self.assignment)]
        if not parts:
            return
        for tp in self.consumer.position(parts):
            _, high = self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
            lag = high - tp.offset if tp.offset >= 0 else high
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(lag, 0))

    def close(self) -> None:
        """Leave the group cleanly so partitions move at once."""
        self.consumer.close()

    def _fetch(self, n: int, timeout: float) -> list[Message]:
        real = []
        for msg in self.consumer.consume(n, timeout):
            err = msg.error()
            tp = (msg.topic() or "", msg.partition() or 0)
            if err is None:
                self._at_end.discard(tp)
                real.append(msg)
            elif err.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(tp)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error: %s", err)
        return real

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned %s", sorted(self.assignment))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.assignment -= revoked
        self._at_end -= revoked
        for topic, partition in revoked:
            with contextlib.suppress(KeyError):  # never exported if no lag check ran yet
                self.metrics.consumer_lag.remove(topic, str(partition))
        log.info("revoked %s", sorted(revoked))
