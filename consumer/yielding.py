"""A backfill yields to live traffic: it pauses while the live consumer group lags.

Checked every CHECK_S seconds from the live group's committed offsets and the topic's end
offsets (last stable offsets: what a read_committed live consumer can reach), both asked with
Kafka's admin API, so nothing joins the live group. The checks run in the background: the main
loop applies an answer once it is in and never waits for the brokers (a blocking query per
partition held it for a round trip each, every check: tens of ms at 128 partitions across
zones). Only the first check, at start, is waited for, so a backfill started behind a lagging
live group pauses before its first batch. Beside it, the backfill runs at a lower CPU priority
(POPSCORE_CPU_NICE): on a shared host the scheduler serves live first, and the lag gate covers
live consumers on other hosts.
"""

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
from confluent_kafka.admin import AdminClient

from consumer.kafka import admin_config
from consumer.source import EndOffsets

log = logging.getLogger(__name__)
CHECK_S = 2.0
QUERY_TIMEOUT_S = 5.0


class LiveTraffic:
    """Whether the live group (``group`` on ``topic``) lags by more than ``max_lag`` records."""

    def __init__(
        self,
        config: dict[str, Any],
        group: str,
        topic: str,
        max_lag: int,
        admin: AdminClient | None = None,
        ends: EndOffsets | None = None,
    ) -> None:
        """``admin``, ``ends``: the clients to ask (default: new ones from ``config``)."""
        self.group, self.topic, self.max_lag = group, topic, max_lag
        self.admin = admin if admin is not None else AdminClient(admin_config(config))
        self.ends = ends if ends is not None else EndOffsets(config)
        self.lag = 0
        self._committed: Future[Any] | None = None
        self._asked_at = 0.0
        self._partitions: list[int] = []
        """The topic's partitions the live group has committed on, from the last answer: the
        ones whose end offsets the next check asks for."""
        self._warned: set[str] = set()
        # Two rounds: the first learns the group's partitions, the second their ends.
        for _ in range(2):
            self._ask()
            self._collect(wait=QUERY_TIMEOUT_S + 1)

    def busy(self) -> bool:
        """True while live lags. Never waits: the last answer holds until the next one is in,
        and when a check fails."""
        self._collect()
        if self._committed is None and time.monotonic() - self._asked_at >= CHECK_S:
            self._ask()
        return self.lag > self.max_lag

    def close(self) -> None:
        self._committed = None

    def _ask(self) -> None:
        self._asked_at = time.monotonic()
        request = [ConsumerGroupTopicPartitions(self.group)]  # every partition it committed on
        futures = self.admin.list_consumer_group_offsets(request, request_timeout=QUERY_TIMEOUT_S)
        self._committed = futures[self.group]
        if self._partitions:
            self.ends.ask((self.topic, p) for p in self._partitions)

    def _answered(self) -> bool:
        self.admin.poll(0)  # serves the admin client's queued log lines
        overdue = time.monotonic() - self._asked_at > QUERY_TIMEOUT_S + 1
        committed = self._committed is not None and self._committed.done()
        return overdue or (committed and (not self.ends.pending or self.ends.ready()))

    def _collect(self, wait: float = 0.0) -> None:
        """Apply the pending check once it has its answers (waiting up to ``wait`` seconds)."""
        if self._committed is None:
            return
        deadline = time.monotonic() + wait
        while not self._answered():
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
        pending, self._committed = self._committed, None
        try:
            committed = {
                tp.partition: tp.offset
                for tp in pending.result(timeout=0).topic_partitions
                if tp.topic == self.topic and tp.offset >= 0
            }
            ends = self.ends.take(timeout=0) if self.ends.pending else None
        except (KafkaException, FutureTimeout, OSError, RuntimeError) as exc:
            log.warning("live lag of group %s unknown: %s", self.group, str(exc) or "no answer")
            return
        if not committed:
            # No live consumer to yield to (a wrong group name would otherwise pause the
            # backfill for ever).
            self._warn_once(f"group {self.group} has committed nothing on {self.topic}: "
                            "not yielding to it")  # fmt: skip
        self._partitions = sorted(committed)
        if ends is not None:
            self.lag = sum(
                max(ends[(self.topic, p)] - offset, 0)
                for p, offset in committed.items()
                if (self.topic, p) in ends
            )

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
