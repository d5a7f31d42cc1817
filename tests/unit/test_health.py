"""Liveness: the main loop iterates, and records in hand get committed while Kafka and Redis
answer (an abort loop or a wedged stage restarts the pod; a dependency outage does not)."""

import threading
import time

from consumer import health
from consumer.app import stuck_after
from consumer.health import BackgroundCheck, Health
from consumer.settings import Settings

STUCK = 400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(waiting: bool, ready: bool) -> tuple[Health, Clock]:
    clock = Clock()
    h = Health(clock, STUCK)
    h.started = True
    h.waiting = lambda: waiting
    h.readiness = lambda: (ready, "ready" if ready else "redis unreachable: down")
    return h, clock


def test_records_waiting_uncommitted_with_the_dependencies_up_is_stuck() -> None:
    h, clock = make(waiting=True, ready=True)
    clock.now += STUCK - 1
    h.beat()
    assert h.liveness() == (True, "ok")
    clock.now += 2
    h.beat()
    ok, why = h.liveness()
    assert not ok and why.startswith("nothing committed for") and "records wait" in why
    h.progressed()  # a commit
    assert h.alive()


def test_a_dependency_outage_is_not_stuck() -> None:
    h, clock = make(waiting=True, ready=False)
    clock.now += 10 * STUCK
    h.beat()
    assert h.alive(), "readiness reports the outage; restarting would not help"


def test_idle_is_not_stuck() -> None:
    h, clock = make(waiting=False, ready=True)
    clock.now += 10 * STUCK
    h.beat()
    assert h.alive()


def test_a_loop_that_stops_beating_is_dead() -> None:
    h, clock = make(waiting=False, ready=True)
    clock.now += health.STALL_S
    assert h.liveness() == (False, "main loop stalled")


def test_stuck_allows_twice_the_slowest_legitimate_batch() -> None:
    """Every event's fetch running to its deadline after a slow DNS lookup, the batch shared by
    the decode workers, twice over, plus the grace: 2 x 8 x (1.25 x 15 + 10) + 30 = 490 s."""
    assert stuck_after(Settings()) == 490.0
    slow = Settings(audio_fetch_timeout_s=60, batch_size=64, decode_workers=2)
    assert stuck_after(slow) == 2 * 32 * (75 + 10) + 30
    assert stuck_after(Settings(batch_size=1, audio_fetch_timeout_s=1)) == health.STUCK_S


def test_until_start_up_is_over_the_probes_hear_starting() -> None:
    """The port is served from the first moment of start-up: a startup probe must keep
    waiting (503) through a model load or warm-up longer than the stall limit."""
    clock = Clock()
    h = Health(clock, STUCK)
    clock.now += 2 * health.STALL_S
    assert h.liveness() == (False, "starting")
    assert h.readiness() == (False, "starting")
    h.beat()
    h.started = True
    assert h.liveness() == (True, "ok")


def test_a_check_that_hangs_is_reported_without_waiting_for_it() -> None:
    """The probes read the background check's last answer: a Redis that never answers made
    every probe time out (liveness too, which would restart every pod at once)."""
    clock, release, answered = Clock(), threading.Event(), threading.Event()

    def check() -> str | None:
        answered.set()
        release.wait(10)
        return None

    probe = BackgroundCheck(check, every_s=0.01, stale_s=15.0, clock=clock).start()
    try:
        assert answered.wait(5)
        assert probe.problem() == "not checked yet"  # the first check is still out
        clock.now += 16
        started = time.monotonic()
        assert probe.problem() == "no answer for 16 s"
        assert time.monotonic() - started < 0.1
        release.set()
        deadline = time.monotonic() + 5
        while probe.problem() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert probe.problem() is None
    finally:
        release.set()
        probe.close()


def test_a_check_that_raises_is_a_problem_not_a_dead_thread() -> None:
    raised, release = threading.Event(), threading.Event()

    def check() -> str | None:
        if not raised.is_set():
            raised.set()
            raise RuntimeError("boom")
        release.wait(10)  # the second check: answers once the test has looked
        return None

    probe = BackgroundCheck(check, every_s=0.01).start()
    try:
        assert raised.wait(5)
        deadline = time.monotonic() + 5
        while probe.problem() == "not checked yet" and time.monotonic() < deadline:
            time.sleep(0.001)
        assert probe.problem() == "check failed: boom"
        release.set()
        while probe.problem() is not None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert probe.problem() is None, "the thread lives on and checks again"
    finally:
        release.set()
        probe.close()


def test_the_view_watch_never_fails_a_batch() -> None:
    """It runs in the sink stage after a successful write: an exception there failed the
    batch and stopped the process (RedisClusterException is no RedisError)."""
    from prometheus_client import CollectorRegistry, Gauge
    from redis.exceptions import RedisClusterException

    from consumer import rollout

    class Down:
        def get(self, _key: str) -> None:
            raise RedisClusterException("Redis Cluster cannot be connected")

    registry = CollectorRegistry()
    watch = rollout.ViewWatch(Down(), Gauge("fed", "t", registry=registry), live=True)  # type: ignore[arg-type]
    watch.check("model-a", None)
    assert watch.fed is None and registry.get_sample_value("fed") == 0, "nothing known yet"
