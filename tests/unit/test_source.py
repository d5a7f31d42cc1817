"""KafkaSource's restart of a partition left without a fetch position (no broker needed)."""

from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from consumer.metrics import Metrics
from consumer.source import NO_POSITION_RESTART_S, KafkaSource

KEY = ("releases", 0)


class FakeConsumer:
    """Records seeks; `committed` answers `offset`, or raises while offsets are unstable."""

    def __init__(self, offset: int, unstable: bool = False) -> None:
        self.offset, self.unstable = offset, unstable
        self.seeks: list[tuple[str, int, int]] = []

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.unstable:
            raise KafkaException(KafkaError(KafkaError.UNSTABLE_OFFSET_COMMIT))
        return [TopicPartition(tp.topic, tp.partition, self.offset) for tp in parts]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


def source(fake: FakeConsumer) -> KafkaSource:
    real = KafkaSource({"bootstrap.servers": "127.0.0.1:1"}, "g", "releases", Metrics(),
                       lambda gone: None, lambda gone: None)  # fmt: skip
    real.consumer.close()
    real.consumer = fake  # type: ignore[assignment]
    return real


def watch(src: KafkaSource, offset: int, lag: int, now: float) -> None:
    src._watch_position(KEY, offset, lag, now)


def test_a_partition_without_position_is_restarted_at_its_committed_offset() -> None:
    fake = FakeConsumer(offset=32)
    src = source(fake)
    watch(src, -1001, 70, now=100.0)
    watch(src, -1001, 70, now=100.0 + NO_POSITION_RESTART_S - 1)
    assert fake.seeks == []  # not yet: a fresh assignment takes a moment to fetch
    watch(src, -1001, 70, now=100.0 + NO_POSITION_RESTART_S)
    assert fake.seeks == [("releases", 0, 32)]


def test_no_restart_while_fetching_paused_or_caught_up() -> None:
    fake = FakeConsumer(offset=32)
    src = source(fake)
    for t in range(0, 200, 5):
        watch(src, 40 + t, 10, now=float(t))  # a position: it is fetching
        watch(src, -1001, 0, now=float(t))  # nothing to read
    src.paused = True  # backpressure: not fetching on purpose
    for t in range(200, 400, 5):
        watch(src, -1001, 10, now=float(t))
    assert fake.seeks == []


def test_unstable_offsets_are_retried_later_and_no_committed_offset_means_beginning() -> None:
    fake = FakeConsumer(offset=-1001, unstable=True)
    src = source(fake)
    watch(src, -1001, 5, now=0.0)
    watch(src, -1001, 5, now=NO_POSITION_RESTART_S)
    assert fake.seeks == []
    fake.unstable = False
    watch(src, -1001, 5, now=NO_POSITION_RESTART_S + 5)
    assert fake.seeks == [("releases", 0, OFFSET_BEGINNING)]


class Positions(FakeConsumer):
    """Every partition's position is 10."""

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 10) for tp in parts]


class FakeEnds:
    """EndOffsets without brokers: each query answers ``value`` per partition once
    ``answered``, or fails while ``away``."""

    def __init__(self, value: int = 15) -> None:
        self.value = value
        self.asked: list[Any] = []
        self.answered = True
        self.away = False

    @property
    def pending(self) -> bool:
        return bool(self.asked)

    def ask(self, partitions: Any) -> None:
        self.asked = sorted(partitions)

    def ready(self) -> bool:
        return self.answered

    def take(self, timeout: float | None = None) -> dict[tuple[str, int], int]:
        asked, self.asked = self.asked, []
        if self.away:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Local: Timed out"))
        return dict.fromkeys(asked, self.value)


def lag_source() -> tuple[KafkaSource, FakeEnds]:
    src = source(Positions(offset=0))
    src.ends = FakeEnds()  # type: ignore[assignment]
    src.assignment = {KEY}
    return src, src.ends  # type: ignore[return-value]


def lag_of(src: KafkaSource) -> float | None:
    labels = {"topic": "releases", "partition": "0"}
    return src.metrics.registry.get_sample_value("popscore_consumer_lag", labels)


def test_a_failed_lag_query_marks_kafka_unreachable_until_it_answers_again() -> None:
    src, ends = lag_source()
    ends.away = True
    src.refresh_lag(force=True)  # no exception: the main loop goes on
    assert src.kafka_problem is not None and "Timed out" in src.kafka_problem
    ends.away = False
    src.refresh_lag(force=True)
    assert src.kafka_problem is None
    assert lag_of(src) == 5 and src.remaining == 5


def test_the_lag_query_never_holds_the_poll_loop() -> None:
    """The loop asks, goes on polling, and applies the answers on a later pass once they are in
    (a blocking query stopped the loop for seconds at 8 partitions)."""
    src, ends = lag_source()
    ends.answered = False
    src.refresh_lag()
    assert ends.pending and lag_of(src) is None, "asked, nothing waited for"
    src.refresh_lag()
    assert ends.pending and lag_of(src) is None, "not answered yet: still nothing applied"
    ends.answered = True
    src.refresh_lag()
    assert lag_of(src) == 5 and not ends.pending, "applied, and no new query before its time"


def test_answers_for_a_partition_revoked_meanwhile_are_dropped() -> None:
    src, ends = lag_source()
    ends.answered = False
    src.refresh_lag()
    src.assignment = set()
    ends.answered = True
    src.refresh_lag()
    assert lag_of(src) is None and src.remaining == 0


def test_all_brokers_down_marks_kafka_unreachable() -> None:
    """A real librdkafka consumer with nothing listening: error_cb reports all brokers down."""
    src = KafkaSource({"bootstrap.servers": "127.0.0.1:1"}, "g", "releases", Metrics(),
                      lambda gone: None, lambda gone: None)  # fmt: skip
    try:
        for _ in range(20):
            if src.kafka_problem:
                break
            assert src.fetch(10, 0.5) == []
        assert src.kafka_problem is not None and "brokers are down" in src.kafka_problem
    finally:
        src.consumer.close()


class Assigner(FakeConsumer):
    """Records what the assign callback asks of the consumer."""

    def __init__(self) -> None:
        super().__init__(offset=0)
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def _record(self, what: str, parts: list[TopicPartition]) -> None:
        self.calls.append((what, [(tp.topic, tp.partition) for tp in parts]))

    def incremental_assign(self, parts: list[TopicPartition]) -> None:
        self._record("assign", parts)

    def pause(self, parts: list[TopicPartition]) -> None:
        self._record("pause", parts)

    def resume(self, parts: list[TopicPartition]) -> None:
        self._record("resume", parts)


def test_a_partition_is_paused_only_once_it_has_handed_out_a_record() -> None:
    """librdkafka 2.16: a partition paused and resumed while it still looks up where to start
    (auto.offset.reset) re-arms a 500 ms offset query that later restarts it at its beginning,
    and the records came again. So backpressure pauses a partition only after its first record,
    and an assignment clears a pause librdkafka kept across revoke and reassignment (it is
    kept, confluent-kafka-go#193), whatever the loop's state."""
    fake = Assigner()
    src = source(fake)
    parts = [TopicPartition("releases", 1)]
    src._on_assign(fake, parts)  # type: ignore[arg-type]
    src.pause()  # the loop is full: the new partition has no position yet, so it fetches on
    src._on_assign(fake, parts)  # type: ignore[arg-type]
    src._handed_out(("releases", 1), 0)  # its first record
    src.pause()
    src.pause()  # once
    src.resume()
    src.pause()
    src._leave(parts, lambda gone: None, "revoked")  # paused by us: resumed as it goes
    assert fake.calls == [
        ("assign", [("releases", 1)]),
        ("resume", [("releases", 1)]),
        ("assign", [("releases", 1)]),
        ("resume", [("releases", 1)]),
        ("pause", [("releases", 1)]),
        ("resume", [("releases", 1)]),
        ("pause", [("releases", 1)]),
        ("resume", [("releases", 1)]),
    ]
    assert not src._paused_here


class RewindConsumer(FakeConsumer):
    def committed(self, parts: list[TopicPartition], timeout: float) -> list[Any]:
        # Behind a rejoin in progress this waited for the whole group and timed out, which
        # stopped the process: the rewind must not ask.
        raise AssertionError("the rewind asked the broker")


def test_rewind_goes_to_the_offset_this_member_committed() -> None:
    fake = RewindConsumer(offset=0)
    src = source(fake)
    src.assignment = {KEY}
    src._first_read[KEY] = 17
    src.mark_committed([TopicPartition("releases", 0, 32), TopicPartition("releases", 5, 9)])
    src.rewind()
    assert fake.seeks == [("releases", 0, 32)], "only partitions it holds"


def test_rewind_without_a_commit_goes_back_to_the_first_record_read_not_the_beginning() -> None:
    """The first record read since the assignment is where the group's committed offset (or,
    with nothing committed, auto.offset.reset) started it; with auto.offset.reset=latest a new
    group starts at the end: seeking to the beginning after an abort would score the
    partition's whole history."""
    fake = RewindConsumer(offset=0)
    src = source(fake)
    src.assignment = {KEY}
    src._first_read[KEY] = 17
    src.rewind()
    assert fake.seeks == [("releases", 0, 17)]
    fake.seeks.clear()
    src._first_read.clear()  # nothing read yet: nothing to rewind
    src.rewind()
    assert fake.seeks == []


def test_a_partition_given_back_forgets_what_this_member_committed() -> None:
    fake = RewindConsumer(offset=0)
    src = source(fake)
    src.assignment = {KEY}
    src.mark_committed([TopicPartition("releases", 0, 32)])
    src._leave([TopicPartition("releases", 0)], lambda gone: None, "revoked")
    src.assignment = {KEY}  # assigned again: another member may have committed since
    src._first_read[KEY] = 40
    src.rewind()
    assert fake.seeks == [("releases", 0, 40)]


def test_a_partition_the_rewind_does_not_seek_stays_at_its_end() -> None:
    """librdkafka reports a partition's end again only after a seek: forgetting it here left an
    idle consumer waiting for ever (stop-at-end never stopped, /healthz called it stuck)."""
    fake = RewindConsumer(offset=-1001)
    src = source(fake)
    src.assignment = {KEY}
    src._at_end = {KEY}
    src.rewind()
    assert fake.seeks == [] and src.caught_up()


class DeliveringConsumer(RewindConsumer):
    """Hands out queued batches of offsets of partition 0, as consume() would."""

    def __init__(self, batches: list[list[int]]) -> None:
        super().__init__(offset=0)
        self.batches = batches

    def consume(self, n: int, timeout: float) -> list[Message]:
        offsets = self.batches.pop(0) if self.batches else []
        return [Message(topic="releases", partition=0, offset=o, value=b"{}") for o in offsets]


def test_records_the_client_hands_out_again_are_dropped() -> None:
    """librdkafka restarted a partition's fetch from an earlier offset by itself (seen in the
    chaos scenario (g), under load): the records came again and were committed twice. What
    was handed out already is dropped; a rewind of ours is followed."""
    fake = DeliveringConsumer([[0, 1, 2], [0, 1, 2, 3, 4], [5], [2, 3], [9]])
    src = source(fake)
    src.assignment = {KEY}
    handed = [[m.offset() for m in src.fetch(10, 0.0)] for _ in range(3)]
    assert handed == [[0, 1, 2], [3, 4], [5]]
    assert src.metrics.registry.get_sample_value("popscore_records_redelivered_total") == 3.0
    src.mark_committed([TopicPartition("releases", 0, 2)])
    src.rewind()  # ours: back to 2, which comes again and is taken
    assert [m.offset() for m in src.fetch(10, 0.0)] == [2, 3]
    src._leave([TopicPartition("releases", 0)], lambda gone: None, "revoked")
    src.assignment = {KEY}  # assigned again: whatever comes is taken
    assert [m.offset() for m in src.fetch(10, 0.0)] == [9]
