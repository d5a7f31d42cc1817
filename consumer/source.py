"""The Kafka input: poll, assignment (cooperative-sticky), pause/resume, rewind, lag.

Only the main thread touches the consumer. The partitions' end offsets (for the lag) are asked of
the brokers by an admin client of its own and collected when they are in, so the poll loop never
waits for them (``EndOffsets``). Offsets never move by themselves (auto-commit and
auto offset store are off, ``consumer.kafka.consumer_config``): they are committed inside the
producer's transaction (``consumer/commit.py``) once Redis and the results topic hold the batch.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from consumer.kafka import admin_config, consumer_config, error_of, librdkafka_logger, owned
from consumer.metrics import Metrics

log = logging.getLogger(__name__)
LAG_REFRESH_S = 5.0
END_OFFSETS_TIMEOUT_S = 5.0
# A partition assigned this long without a fetch position is restarted from its committed
# offset: librdkafka can leave a taken-over partition unfetched (docs/RELIABILITY.md, "Failure
# modes").
NO_POSITION_RESTART_S = 30.0
Partition = tuple[str, int]
RebalanceHook = Callable[[set[Partition]], None]


def partition_of(msg: Message) -> Partition:
    """The (topic, partition) a message came from."""
    return (msg.topic() or "", msg.partition() or 0)


def record_id(msg: Message) -> str:
    """``topic/partition/offset``: names one Kafka record (the owner of an event-id claim)."""
    return "{}/{}/{}".format(*partition_of(msg), msg.offset())


def topic_partitions(parts: Iterable[Partition]) -> list[TopicPartition]:
    """The (topic, partition) pairs as librdkafka takes them, in order."""
    return [TopicPartition(t, p) for t, p in sorted(parts)]


def next_offsets(messages: Iterable[Message]) -> list[TopicPartition]:
    """Per partition, the offset after its last message: what a commit of these messages stores."""
    offsets: dict[Partition, int] = {}
    for msg in messages:
        tp = partition_of(msg)
        offsets[tp] = max(offsets.get(tp, 0), (msg.offset() or 0) + 1)
    return [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]


class EndOffsets:
    """Each partition's end for a ``read_committed`` reader (its last stable offset), asked in
    the background on an admin client's own connection.

    On the consumer's connection a query waits behind the fetch long-poll in progress (up to
    ``fetch.wait.max.ms``, 500 ms), once per partition: at 8 partitions the old blocking query
    stopped the poll loop for 1.3-3.5 s every LAG_REFRESH_S, which left a third of two cores
    idle (docs/PERFORMANCE.md, "One process at 8 partitions")."""

    def __init__(self, config: dict[str, Any], earliest: bool = False) -> None:
        """``earliest``: where each partition's log starts instead (retention's cut)."""
        self.admin = AdminClient(admin_config(config))
        self._spec = OffsetSpec.earliest if earliest else OffsetSpec.latest
        self._pending: dict[Partition, Future[Any]] = {}
        self._asked_at = 0.0

    @property
    def pending(self) -> bool:
        """A query was asked and not yet taken."""
        return bool(self._pending)

    def ask(self, partitions: Iterable[Partition]) -> None:
        """Start one query for all ``partitions`` (a ListOffsets request per leader)."""
        specs = {TopicPartition(t, p): self._spec() for t, p in partitions}  # type: ignore[no-untyped-call]
        futures = self.admin.list_offsets(
            specs,
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=END_OFFSETS_TIMEOUT_S,
        )
        self._pending = {(tp.topic, tp.partition): f for tp, f in futures.items()}
        self._asked_at = time.monotonic()

    def ready(self) -> bool:
        """The pending query has its answers (or its errors), or has had longer than its
        timeout (``take`` then raises): a query that never answers must not stop the lag."""
        # Serves the admin client's log lines (queued for poll(), as a logger is set).
        self.admin.poll(0)
        overdue = time.monotonic() - self._asked_at > END_OFFSETS_TIMEOUT_S + 1
        return overdue or all(f.done() for f in self._pending.values())

    def take(self, timeout: float | None = None) -> dict[Partition, int]:
        """The answers of the pending query, waiting up to ``timeout`` for them; raises the
        first partition's KafkaException (a broker away, a timeout)."""
        pending, self._pending = self._pending, {}
        done, _ = wait_futures(pending.values(), timeout=timeout)
        self.admin.poll(0)
        if len(done) < len(pending):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "end offsets: no answer"))
        try:
            return {key: future.result().offset for key, future in pending.items()}
        except KafkaException:
            raise
        except Exception as exc:  # the client's own result handling failed: same as no answer
            raise KafkaException(KafkaError(KafkaError._FAIL, f"end offsets: {exc}")) from exc


class CommittedOffsets:
    """The group's committed offsets of some partitions, asked in the background like
    ``EndOffsets``: where a partition this member holds but has no fetch position in would be
    read from (one assigned while paused, say)."""

    def __init__(self, admin: AdminClient, group: str) -> None:
        self.admin, self.group = admin, group
        self._future: Future[Any] | None = None
        self._known: dict[Partition, int] = {}

    def ask(self, partitions: Iterable[Partition]) -> None:
        """One query, unless one is still out."""
        if self._future is not None and not self._future.done():
            return
        request = ConsumerGroupTopicPartitions(self.group, topic_partitions(partitions))
        try:
            futures = self.admin.list_consumer_group_offsets(
                [request], request_timeout=END_OFFSETS_TIMEOUT_S
            )
        except (KafkaException, ValueError) as exc:
            log.debug("committed offsets not asked: %s", exc)
            return
        self._future = futures[self.group]

    def known(self) -> dict[Partition, int]:
        """The latest answers (partitions with nothing committed left out); never waits."""
        future, self._future = self._future, None
        if future is None or not future.done():
            self._future = future
            return self._known
        try:
            answer = future.result()
        except Exception as exc:  # a broker away: keep the earlier answers, ask again later
            log.debug("committed offsets: %s", exc)
            return self._known
        for tp in answer.topic_partitions or []:
            if tp.error is None and tp.offset >= 0:
                self._known[(tp.topic, tp.partition)] = tp.offset
        return self._known

    def forget(self, partitions: Iterable[Partition]) -> None:
        for key in partitions:
            self._known.pop(key, None)


class KafkaSource:
    """One member of the consumer group, subscribed to the input topic."""

    def __init__(
        self,
        config: dict[str, Any],
        group_id: str,
        topic: str,
        metrics: Metrics,
        on_revoke: RebalanceHook,
        on_lost: RebalanceHook,
        admin: dict[str, Any] | None = None,
    ) -> None:
        """``admin``: the properties of the end-offset queries' admin client (default:
        ``config``'s)."""
        self.kafka_problem: str | None = None
        """Why Kafka is unreachable (all brokers down, a lag query failed); None once the
        brokers answer again. Read by /readyz."""
        self._fatal: KafkaError | None = None
        fixed = {
            # Client-level errors (all brokers down, fatal ones) come here, not from consume().
            "error_cb": self._on_error,
            # Incremental rebalances: partitions that stay are never stopped.
            **owned("partition.assignment.strategy"),
        }
        self.consumer = Consumer(consumer_config(config, group_id, fixed))
        self.ends = EndOffsets(config if admin is None else admin)
        self._group_offsets = CommittedOffsets(self.ends.admin, group_id)
        self._eof: dict[Partition, int] = {}
        """Per partition, where its last end-of-partition event put it: the position of one
        read to its end, which position() reports only once a record was consumed."""
        self.topic = topic
        self.metrics = metrics
        self.assignment: set[Partition] = set()
        self.paused = False
        self._hooks = (on_revoke, on_lost)
        self._at_end: set[Partition] = set()
        self._lag_checked = 0.0
        self.remaining = 0
        """Records between the positions and the ends of the assigned partitions (last check)."""
        self._no_position_since: dict[Partition, float] = {}
        self._first_read: dict[Partition, int] = {}
        """Per partition, the offset of the first record read since it was assigned."""
        self._next: dict[Partition, int] = {}
        """Per partition, the offset after the last record handed out (or where we sought)."""
        self._redelivered: dict[Partition, int] = {}
        """Per partition, the ``_next`` at which records came again (logged once)."""
        self._committed_here: dict[Partition, int] = {}
        """Per partition, the offset this member last committed since it was assigned."""
        self._paused_here: set[Partition] = set()
        """The partitions ``pause`` paused (and ``resume`` resumes)."""
        self.consumer.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def fetch(self, n: int, timeout: float) -> list[Message]:
        """Up to n real messages (errors and end-of-partition events are handled here)."""
        real = []
        messages = self.consumer.consume(n, timeout)
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        for msg in messages:
            err = msg.error()
            tp = partition_of(msg)
            if err is None:
                self._at_end.discard(tp)
                self._eof.pop(tp, None)
                self.kafka_problem = None
                # A revoke served inside this consume() may have come after the message.
                if tp in self.assignment and not self._handed_out(tp, msg.offset() or 0):
                    real.append(msg)
                    self._first_read.setdefault(tp, msg.offset() or 0)
            elif err.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(tp)
                offset = msg.offset()
                if tp in self.assignment and offset is not None and offset >= 0:
                    self._eof[tp] = offset
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error: %s", err)
        return real

    def _handed_out(self, key: Partition, offset: int) -> bool:
        """Whether ``offset`` of ``key`` was handed out already since the partition was
        assigned (or this source last sought it). librdkafka has restarted a partition's fetch
        from an earlier offset by itself (seen under load in the chaos scenario (g), librdkafka
        2.16: offset 0 again 1 s after the records up to it were committed, with no seek of
        ours and no new assignment): the records were scored again and committed twice. The cause
        found (``pause``) is avoided there; whatever the cause, those are dropped here, so
        exactly once does not rest on the client."""
        expected = self._next.get(key)
        if expected is not None and offset < expected:
            self.metrics.redelivered.inc()
            if self._redelivered.get(key) != expected:
                log.warning("partition %s: offset %d came again, below %d already handed out; "
                            "dropped up to there", key, offset, expected)  # fmt: skip
                self._redelivered[key] = expected
            return True
        self._next[key] = offset + 1
        return False

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's error_cb, served from consume() on the main thread."""
        if err.fatal():
            self._fatal = err  # raised by the fetch() in progress
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.kafka_problem = str(err.str())
        # Through the folding logger: a broker that stays down reports once per attempt.
        librdkafka_logger("consumer").warning("error: %s", err.str())

    def caught_up(self) -> bool:
        """Every assigned partition has been read to its end (``consume --stop-at-end``)."""
        return bool(self.assignment) and self.assignment <= self._at_end

    def pause(self) -> None:
        """Stop fetching; ``fetch`` keeps serving callbacks, so the group membership lives on.

        Only partitions that have handed out a record since their assignment (or our seek) are
        paused: one still looking up where to start (no committed offset, so
        ``auto.offset.reset``) must not be paused and resumed during that lookup. librdkafka
        2.16 then sends a second lookup, answers the first as outdated by re-arming a 500 ms
        offset-query timer that nothing stops, and that timer later restarts the partition,
        by then fetching, at its beginning: records already handed out come again
        (``_handed_out``). Called on every poll while paused, so such a partition is paused
        right after its first record."""
        todo = {key for key in self.assignment if key in self._next} - self._paused_here
        if todo:
            self.consumer.pause(topic_partitions(todo))
            self._paused_here |= todo
        self.paused = True

    def resume(self) -> None:
        """Fetch again: the partitions ``pause`` paused."""
        held = self._paused_here & self.assignment
        if held:
            self.consumer.resume(topic_partitions(held))
        self._paused_here = set()
        self.paused = False

    def _unpause(self, keys: set[Partition]) -> None:
        """Resume partitions this member paused as they leave it: librdkafka would keep the
        pause to a later reassignment, and ``_on_assign``'s resume would then fall in the
        start-offset lookup that ``pause`` explains."""
        if keys:
            with contextlib.suppress(KafkaException):  # a lost partition may be gone already
                self.consumer.resume(topic_partitions(keys))
            self._paused_here -= keys

    def mark_committed(self, offsets: Iterable[TopicPartition]) -> None:
        """This member's transaction committed ``offsets``: where a rewind goes back to."""
        for tp in offsets:
            key = (tp.topic, tp.partition)
            if key in self.assignment:
                self._committed_here[key] = tp.offset

    def rewind_point(self, key: Partition) -> int | None:
        """The offset a rewind of ``key`` goes back to (below): no record before it is in
        hand; None before anything of it was read."""
        return self._committed_here.get(key, self._first_read.get(key))

    def rewind(self) -> None:
        """Seek every assigned partition back to its committed offset (after an abort or a
        drop): the last this member committed since the partition was assigned, else the first
        record it read of it, which is where the group's committed offset (or
        ``auto.offset.reset``) started it. Nothing is asked of the broker: behind a rejoin in
        progress that query waited for the whole group (up to the session timeout) and timed
        out, which stopped the process."""
        rewound = 0
        for key in sorted(self.assignment):
            offset = self.rewind_point(key)
            if offset is None:
                continue  # nothing read: nothing to rewind
            self.consumer.seek(TopicPartition(*key, offset))
            self._next[key] = offset
            # librdkafka reports a partition's end again only after a seek
            self._at_end.discard(key)
            self._eof.pop(key, None)
            rewound += 1
        log.warning("rewound %d partitions to their committed offsets", rewound)

    def group_metadata(self) -> Any:
        """For ``send_offsets_to_transaction``: fences commits from an outdated generation."""
        return self.consumer.consumer_group_metadata()

    def refresh_lag(self, force: bool = False) -> None:
        """Set ``popscore_consumer_lag`` from the partitions' end offsets, at most every few
        seconds, without waiting: one call asks for them, a later one applies the answers.
        ``force`` asks at once and waits for the answers."""
        now = time.monotonic()
        wait_s = END_OFFSETS_TIMEOUT_S + 1 if force else 0.0
        if self.ends.pending:
            if not force and not self.ends.ready():
                return  # asked, not answered yet
            self._apply_ends(self._take_ends(wait_s), now)
        if not self.assignment or (not force and now - self._lag_checked < LAG_REFRESH_S):
            return
        self._lag_checked = now
        self.ends.ask(self.assignment)
        unplaced = [key for key, offset in self._positions(self.assignment) if offset < 0]
        if unplaced:
            self._group_offsets.ask(unplaced)
        if force:
            self._apply_ends(self._take_ends(wait_s), now)

    def _take_ends(self, timeout: float) -> dict[Partition, int] | None:
        """The end offsets asked for, or None (and Kafka marked unreachable) if the query
        failed: not ready, try again at the next refresh."""
        try:
            ends = self.ends.take(timeout)
        except KafkaException as exc:
            error = error_of(exc)
            self.kafka_problem = f"lag query failed: {error.str() if error else exc}"
            log.warning("%s", self.kafka_problem)
            return None
        self.kafka_problem = None
        return ends

    def _positions(self, parts: Iterable[Partition]) -> list[tuple[Partition, int]]:
        """Where each partition is read from: the consumer's position, else where its end
        event left it, else -1 (none known: assigned while paused, or not fetched yet)."""
        found = []
        for tp in self.consumer.position(topic_partitions(parts)):
            key = (tp.topic, tp.partition)
            found.append((key, tp.offset if tp.offset >= 0 else self._eof.get(key, -1)))
        return found

    def _apply_ends(self, ends: dict[Partition, int] | None, now: float) -> None:
        """Lag per partition still assigned: its end minus the consumer's position; without
        one, minus the group's committed offset (the whole partition when nothing is)."""
        if ends is None:
            return
        held = sorted(self.assignment & set(ends))
        committed = self._group_offsets.known()
        total = 0
        for key, offset in self._positions(held):
            start = offset if offset >= 0 else committed.get(key, 0)
            lag = max(ends[key] - start, 0)
            self.metrics.consumer_lag.labels(key[0], str(key[1])).set(lag)
            self._watch_position(key, offset, lag, now)
            total += lag
        # Also with nothing held any more: a consumer that lost its partitions has none left.
        self.remaining = total
        self.metrics.remaining.set(total)

    def _watch_position(self, key: Partition, offset: int, lag: int, now: float) -> None:
        """Restart a partition that has had records to read but no fetch position for
        NO_POSITION_RESTART_S while not paused: seek it to its committed offset."""
        if offset >= 0 or lag <= 0 or self.paused:
            self._no_position_since.pop(key, None)
            return
        since = self._no_position_since.setdefault(key, now)
        if now - since < NO_POSITION_RESTART_S:
            return
        tp = TopicPartition(*key)
        try:
            [committed] = self.consumer.committed([tp], timeout=10)
        except KafkaException as exc:  # offsets still unstable: try again next refresh
            log.warning("partition %s has no fetch position; committed offset: %s", key, exc)
            return
        start = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
        try:
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, start))
        except KafkaException as exc:
            log.warning("partition %s has no fetch position; seek failed: %s", key, exc)
            return
        self._next.pop(key, None)
        self._no_position_since.pop(key, None)
        log.warning("partition %s had no fetch position for %.0f s: restarted at %s",
                    key, now - since, start)  # fmt: skip

    def close(self) -> None:
        """Leave the group cleanly so partitions move at once."""
        self.consumer.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        # librdkafka keeps a partition's pause across its revoke and reassignment
        # (confluent-kafka-go#193): clear it. Not paused here even while the loop is: it has no
        # position yet (see ``pause``, which pauses it after its first record). A resume of a
        # partition that is not paused is a no-op in librdkafka >= 2.4 (#4637).
        consumer.resume(partitions)
        self.assignment |= {(tp.topic, tp.partition) for tp in partitions}
        self.metrics.rebalances.labels("assigned").inc(len(partitions))
        log.info("assigned %s", sorted(self.assignment))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._leave(partitions, self._hooks[0], "revoked")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._leave(partitions, self._hooks[1], "lost")

    def _leave(self, partitions: list[TopicPartition], hook: RebalanceHook, how: str) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        hook(gone)  # while we still own them: finish and commit, or drop
        self.metrics.rebalances.labels(how).inc(len(gone))
        self._unpause(gone & self._paused_here)
        self.assignment -= gone
        self._at_end -= gone
        for key in gone:
            self._first_read.pop(key, None)
            self._committed_here.pop(key, None)
            self._next.pop(key, None)
            self._redelivered.pop(key, None)
        for key in gone:
            self._no_position_since.pop(key, None)
            self._eof.pop(key, None)
        self._group_offsets.forget(gone)
        if not self.assignment:  # no lag check runs while nothing is held: none left to read
            self.remaining = 0
            self.metrics.remaining.set(0)
        for topic, partition in gone:
            with contextlib.suppress(KeyError):  # never exported if no lag check ran yet
                self.metrics.consumer_lag.remove(topic, str(partition))
        log.info("%s %s", how, sorted(gone))
