"""Micro-batching: two numbers, max size and max wait (after MLServer's adaptive batching).

The wait starts when the first item arrives, so ``max_wait`` bounds how long any event waits
for companions; an idle stream costs one ``idle_timeout`` poll and returns an empty batch.
"""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
Fetch = Callable[[int, float], list[T]]


class MicroBatcher:
    """Collects up to ``max_size`` items, waiting at most ``max_wait_s`` after the first."""

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

    def collect(self, fetch: "Fetch[T]", idle_timeout: float) -> list[T]:
        """``fetch(n, timeout)`` returns up to n items within timeout seconds."""
        items = fetch(self.max_size, idle_timeout)
        if not items:
            return items
        deadline = self._clock() + self.max_wait_s
        while len(items) < self.max_size:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            items.extend(fetch(self.max_size - len(items), remaining))
        return items
