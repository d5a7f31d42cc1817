"""A backfill yields to live traffic: it pauses while the live consumer group lags.

Checked every CHECK_S seconds with Kafka's admin API, so nothing joins the live group: first the
live group's committed offsets, then, for exactly the partitions it committed on, where each
partition's log starts and ends (its last stable offset: what a read_committed live consumer
can reach). The checks run in the background: the main loop moves a check on when its answers
are in and never waits for the brokers (a blocking query per partition held it for a round trip
each, every check: tens of ms at 128 partitions across zones). Only the first check, at start,
is waited for (at most START_WAIT_S), so a backfill started behind a lagging live group pauses
before its first batch when the brokers answer. Beside it, the backfill runs at a lower CPU
priority (POPSCORE_CPU_NICE): on a shared host the scheduler serves live first, and the lag gate
covers live consumers on other hosts.
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
START_WAIT_S = 2 * QUERY_TIMEOUT_S + 1
"""How long one check may take, its two queries one after the other; the start waits as long."""
_FAILURES = (KafkaException, FutureTimeout, KeyError, ValueError, TypeError, RuntimeError, OSError)


class LiveTraffic:
    """Whether the live group (``group`` on ``topic``) lags by more than ``max_lag`` records."""

    def __init__(
        self,
        config: dict[str, Any],
        group: str,
        topic: str,
        max_lag: int,
        clients: tuple[AdminClient, EndOffsets, EndOffsets] | None = None,
    ) -> None:
        """``clients``: the admin client, the end-offset and the start-offset queries to use
        (default: new ones from ``config``)."""
        self.group, self.topic, self.max_lag = group, topic, max_lag
        if clients is None:
            clients = (
                AdminClient(admin_config(config)),
                EndOffsets(config),
                EndOffsets(config, earliest=True),
            )
        self.admin, self.ends, self.starts = clients
        self.lag = 0
        self._committed: Future[Any] | None = None
        """The check's first query, until its answer is in."""
        self._commits: dict[int, int] | None = None
        """The check's commits, while their partitions' offsets are asked."""
        self._asked_at = 0.0
        self._warned: set[str] = set()
        self._ask()
        self._collect(wait=START_WAIT_S)

    def busy(self) -> bool:
        """True while live lags. Never waits: the last answer holds until the next check is
        done, and when a check fails."""
        self._collect()
        if not self._checking and time.monotonic() - self._asked_at >= CHECK_S:
            self._ask()
        return self.lag > self.max_lag

    def close(self) -> None:
        self._committed = self._commits = None

    @property
    def _checking(self) -> bool:
        return self._committed is not None or self._commits is not None

    def _ask(self) -> None:
        self._asked_at = time.monotonic()
        request = [ConsumerGroupTopicPartitions(self.group)]  # every partition it committed on
        try:
            futures = self.admin.list_consumer_group_offsets(
                request, request_timeout=QUERY_TIMEOUT_S
            )
            self._committed = futures[self.group]
        except _FAILURES as exc:
            self._give_up(exc)

    def _collect(self, wait: float = 0.0) -> None:
        """Move the check in progress on as its answers come in, for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while self._checking:
            self._advance()
            if not self._checking or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def _advance(self) -> None:
        self.admin.poll(0)  # serves the admin client's queued log lines
        if time.monotonic() - self._asked_at > START_WAIT_S:
            self._give_up(None)  # a check that never answers must not stop the next ones
            return
        try:
            if self._committed is not None and self._committed.done():
                self._take_commits(self._committed)
            elif self._commits is not None and self.ends.ready() and self.starts.ready():
                self._take_offsets(self._commits)
        except _FAILURES as exc:
            self._give_up(exc)

    def _take_commits(self, pending: Future[Any]) -> None:
        self._committed = None
        commits = {
            tp.partition: tp.offset
            for tp in pending.result(timeout=0).topic_partitions
            if tp.topic == self.topic and tp.offset >= 0
        }
        if not commits:
            # No live consumer to yield to (a wrong group name would otherwise pause the
            # backfill for ever).
            self._warn_once(f"group {self.group} has committed nothing on {self.topic}: "
                            "not yielding to it")  # fmt: skip
            self.lag = 0
            return
        self._commits = commits
        partitions = [(self.topic, p) for p in sorted(commits)]
        self.ends.ask(partitions)
        self.starts.ask(partitions)

    def _take_offsets(self, commits: dict[int, int]) -> None:
        self._commits = None
        ends, starts = self.ends.take(timeout=0), self.starts.take(timeout=0)
        # From the log start when retention removed what the group had not read yet.
        self.lag = sum(
            max(ends[(self.topic, p)] - max(offset, starts[(self.topic, p)]), 0)
            for p, offset in commits.items()
        )

    def _give_up(self, exc: BaseException | None) -> None:
        self._committed = self._commits = None
        why = (str(exc) if exc is not None else "") or "no answer"
        log.warning("live lag of group %s unknown: %s", self.group, why)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
