"""The soak: the real consumer at a steady offered rate for minutes, its RSS sampled throughout.

Memory that grows with the number of events scored (a cache without a bound, a list of every
latency, a leaked tensor per batch) shows as a positive slope once the warm-up is over; the
report gives the slope and the first and last minute's mean so a reader can judge both.
"""

import threading
import time
from pathlib import Path

from consumer.settings import Settings
from popscore.bench import e2e
from popscore.bench.stats import ModeResult
from schemas.events import ReleaseEvent

_STATUS = Path("/proc/self/status")
WARMUP_S = 60.0


def rss_mb() -> float:
    """Current resident set size of this process (VmRSS), MB; NaN where /proc is missing."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class RssSampler(threading.Thread):
    """Samples (seconds since start, RSS MB) every ``interval_s`` until stopped."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_mb()))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> list[tuple[float, float]]:
        """Stops sampling with one last sample; later calls change nothing, so a sample taken
        while the consumer shuts down (its buffers freed) cannot end the series."""
        if not self._stop_event.is_set():
            self._stop_event.set()
            self.join(timeout=self.interval_s + 1)
            self.samples.append((time.monotonic() - self._t0, rss_mb()))
        return self.samples


def trend(samples: list[tuple[float, float]], warmup_s: float = WARMUP_S) -> dict[str, float]:
    """RSS slope (MB per minute) after the warm-up, least squares and Theil-Sen; the first and
    last minute's means; the maximum."""
    steady = [(t, mb) for t, mb in samples if t >= warmup_s] or samples
    if len(steady) < 2:
        return {"rss_slope_mb_per_min": 0.0}
    ts = [t for t, _ in steady]
    mbs = [mb for _, mb in steady]
    mean_t, mean_mb = sum(ts) / len(ts), sum(mbs) / len(mbs)
    var = sum((t - mean_t) ** 2 for t in ts)
    cov = sum((t - mean_t) * (mb - mean_mb) for t, mb in steady)
    end = ts[-1]
    first = [mb for t, mb in steady if t < ts[0] + 60.0]
    last = [mb for t, mb in steady if t > end - 60.0]
    # Theil-Sen (the median of pairwise slopes): a one-off step (an allocator arena, a larger
    # buffer once) barely moves it, steady growth does; least squares is moved by both.
    pairwise = sorted((b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(steady)
                      for b in steady[i + 1 :] if b[0] > a[0])  # fmt: skip
    return {
        "rss_slope_mb_per_min": round(60.0 * cov / var, 3) if var > 0 else 0.0,
        "rss_slope_theil_sen_mb_per_min": round(60.0 * pairwise[len(pairwise) // 2], 3),
        "rss_first_minute_mb": round(sum(first) / len(first), 1),
        "rss_last_minute_mb": round(sum(last) / len(last), 1),
        "rss_max_mb": round(max(mb for _, mb in samples), 1),
        "warmup_s": warmup_s,
    }


def run(
    settings: Settings, events: list[ReleaseEvent], rate: float, interval_s: float = 5.0
) -> ModeResult:
    """``events`` at ``rate`` through the real consumer, RSS sampled all along."""
    sampler = RssSampler(interval_s)
    sampler.start()
    try:
        # Stopped the moment the last score is written, while the consumer still runs: a
        # sample after its shutdown once pulled the least-squares slope down by 40 %.
        result = e2e.run(settings, events, rate, "soak", timeout_s=600.0, on_done=sampler.stop)
    finally:
        samples = sampler.stop()
    result.notes.update(trend(samples))
    result.notes["rss_samples"] = [[round(t, 1), round(mb, 1)] for t, mb in samples]
    return result
