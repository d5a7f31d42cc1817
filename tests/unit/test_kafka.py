"""Folding librdkafka's repeated log lines (no broker needed)."""

import logging
import time

import pytest

from consumer.kafka import MAX_KINDS, FoldRepeats, delete_topics, librdkafka_logger


def record(msg: str, name: str = "librdkafka.consumer") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)


def test_repeats_are_folded_then_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("consumer.kafka.time.monotonic", lambda: clock[0])
    fold = FoldRepeats(window_s=30)
    line = "FAIL [thrd:localhost:9092/bootstrap]: Connect failed: Connection refused (after {}ms)"
    assert fold.filter(record(line.format(0)))
    for ms in range(1, 500):  # 20 a second for 25 s, timings differ
        clock[0] += 0.05
        assert not fold.filter(record(line.format(ms % 3)))
    assert fold.filter(record("a different line"))
    clock[0] = 131.0
    last = record(line.format(1))
    assert fold.filter(last)
    assert last.getMessage().endswith("(and 499 more like it in 30 s)")


def test_the_same_line_from_another_client_is_not_folded() -> None:
    fold = FoldRepeats()
    assert fold.filter(record("x", "librdkafka.consumer"))
    assert fold.filter(record("x", "librdkafka.producer"))
    assert not fold.filter(record("x", "librdkafka.producer"))


def test_the_filter_is_attached_once() -> None:
    logger = librdkafka_logger("consumer")
    assert librdkafka_logger("consumer") is logger
    assert sum(isinstance(f, FoldRepeats) for f in logger.filters) == 1


def test_many_distinct_lines_stay_cheap_and_bounded() -> None:
    """librdkafka debug logging: every line differs; memory stays bounded, cost O(1)."""
    fold = FoldRepeats()
    start = time.perf_counter()
    assert all(fold.filter(record(f"debug line {i} offset {i * 7}")) for i in range(20_000))
    assert time.perf_counter() - start < 2.0  # ~0.1 s; the old pruning took ~18 s here
    assert len(fold._seen) == MAX_KINDS


@pytest.mark.parametrize("tag", ["", "short", "__consumer_offsets"])
def test_delete_topics_refuses_a_tag_that_could_take_others(tag: str) -> None:
    # Refused before any client exists: no broker at this address is ever asked.
    with pytest.raises(ValueError, match="tag"):
        delete_topics({"bootstrap.servers": "127.0.0.1:1"}, tag)
