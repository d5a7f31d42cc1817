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
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from consumer.errors import PopscoreError
from consumer.kafkalog import librdkafka_logger
from consumer.pipeline import Rejected
from consumer.source import Header, foreign_headers
from schemas.dead_letter import (
    HEADER_DETAIL,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    HEADER_VALUE_OMITTED,
)
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
TXN_TIMEOUT_S = 30.0
# An open transaction of a crashed process blocks read_committed readers until it times out
# (unless a restart with the same transactional.id fences it first): keep it short.
TRANSACTION_TIMEOUT_MS = 60_000
RETRIES = 5
WATCHDOG_MARGIN_S = 15.0
EXIT_WEDGED = 75  # EX_TEMPFAIL: restart me
MAX_DETAIL = 1000


class TransactionAborted(PopscoreError):
    """The batch's transaction was aborted; nothing of it is visible. Rewind and replay."""


class FatalKafkaError(PopscoreError):
    """The producer cannot continue (fenced, or a fatal broker error). Exit non-zero."""


class Transactions:
    """A transactional producer owned by the main thread (``transactional.id`` per instance)."""

    def __init__(
        self, config: dict[str, Any], transactional_id: str, results_topic: str, dlq_topic: str
    ) -> None:
        self.producer = Producer(
            {
                "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                "linger.ms": 5,
                "compression.type": "zstd",
                **config,  # tunables above may be overridden; what follows may not
                # With the default "rebootstrap", an outage of every known broker decommissions
                # them, and a send_offsets_to_transaction() in flight then waits on a broker
                # thread that is gone: it blocked past the broker's return in 5 of 6 restarts
                # measured, until the watchdog below exited (confluentinc/librdkafka#5511;
                # bench/results/broker-restart-probe-2026-11-28.txt). Without it: 0 of 6. Brokers
                # dropped from metadata are still decommissioned, so the watchdog stays. A
                # producer that can reach no known broker fails its transactions until the abort
                # fails or the watchdog fires; the restart then bootstraps afresh.
                "metadata.recovery.strategy": "none",
                "logger": librdkafka_logger("producer"),
                "transactional.id": transactional_id,
            }
        )
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        # Fences an earlier process with the same id and aborts its open transaction at once.
        self._call("init_transactions", lambda: self.producer.init_transactions(TXN_TIMEOUT_S))

    def commit(
        self,
        scores: Sequence[ScoreRecord],
        dead_letters: Sequence[Rejected],
        offsets: list[TopicPartition],
        group_metadata: Any,
    ) -> float:
        """Produce and commit one batch atomically, or raise TransactionAborted / Fatal.
        Returns the seconds spent on the records (queueing them, then waiting for their acks
        once the offsets are sent); the rest of the call is the commit protocol (offsets and
        the end-of-transaction markers)."""
        t0 = time.perf_counter()
        try:
            self.producer.begin_transaction()
            for record in scores:
                self._produce(self.results_topic, record.track_id.encode(), record.encode(), None)
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
        err: KafkaError = exc.args[0]
        if err.fatal():
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
                with _watchdog(name, TXN_TIMEOUT_S + WATCHDOG_MARGIN_S):
                    return call()
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if not err.retriable() or attempt == RETRIES - 1:
                    raise
                log.warning("%s: retriable transaction error (%s); retrying", name, err)
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    def _dead_letter(self, item: Rejected) -> None:
        msg = item.message
        try:
            self._produce(self.dlq_topic, msg.key(), msg.value(), _headers(item))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            # An input record can be larger than this producer may send (the broker's default
            # limit is 1 MiB, librdkafka's 1,000,000 bytes). Aborting would replay the batch
            # and fail the same way forever: send the dead letter without its value; its
            # source headers still point at the original.
            size = len(msg.value() or b"")
            where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
            log.warning("dead letter of %s: value of %d bytes left out (%s)",
                        where, size, exc.args[0].str())  # fmt: skip
            headers = [*_headers(item), (HEADER_VALUE_OMITTED, str(size).encode())]
            self._produce(self.dlq_topic, msg.key(), None, headers)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                # Local queue full: let librdkafka send until there is room.
                self.producer.poll(0.5)


@contextmanager
def _watchdog(name: str, seconds: float) -> Iterator[None]:
    """librdkafka can block in a transactional call past its timeout when the coordinator
    goes away (confluentinc/librdkafka#5456, #5511). A wedged handle cannot be recovered in
    process: exit, and the restart (same transactional.id) fences and aborts the open txn."""
    timer = threading.Timer(seconds, _exit_wedged, args=(name, seconds))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _exit_wedged(name: str, seconds: float) -> None:
    log.critical("Kafka %s blocked for %.0fs; exiting to be restarted", name, seconds)
    logging.shutdown()
    os._exit(EXIT_WEDGED)


def _headers(item: Rejected) -> list[Header]:
    """The original's own headers (tracing, provenance: ``replay-dlq`` carries them back), then
    CONTRACT §3's: why, and where the original came from."""
    msg = item.message
    why: list[Header] = [
        (HEADER_REASON, item.error.reason.value.encode()),
        (HEADER_DETAIL, item.error.detail[:MAX_DETAIL].encode()),
        (HEADER_TOPIC, (msg.topic() or "").encode()),
        (HEADER_PARTITION, str(msg.partition()).encode()),
        (HEADER_OFFSET, str(msg.offset()).encode()),
    ]
    return [*foreign_headers(msg), *why]
