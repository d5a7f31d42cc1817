"""Liveness: the main loop iterates, and records in hand get committed while Kafka and Redis
answer (an abort loop or a wedged stage restarts the pod; a dependency outage does not)."""

from consumer import health
from consumer.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(waiting: bool, ready: bool) -> tuple[Health, Clock]:
    clock = Clock()
    h = Health(clock)
    h.waiting = lambda: waiting
    h.readiness = lambda: (ready, "ready" if ready else "redis unreachable: down")
    return h, clock


def test_records_waiting_uncommitted_with_the_dependencies_up_is_stuck() -> None:
    h, clock = make(waiting=True, ready=True)
    clock.now += health.STUCK_S - 1
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
    clock.now += 10 * health.STUCK_S
    h.beat()
    assert h.alive(), "readiness reports the outage; restarting would not help"


def test_idle_is_not_stuck() -> None:
    h, clock = make(waiting=False, ready=True)
    clock.now += 10 * health.STUCK_S
    h.beat()
    assert h.alive()


def test_a_loop_that_stops_beating_is_dead() -> None:
    h, clock = make(waiting=False, ready=True)
    clock.now += health.STALL_S
    assert h.liveness() == (False, "main loop stalled")
