"""Micro-batching: two numbers, max size and max wait (after MLServer's adaptive batching).

The batcher only accumulates; the poll loop feeds it without blocking, so completed batches are
committed while the next one fills. The wait starts at the first item, so ``max_wait_s``
bounds how long any event waits for companions.
"""

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Accumulates items; ``ready()`` once ``max_size`` are in or ``max_wait_s`` has passed."""

    def __init__(
        self, max_size: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._deadline = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def room(self) -> int:
        """How many more items fit."""
        return self.max_size - len(self._items)

    def add(self, items: list[T]) -> None:
        """Append items; the first item of a batch starts its wait."""
        if items and not self._items:
            self._deadline = self._clock() + self.max_wait_s
        self._items.extend(items)

    def ready(self) -> bool:
        """Full, or non-empty and past the wait of its first item."""
        if not self._items:
            return False
        return len(self._items) >= self.max_size or self._clock() >= self._deadline

    def wait_left(self, idle: float) -> float:
        """Seconds a poll may block: until the deadline, or ``idle`` when empty."""
        if not self._items:
            return idle
        return max(0.0, min(idle, self._deadline - self._clock()))

    def take(self) -> list[T]:
        """Remove and return the batch."""
        items, self._items = self._items, []
        return items

    def discard(self, keep: Callable[[T], bool]) -> int:
        """Drop the items ``keep`` rejects (e.g. of revoked partitions); returns how many."""
        before = len(self._items)
        self._items = [item for item in self._items if keep(item)]
        return before - len(self._items)
