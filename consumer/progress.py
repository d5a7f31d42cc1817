"""The ETA of reading the assigned partitions to their end (a backfill's progress metric)."""

import time
from collections import deque

WINDOW_S = 60.0


class Progress:
    """Committed records over the last WINDOW_S seconds, and the time the rest would take."""

    def __init__(self) -> None:
        self._commits: deque[tuple[float, int]] = deque()

    def committed(self, records: int, now: float | None = None) -> None:
        self._commits.append((time.monotonic() if now is None else now, records))

    def eta_s(self, remaining: float, now: float | None = None) -> float:
        """Seconds until ``remaining`` records are read at the window's rate; -1 when nothing
        was committed in the window (no rate to go by), 0 when nothing remains."""
        now = time.monotonic() if now is None else now
        while self._commits and self._commits[0][0] < now - WINDOW_S:
            self._commits.popleft()
        if remaining <= 0:
            return 0.0
        done = sum(records for _t, records in self._commits)
        if not done:
            return -1.0
        span = max(now - self._commits[0][0], 1.0)
        return remaining / (done / span)
