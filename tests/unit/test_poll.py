"""The main loop's poll step: backpressure only once the next batch is formed as well."""

from concurrent.futures import Future
from typing import Any

from consumer.app import BUSY_POLL_S, App, InFlight
from consumer.batcher import MicroBatcher
from consumer.settings import Settings


class FakeSource:
    """Hands out queued messages unless paused; records what the loop asked of it."""

    def __init__(self, queued: int) -> None:
        self.queued = list(range(queued))
        self.paused = False
        self.timeouts: list[float] = []

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def fetch(self, n: int, timeout: float) -> list[Any]:
        self.timeouts.append(timeout)
        if self.paused:
            return []
        out, self.queued = self.queued[:n], self.queued[n:]
        return out


def app_with(source: FakeSource, inflight: int, batch_size: int = 4) -> tuple[App, list[Any]]:
    app = App(Settings(max_inflight_batches=2, batch_size=batch_size))
    app.source = source  # type: ignore[assignment]
    app.batcher = MicroBatcher(batch_size, 0.25)
    app.inflight.extend(InFlight([], Future()) for _ in range(inflight))
    submitted: list[Any] = []
    app._submit = submitted.append  # type: ignore[method-assign,assignment]
    return app, submitted


def test_next_batch_fills_while_every_slot_is_busy() -> None:
    source = FakeSource(queued=3)
    app, submitted = app_with(source, inflight=2)
    app._poll()
    assert not source.paused
    assert len(app.batcher) == 3 and submitted == []
    assert source.timeouts == [BUSY_POLL_S]  # short: a slot may free any moment


def test_pauses_once_the_next_batch_is_full_too() -> None:
    source = FakeSource(queued=10)
    app, submitted = app_with(source, inflight=2)
    app._poll()  # fills the next batch
    app._poll()  # nothing more fits: pause, but keep polling
    assert source.paused
    assert source.timeouts == [BUSY_POLL_S, BUSY_POLL_S]  # still polling: callbacks are served
    assert len(app.batcher) == 4 and submitted == []
    app.inflight.popleft()  # the head batch was committed
    app._poll()
    assert not source.paused
    assert submitted == [[0, 1, 2, 3]]  # submitted at once, no wait for a resumed fetch


def test_submits_a_full_batch_when_a_slot_is_free() -> None:
    source = FakeSource(queued=5)
    app, submitted = app_with(source, inflight=1)
    app._poll()
    assert submitted == [[0, 1, 2, 3]] and not source.paused


def test_a_batch_past_its_wait_waits_for_a_free_slot() -> None:
    source = FakeSource(queued=2)
    app, submitted = app_with(source, inflight=2)
    app.batcher = MicroBatcher(4, 0.0)  # every batch is past its wait at once
    app._poll()
    assert submitted == [] and len(app.batcher) == 2
    assert source.timeouts == [BUSY_POLL_S]  # no zero-timeout spin while it waits
    app.inflight.popleft()
    app._poll()
    assert submitted == [[0, 1]]
