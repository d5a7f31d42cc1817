"""The main loop's poll step: backpressure only once the next batch is formed as well."""

from concurrent.futures import Future
from typing import Any

from consumer.app import BUSY_POLL_S, App, InFlight
from consumer.batcher import MicroBatcher
from consumer.crashguard import CrashGuard
from consumer.settings import Settings
from consumer.sinks import RedisSink


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
    app.guard = CrashGuard(None, "group", "releases", 0, RedisSink.retrying)  # off
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


def test_a_fetch_that_dropped_the_uncommitted_work_keeps_nothing() -> None:
    # A revoke inside consume() whose drain aborted: the partitions rewind to the committed
    # offsets, so what the same fetch returned comes again and must not be scored now too.
    source = FakeSource(queued=3)
    app, submitted = app_with(source, inflight=0, batch_size=3)
    fetch = source.fetch

    def fetch_with_a_drop(n: int, timeout: float) -> list[Any]:
        app._drop_uncommitted()
        return fetch(n, timeout)

    source.fetch = fetch_with_a_drop  # type: ignore[method-assign]
    app._poll()
    assert submitted == [] and len(app.batcher) == 0
    assert app._needs_rewind


def test_a_failed_batch_leaves_nothing_behind_it_to_commit() -> None:
    # The exception stops the process; the consumer's close then drains in its revoke, and a
    # later batch's offsets committed there would skip the failed batch's events for good.
    app, _ = app_with(FakeSource(queued=0), inflight=0)
    failed: Future[Any] = Future()
    failed.set_exception(RuntimeError("redis: READONLY"))
    done: Future[Any] = Future()
    done.set_result(None)
    app.inflight.extend([InFlight([], failed), InFlight([], done)])
    try:
        app._commit_finished()
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failed batch's exception was swallowed")
    assert not app.inflight and app._needs_rewind


def test_a_drain_timeout_stops_only_the_dropped_batches_redis_retries() -> None:
    app, _ = app_with(FakeSource(queued=0), inflight=1)  # a batch that never finishes
    dropped = app._stop_writes
    app._drain(0.0)
    assert dropped.is_set() and not app.inflight
    assert not app._stop_writes.is_set()  # batches after the rebalance still retry Redis
