"""The transaction: scores and dead letters produced, and the input offsets committed, as one.

    begin → produce ScoreRecords + DLQ records → send_offsets_to_transaction → commit

Either all of it becomes visible to ``read_committed`` readers, or none of it does and the
batch is replayed. Redis was written (idempotently) before ``begin``, so a replay is invisible
downstream. Errors follow librdkafka's transaction error classes:
retriable → the same call again; abortable → abort, and the caller rewinds to the committed
offsets; fatal (e.g. fenced by a newer instance) → ``FatalKafkaError``, the process exits
non-zero and the orchestrator restarts it.
"""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from consumer.dead_letters import (
    Rejected,
    barest_dead_letter,
    dead_letter_forms,
    internal_error,
)
from consumer.errors import PopscoreError
from consumer.kafka import error_of, produce, transactional_config
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
TXN_TIMEOUT_S = 30.0
RETRIES = 5
WATCHDOG_MARGIN_S = 15.0
EXIT_WEDGED = 75  # EX_TEMPFAIL: restart me
WEDGED_HOOK_S = 3.0


class TransactionAborted(PopscoreError):
    """The batch's transaction was aborted; nothing of it is visible. Rewind and replay."""


class FatalKafkaError(PopscoreError):
    """The producer cannot continue (fenced, or a fatal broker error). Exit non-zero."""


class Transactions:
    """A transactional producer owned by the main thread (``transactional.id`` per instance)."""

    def __init__(
        self,
        config: dict[str, Any],
        transactional_id: str,
        results_topic: str,
        dlq_topic: str,
        shadow_topic: str | None = None,
        topic_limit: int | None = None,
    ) -> None:
        """``topic_limit``: the smallest max.message.bytes of the topics it writes."""
        self.producer = Producer(transactional_config(config, transactional_id, topic_limit))
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.shadow_topic = shadow_topic
        self.on_wedged: Callable[[], None] = lambda: None
        """Runs (for at most WEDGED_HOOK_S) before a wedged call exits the process."""
        # Fences an earlier process with the same id and aborts its open transaction at once.
        self._call("init_transactions", lambda: self.producer.init_transactions(TXN_TIMEOUT_S))

    def commit(
        self,
        scores: Sequence[ScoreRecord],
        dead_letters: Sequence[Rejected],
        offsets: list[TopicPartition],
        group_metadata: Any,
        shadow_scores: Sequence[ScoreRecord] = (),
    ) -> float:
        """Produce and commit one batch atomically, or raise TransactionAborted / Fatal.
        Returns the seconds spent on the records (queueing them, then waiting for their acks
        once the offsets are sent); the rest of the call is the commit protocol (offsets and
        the end-of-transaction markers)."""
        t0 = time.perf_counter()
        try:
            self.producer.begin_transaction()
            for record in scores:
                produce(
                    self.producer, self.results_topic, record.encode(), record.track_id.encode()
                )
            for record in shadow_scores:
                topic = cast(str, self.shadow_topic)
                produce(self.producer, topic, record.encode(), record.track_id.encode())
            for item in dead_letters:
                self._dead_letter(item)
            t1 = time.perf_counter()
            # The offsets go while the records are in flight; commit_transaction() would wait
            # for their acks anyway, so flushing first only splits the time into produce and
            # commit (popscore_stage_seconds) without serialising the two.
            self._call(
                "send_offsets_to_transaction",
                lambda: self.producer.send_offsets_to_transaction(
                    offsets, group_metadata, TXN_TIMEOUT_S
                ),
            )
            t2 = time.perf_counter()
            if (unsent := self.producer.flush(TXN_TIMEOUT_S)) > 0:  # abort, as commit would
                detail = f"{unsent} records unacknowledged after {TXN_TIMEOUT_S} s"
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, detail))
            t3 = time.perf_counter()
            self._call(
                "commit_transaction", lambda: self.producer.commit_transaction(TXN_TIMEOUT_S)
            )
        except KafkaException as exc:
            self._abort(exc)
        return (t1 - t0) + (t3 - t2)

    def close(self) -> None:
        """Nothing is left open: every commit either committed or aborted."""
        self.producer.flush(5)

    def _abort(self, exc: KafkaException) -> None:
        err = error_of(exc)
        if err is not None and err.fatal():
            raise FatalKafkaError(f"fatal producer error: {err}") from exc
        log.warning("transaction failed (%s); aborting", err)
        try:
            self._call("abort_transaction", lambda: self.producer.abort_transaction(TXN_TIMEOUT_S))
        except KafkaException as abort_exc:
            raise FatalKafkaError(f"cannot abort transaction: {abort_exc}") from abort_exc
        raise TransactionAborted(str(err)) from exc

    def _call(self, name: str, call: Callable[[], T]) -> T:
        """Retry a transactional call while librdkafka says the error is retriable."""
        for attempt in range(RETRIES):
            try:
                with _watchdog(name, TXN_TIMEOUT_S + WATCHDOG_MARGIN_S, self.on_wedged):
                    return call()
            except KafkaException as exc:
                err = error_of(exc)
                if err is None or not err.retriable() or attempt == RETRIES - 1:
                    raise
                log.warning("%s: retriable transaction error (%s); retrying", name, err)
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def _dead_letter(self, item: Rejected) -> None:
        """Produce the fullest form of the dead letter that fits: a record the producer may not
        send would abort the batch, and its replay would fail the same way forever."""
        msg = item.message
        try:
            forms = dead_letter_forms(item)
        except Exception as exc:  # building it failed: popscore's headers alone, saying why
            forms = [barest_dead_letter(msg, internal_error(exc))]
        for n, (key, value, headers) in enumerate(forms):
            try:
                produce(self.producer, self.dlq_topic, value, key, headers)
            except KafkaException as exc:
                err = error_of(exc)
                if (
                    err is None
                    or err.code() != KafkaError.MSG_SIZE_TOO_LARGE
                    or n == len(forms) - 1
                ):
                    raise
                continue
            if n:
                where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
                log.warning("dead letter of %s: too large for the producer; sent without its %s",
                            where, "value" if n == 1 else "value, key and headers")  # fmt: skip
            return


@contextmanager
def _watchdog(name: str, seconds: float, hook: Callable[[], None]) -> Iterator[None]:
    """librdkafka can block in a transactional call past its timeout when the coordinator
    goes away (confluentinc/librdkafka#5456, #5511). A wedged handle cannot be recovered in
    process: exit, and the restart (same transactional.id) fences and aborts the open txn."""
    timer = threading.Timer(seconds, _exit_wedged, args=(name, seconds, hook))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _exit_wedged(name: str, seconds: float, hook: Callable[[], None]) -> None:
    log.critical("Kafka %s blocked for %.0fs; exiting to be restarted", name, seconds)
    # The hook (the crash journal's take-back: this exit is no record's doing) may wait on
    # Redis; the exit must not.
    done = threading.Thread(target=hook, daemon=True)
    done.start()
    done.join(WEDGED_HOOK_S)
    logging.shutdown()
    os._exit(EXIT_WEDGED)
