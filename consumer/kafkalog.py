"""librdkafka's log lines through Python logging, with repeats folded.

While a broker is down librdkafka logs a FAIL line for every connection attempt: measured
~20 lines a second per client here (964 lines for a 50 s outage), which buries everything
else. The first line of a kind goes out; repeats within ``window_s`` are counted, and the
next one after the window says how many were folded.
"""

import logging
import re
import threading
import time
from collections import OrderedDict

WINDOW_S = 30.0
MAX_KINDS = 1000  # kinds of line remembered; the least recently seen is forgotten first
# Parts of a line that change between otherwise identical repeats.
_VOLATILE = re.compile(r"\d+ms|\d+ ms")


class FoldRepeats(logging.Filter):
    """Passes a record unless an identical one (timings aside) passed within ``window_s``."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()  # librdkafka logs from its own threads

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _VOLATILE.sub("N ms", record.getMessage()))
        now = time.monotonic()
        with self._lock:
            last, folded = self._seen.pop(key, (-self.window_s, 0))  # re-added as the newest
            if now - last < self.window_s:
                self._seen[key] = (last, folded + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > MAX_KINDS:  # O(1): many distinct lines (debug logging)
                self._seen.popitem(last=False)
        if folded:
            record.msg = (
                f"{record.getMessage()} (and {folded} more like it in {self.window_s:.0f} s)"
            )
            record.args = None
        return True


_lock = threading.Lock()


def librdkafka_logger(kind: str) -> logging.Logger:
    """The logger a librdkafka client of ``kind`` (consumer, producer) writes to."""
    logger = logging.getLogger(f"librdkafka.{kind}")
    with _lock:
        if not any(isinstance(f, FoldRepeats) for f in logger.filters):
            logger.addFilter(FoldRepeats())
    return logger
