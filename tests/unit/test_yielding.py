"""Unit tests of the backfill's lag gate (``consumer.yielding.LiveTraffic``) without brokers:
the live group's lag from its commits and the topic's end offsets, a gate that never waits on
the brokers after the first check, and a check that never answers given up."""

import logging
import time
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
    """The admin API's committed-offsets query: each answers ``commits`` at once, or never
    while ``silent``."""

    def __init__(self, commits: dict[int, int]) -> None:
        self.commits = commits
        self.silent = False
        self.asked = 0

    def list_consumer_group_offsets(self, request: Any, request_timeout: float) -> dict[str, Any]:
        self.asked += 1
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


def gate(commits: dict[int, int], max_lag: int = 10) -> tuple[LiveTraffic, FakeAdmin, FakeEnds]:
    admin, ends = FakeAdmin(commits), FakeEnds()  # FakeEnds: every end offset is 15
    live = LiveTraffic({}, GROUP, TOPIC, max_lag, admin=admin, ends=ends)  # type: ignore[arg-type]
    return live, admin, ends


def test_the_lag_is_known_at_start_from_commits_and_end_offsets(clock: Clock) -> None:
    live, _, _ = gate({0: 10, 1: 3})
    assert live.lag == (15 - 10) + (15 - 3)
    assert live.busy()


def test_a_check_is_asked_every_check_s_and_applied_once_answered(clock: Clock) -> None:
    live, admin, _ = gate({0: 10, 1: 3})
    asked = admin.asked
    assert live.busy() and admin.asked == asked  # not due yet
    admin.commits = {0: 15, 1: 14}  # live caught up
    clock.now += yielding.CHECK_S
    live.busy()  # asks
    assert admin.asked == asked + 1
    assert not live.busy()  # the answer is applied on the next call
    assert live.lag == 1


def test_the_gate_never_waits_for_an_answer_and_gives_up_on_a_silent_one(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    live, admin, _ = gate({0: 0})
    assert live.lag == 15
    admin.silent = True
    clock.now += yielding.CHECK_S
    started = time.perf_counter()
    for _ in range(50):
        assert live.busy()  # the last answer holds
    assert time.perf_counter() - started < 0.5  # no call waited
    assert admin.asked == 3  # two at start, one now: nothing asked while one is pending
    admin.silent = False
    admin.commits = {0: 15}
    clock.now += yielding.QUERY_TIMEOUT_S + 1.5
    with caplog.at_level(logging.WARNING):
        assert live.busy()  # gives the silent check up and asks again
    assert "live lag of group popscore unknown: no answer" in caplog.text
    assert not live.busy() and live.lag == 0


def test_a_failed_end_offset_query_keeps_the_last_lag(clock: Clock) -> None:
    live, _, ends = gate({0: 2})
    ends.away = True
    clock.now += yielding.CHECK_S
    live.busy()
    assert live.busy() and live.lag == 13


def test_a_group_without_commits_is_not_yielded_to(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        live, _, _ = gate({}, max_lag=0)
    assert not live.busy()
    assert caplog.text.count("has committed nothing on releases") == 1


def test_a_broker_error_on_the_commits_is_logged_not_raised(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    live, admin, _ = gate({0: 2})

    def fail(request: Any, request_timeout: float) -> dict[str, Any]:
        future: Future[Any] = Future()
        future.set_exception(KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down")))
        return {GROUP: future}

    admin.list_consumer_group_offsets = fail  # type: ignore[method-assign]
    clock.now += yielding.CHECK_S
    with caplog.at_level(logging.WARNING):
        live.busy()
        assert live.busy() and live.lag == 13
    assert "broker down" in caplog.text
