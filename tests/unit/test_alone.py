"""The main loop's side of the crash journal: suspects one at a time with nothing else in
flight, the records after them together, a suspect whose tries are spent dead-lettered.
(The journal itself is tested on a real Redis: tests/integration/test_crash_guard.py.)"""

import time
from collections.abc import Sequence
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Message

from consumer import commit
from consumer.app import App, InFlight
from consumer.commit import TransactionAborted
from consumer.crashguard import Alone
from consumer.errors import DeadLetter, DeviceFailure
from consumer.pipeline import BatchResult
from schemas.dead_letter import DeadLetterReason
from tests.unit.test_poll import FakeSource, app_with


class FakeGuard:
    """Suspects by offset; ``spent`` ones are dead-lettered."""

    def __init__(self, suspects: set[int], spent: frozenset[int] = frozenset()) -> None:
        self.suspected = suspects
        self.spent = spent
        self.blamed = 0
        self.drops: list[Future[Any]] = []
        self.tidied: list[Future[Any]] = []

    def suspects(self, messages: Sequence[Message]) -> bool:
        return any(self.suspect(msg) for msg in messages)

    def suspect(self, msg: Message) -> bool:
        return msg.offset() in self.suspected

    def blame(self) -> None:
        self.blamed += 1

    def dropped(self, future: Future[Any]) -> None:
        self.drops.append(future)

    def tidy(self) -> None:
        self.tidied = [future for future in self.drops if future.done()]

    def dropped_running(self) -> bool:
        return not all(future.done() for future in self.drops)

    def verdict(self, msg: Message) -> DeadLetter | Alone:
        if msg.offset() in self.spent:
            return DeadLetter(DeadLetterReason.PROCESS_CRASHED, "died on 2 tries")
        return Alone("0:alone", f"{msg.offset()}:1", "")


class MessageSource(FakeSource):
    def fetch(self, n: int, timeout: float) -> list[Any]:
        offsets = super().fetch(n, timeout)
        return [Message(topic="releases", partition=0, offset=o, value=b"{}") for o in offsets]


def loop_with(
    suspects: set[int], spent: frozenset[int] = frozenset(), queued: int = 4
) -> tuple[App, list[Any]]:
    app, _ = app_with(MessageSource(queued=queued), inflight=0)
    app.guard = FakeGuard(suspects, spent)  # type: ignore[assignment]
    app.scorer = SimpleNamespace(meta=SimpleNamespace(model_version="v1"))  # type: ignore[assignment]
    submitted: list[Any] = []

    def submit(messages: list[Message], alone: Alone | None = None) -> None:
        submitted.append(([m.offset() for m in messages], alone))
        app.inflight.append(InFlight(messages, Future(), alone=alone is not None))

    app._submit = submit  # type: ignore[method-assign]
    return app, submitted


def finish_head(app: App) -> None:
    app.inflight.popleft()  # committed


def test_suspects_go_one_at_a_time_then_the_rest_together() -> None:
    app, submitted = loop_with(suspects={0, 1})
    app._poll()  # takes the batch 0-3: it holds suspects, so nothing is submitted yet
    assert submitted == [] and len(app._alone) == 4
    assert app._slots_taken() == app.settings.max_inflight_batches  # the next batch waits
    app._next_alone()
    assert submitted == [([0], Alone("0:alone", "0:1", ""))]
    app._next_alone()  # 0 is in flight: 1 waits
    assert len(submitted) == 1
    finish_head(app)
    app._next_alone()
    assert submitted[-1] == ([1], Alone("0:alone", "1:1", ""))
    finish_head(app)
    app._next_alone()
    assert submitted[-1] == ([2, 3], None)  # past the suspects: one batch
    assert not app._alone and app._slots_taken() == 1


def test_nothing_runs_beside_a_record_alone_until_it_is_committed() -> None:
    """A death while a record is alone is counted against it: the records after it, and the
    next batch, wait for its commit (they used to go beside it, and a poison among them got
    an innocent suspect dead-lettered)."""
    app, submitted = loop_with(suspects={0, 1}, queued=8)
    app._poll()
    app._next_alone()
    finish_head(app)
    app._next_alone()  # 1 alone, the last suspect
    app._next_alone()  # 2-3 wait for it
    app._poll()  # 4-7 fill the next batch, and wait too
    assert [offsets for offsets, _alone in submitted] == [[0], [1]]
    assert app._slots_taken() == app.settings.max_inflight_batches
    finish_head(app)
    app._next_alone()
    assert submitted[-1] == ([2, 3], None)
    app._poll()
    assert submitted[-1] == ([4, 5, 6, 7], None)


def test_the_next_batch_waits_for_the_last_record_alone() -> None:
    app, submitted = loop_with(suspects={3}, queued=8)
    app._poll()  # 0-3: 0-2 go together, then 3 alone
    app._next_alone()
    finish_head(app)
    app._next_alone()
    assert [offsets for offsets, _alone in submitted] == [[0, 1, 2], [3]]
    assert not app._alone  # nothing waits to go alone, but 3 is in flight:
    app._poll()
    app._poll()
    assert len(submitted) == 2 and len(app.inflight) == 1
    finish_head(app)
    app._poll()
    assert submitted[-1] == ([4, 5, 6, 7], None)


def test_a_suspect_waits_for_dropped_batches_still_running() -> None:
    app, submitted = loop_with(suspects={0})
    running: Future[Any] = Future()
    app._orphans.append(running)
    app._poll()
    app._next_alone()
    assert submitted == []  # a dropped batch may still be decoding: not alone yet
    running.set_result(None)
    app._next_alone()
    assert submitted == [([0], Alone("0:alone", "0:1", ""))]


def test_a_spent_suspect_is_dead_lettered_unprocessed() -> None:
    app, submitted = loop_with(suspects={0}, spent=frozenset({0}))
    app._poll()
    app._next_alone()
    assert submitted == []
    (item,) = app.inflight
    result = item.future.result()
    assert [m.offset() for m in result.messages] == [0]
    (rejected,) = result.rejected
    assert rejected.error.reason is DeadLetterReason.PROCESS_CRASHED
    assert result.model_version == "v1" and not item.alone


def test_a_drop_forgets_the_records_waiting_to_go_alone() -> None:
    app, submitted = loop_with(suspects={0, 1})
    app._poll()
    app._next_alone()
    app._drop_uncommitted()
    assert not app._alone and not app.inflight and app._needs_rewind
    assert len(app._orphans) == 1  # the suspect in flight may still run
    assert app.guard.drops == app._orphans  # type: ignore[attr-defined]  # its try: taken back
    app._next_alone()
    assert len(submitted) == 1


@pytest.mark.parametrize("alone", [True, False])
def test_a_device_failure_with_a_record_alone_counts_its_try(alone: bool) -> None:
    app, _ = loop_with(suspects=set())
    failed: Future[Any] = Future()
    failed.set_exception(DeviceFailure("CUDA error: device-side assert triggered"))
    app.inflight.append(InFlight([], failed, alone=alone))
    with pytest.raises(DeviceFailure):
        app._commit_finished()
    assert app.guard.blamed == int(alone)  # type: ignore[attr-defined]


def test_a_wedged_kafka_call_takes_the_try_back_before_it_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog's exit is no record's doing: the journal's take-back runs first, and a
    take-back that hangs (Redis gone too) does not hold the exit."""
    exits: list[int] = []
    monkeypatch.setattr("consumer.commit.os._exit", exits.append)
    monkeypatch.setattr("consumer.commit.logging.shutdown", lambda: None)
    taken_back: list[bool] = []
    commit._exit_wedged("commit_transaction", 75.0, lambda: taken_back.append(True))
    assert taken_back == [True] and exits == [commit.EXIT_WEDGED]
    monkeypatch.setattr(commit, "WEDGED_HOOK_S", 0.05)
    start = time.monotonic()
    commit._exit_wedged("commit_transaction", 75.0, lambda: time.sleep(5))
    assert exits == [commit.EXIT_WEDGED] * 2 and time.monotonic() - start < 2


def test_a_batch_waits_for_a_dropped_record_alone_still_running() -> None:
    """A partition lost while a record of it is alone: its batch is dropped but may still
    run, and a death meanwhile counts against it; so nothing goes beside it, and its try is
    taken back only once it is done (before any new try: the same record's would write the
    same journal value)."""
    app, submitted = loop_with(suspects={0}, queued=8)
    app._poll()
    app._next_alone()
    app._drop_uncommitted()
    app._needs_rewind = False
    guard: Any = app.guard
    guard.suspected = set()  # what is read next is no suspect
    app._poll()  # 4-7: a full batch
    app._next_alone()
    assert [offsets for offsets, _alone in submitted] == [[0]]
    assert app._slots_taken() == app.settings.max_inflight_batches
    assert guard.tidied == []  # not while it runs
    guard.drops[0].set_result(None)
    app._next_alone()
    assert guard.tidied == guard.drops
    app._poll()
    assert submitted[-1] == ([4, 5, 6, 7], None)


def test_an_aborted_transaction_of_a_record_alone_takes_its_try_back() -> None:
    app, _ = loop_with(suspects=set())
    msg = Message(topic="releases", partition=0, offset=0, value=b"{}")
    done: Future[Any] = Future()
    done.set_result(BatchResult([msg], "v1"))
    app.inflight.append(InFlight([msg], done, alone=True))

    def abort(*_args: Any) -> float:
        raise TransactionAborted("the coordinator moved")

    app.txn = SimpleNamespace(commit=abort)  # type: ignore[assignment]
    app.source.group_metadata = lambda: None  # type: ignore[method-assign]
    app._commit_finished()
    assert app.guard.drops == [done] and app._needs_rewind  # type: ignore[attr-defined]
