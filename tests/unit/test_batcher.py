"""MicroBatcher: max size, max wait from the first item, empty when idle."""

import pytest

from consumer.batcher import MicroBatcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Feed:
    """Returns scripted chunks; each call advances the fake clock by its timeout or step."""

    def __init__(self, clock: FakeClock, chunks: list[list[int]], step: float = 0.01) -> None:
        self.clock, self.chunks, self.step = clock, chunks, step
        self.calls: list[tuple[int, float]] = []

    def __call__(self, n: int, timeout: float) -> list[int]:
        self.calls.append((n, timeout))
        if not self.chunks:
            self.clock.now += timeout
            return []
        self.clock.now += self.step
        return self.chunks.pop(0)[:n]


def test_full_batch_returns_without_waiting() -> None:
    clock = FakeClock()
    feed = Feed(clock, [[1, 2, 3, 4]])
    assert MicroBatcher(4, 1.0, clock).collect(feed, 0.5) == [1, 2, 3, 4]
    assert len(feed.calls) == 1


def test_fills_from_several_fetches_asking_only_for_the_rest() -> None:
    clock = FakeClock()
    feed = Feed(clock, [[1], [2, 3], [4, 5, 6]])
    assert MicroBatcher(4, 1.0, clock).collect(feed, 0.5) == [1, 2, 3, 4]
    assert [n for n, _ in feed.calls] == [4, 3, 1]


def test_partial_batch_returns_after_max_wait_from_first_item() -> None:
    clock = FakeClock()
    feed = Feed(clock, [[1, 2]])
    batch = MicroBatcher(8, 0.25, clock).collect(feed, 0.5)
    assert batch == [1, 2]
    assert clock.now == pytest.approx(0.01 + 0.25)


def test_idle_stream_returns_empty_after_idle_timeout() -> None:
    clock = FakeClock()
    feed = Feed(clock, [])
    assert MicroBatcher(8, 0.25, clock).collect(feed, 0.5) == []
    assert feed.calls == [(8, 0.5)]


def test_zero_wait_takes_what_the_first_fetch_gave() -> None:
    clock = FakeClock()
    feed = Feed(clock, [[1], [2]])
    assert MicroBatcher(8, 0.0, clock).collect(feed, 0.5) == [1]


@pytest.mark.parametrize(("size", "wait"), [(0, 1.0), (1, -0.1)])
def test_bad_arguments_are_rejected(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(size, wait)
