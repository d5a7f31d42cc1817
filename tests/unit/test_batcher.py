"""MicroBatcher: max size, max wait from the first item, non-blocking accumulation."""

import pytest

from consumer.batcher import MicroBatcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_empty_batcher_is_not_ready_and_polls_for_idle() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(4, 0.25, FakeClock())
    assert not batcher.ready() and len(batcher) == 0
    assert batcher.wait_left(0.5) == 0.5


def test_full_batch_is_ready_at_once() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(4, 10.0, FakeClock())
    batcher.add([1, 2])
    assert not batcher.ready() and batcher.room() == 2
    batcher.add([3, 4])
    assert batcher.ready()
    assert batcher.take() == [1, 2, 3, 4] and len(batcher) == 0


def test_partial_batch_is_ready_after_max_wait_from_its_first_item() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[int] = MicroBatcher(8, 0.25, clock)
    clock.now = 5.0
    batcher.add([1])
    clock.now = 5.2
    batcher.add([2])  # later items do not extend the wait
    assert not batcher.ready()
    assert batcher.wait_left(1.0) == pytest.approx(0.05)
    clock.now = 5.25
    assert batcher.ready() and batcher.wait_left(1.0) == 0.0


def test_next_batch_starts_a_new_wait() -> None:
    clock = FakeClock()
    batcher: MicroBatcher[int] = MicroBatcher(8, 0.25, clock)
    batcher.add([1])
    clock.now = 1.0
    assert batcher.take() == [1]
    batcher.add([2])
    assert not batcher.ready()


def test_zero_wait_is_ready_with_one_item() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(8, 0.0, FakeClock())
    batcher.add([1])
    assert batcher.ready()


def test_discard_drops_items_of_revoked_partitions() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(8, 1.0, FakeClock())
    batcher.add([1, 2, 3, 4])
    assert batcher.discard(lambda x: x % 2 == 0) == 2
    assert batcher.take() == [2, 4]


@pytest.mark.parametrize(("size", "wait"), [(0, 1.0), (1, -0.1)])
def test_bad_arguments_are_rejected(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(size, wait)
