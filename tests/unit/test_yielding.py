"""Unit tests of the backfill's lag gate (``consumer.yielding.LiveTraffic``) without brokers:
the live group's lag from its commits and its partitions' log start and end, a gate that never
waits on the brokers after the first check, and failures that cost a check, never the loop."""

import logging
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer import yielding
from consumer.yielding import LiveTraffic
from tests.unit.test_source import FakeEnds

TOPIC, GROUP = "releases", "popscore"


class FakeAdmin:
    """The committed-offsets query: each answers ``commits`` at once, or never while
    ``silent``, or raises ``refuse`` when asked."""

    def __init__(self, commits: dict[int, int]) -> None:
        self.commits = commits
        self.silent = False
        self.refuse: Exception | None = None
        self.asked = 0

    def list_consumer_group_offsets(self, request: Any, request_timeout: float) -> dict[str, Any]:
        self.asked += 1
        if self.refuse is not None:
            raise self.refuse
        future: Future[Any] = Future()
        if not self.silent:
            parts = [TopicPartition(TOPIC, p, o) for p, o in self.commits.items()]
            parts.append(TopicPartition("other-topic", 0, 99))  # the group reads more topics
            future.set_result(SimpleNamespace(topic_partitions=parts))
        return {GROUP: future}

    def poll(self, timeout: float) -> int:
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(yielding, "time", fake)
    return fake


def gate(
    commits: dict[int, int], max_lag: int = 10, start: int = 0
) -> tuple[LiveTraffic, FakeAdmin, FakeEnds]:
    """A gate over ``commits``; every partition's log ends at 15 and starts at ``start``."""
    admin, ends = FakeAdmin(commits), FakeEnds(15)
    clients: Any = (admin, ends, FakeEnds(start))
    return LiveTraffic({}, GROUP, TOPIC, max_lag, clients), admin, ends


def check(live: LiveTraffic, clock: Clock) -> bool:
    """The next check, run to its end as the main loop would (a call per loop turn)."""
    clock.now += yielding.CHECK_S
    for _ in range(4):
        busy = live.busy()
    return busy


def test_the_lag_is_known_at_start_from_commits_and_log_ends(clock: Clock) -> None:
    live, _, _ = gate({0: 10, 1: 3})
    assert live.lag == (15 - 10) + (15 - 3)
    assert live.busy()


def test_a_check_is_asked_every_check_s_and_applied_when_done(clock: Clock) -> None:
    live, admin, _ = gate({0: 10, 1: 3})
    assert live.busy() and admin.asked == 1  # not due yet
    admin.commits = {0: 15, 1: 14}  # live caught up
    assert not check(live, clock)
    assert live.lag == 1 and admin.asked == 2


def test_commits_below_the_log_start_count_from_the_log_start(clock: Clock) -> None:
    """Retention removed records the group had not read: only what is left is its lag."""
    live, _, _ = gate({0: 2}, start=10)
    assert live.lag == 15 - 10


def test_a_new_partition_counts_in_the_check_that_sees_its_first_commit(clock: Clock) -> None:
    live, admin, _ = gate({0: 15})
    assert live.lag == 0
    admin.commits = {0: 15, 1: 0}
    assert check(live, clock) and live.lag == 15


def test_the_gate_never_waits_for_an_answer_and_gives_up_on_a_silent_one(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    live, admin, _ = gate({0: 0})
    assert live.lag == 15
    admin.silent = True
    clock.now += yielding.CHECK_S
    asked_at = clock.now
    for _ in range(50):
        assert live.busy()  # the last answer holds
    assert clock.now == asked_at  # no call slept
    assert admin.asked == 2  # one at start, one now: none while it is pending
    admin.silent = False
    admin.commits = {0: 15}
    clock.now += yielding.START_WAIT_S + 0.5
    with caplog.at_level(logging.WARNING):
        assert live.busy()  # gives the silent check up, asks again
    assert "live lag of group popscore unknown: no answer" in caplog.text
    assert not check(live, clock) and live.lag == 0


def test_a_failed_offset_query_keeps_the_last_lag(clock: Clock) -> None:
    live, _, ends = gate({0: 2})
    ends.away = True
    assert check(live, clock) and live.lag == 13


@pytest.mark.parametrize(
    ("fault", "text"),
    [
        (KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down")), "broker down"),
        (ValueError("bad request"), "bad request"),  # raised by the call itself
    ],
)
def test_a_failed_commit_query_is_logged_not_raised(
    clock: Clock, caplog: pytest.LogCaptureFixture, fault: Exception, text: str
) -> None:
    live, admin, _ = gate({0: 2})

    def fail(request: Any, request_timeout: float) -> dict[str, Any]:
        if isinstance(fault, ValueError):
            raise fault
        future: Future[Any] = Future()
        future.set_exception(fault)
        return {GROUP: future}

    admin.list_consumer_group_offsets = fail  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        assert check(live, clock) and live.lag == 13
    assert text in caplog.text


def test_a_failed_first_check_leaves_the_lag_unknown_until_the_next(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    admin, ends = FakeAdmin({0: 0}), FakeEnds(15)
    admin.refuse = KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))
    with caplog.at_level(logging.WARNING):
        live = LiveTraffic({}, GROUP, TOPIC, 10, (admin, ends, FakeEnds(0)))  # type: ignore[arg-type]
    assert live.lag == 0 and "all brokers down" in caplog.text
    admin.refuse = None
    assert check(live, clock) and live.lag == 15


def test_a_group_without_commits_is_not_yielded_to(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        live, _, _ = gate({}, max_lag=0)
        assert not check(live, clock)
    assert caplog.text.count("has committed nothing on releases") == 1
