"""The service: wires settings, source, pipeline, sinks and transactions, and runs the loop.

    main thread (owns the consumer and the transactional producer):
        poll (never blocked by work) → micro-batch → submit ─┐
        commit finished batches in order  ◄──────────────────┘
    stage threads, per batch, in order:
        prepare (parse + fetch/decode on the pool) → infer (device) → Redis upsert

A batch is committed — scores, dead letters and input offsets in one Kafka transaction — only
after its Redis write. At most ``max_inflight_batches`` are in flight; the next batch fills
meanwhile, and once it is full the partitions are paused while the loop keeps polling, so no
batch can outlast ``max.poll.interval.ms`` and memory stays bounded. SIGTERM/SIGINT: the
batches in hand are finished and committed, then exit 0.
"""

import logging
import math
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import redis
from confluent_kafka import Message

from consumer.audio import WORST_FETCH_FACTOR, AudioPolicy
from consumer.batcher import MicroBatcher
from consumer.commit import TransactionAborted, Transactions
from consumer.dead_letters import Rejected
from consumer.device import Scorer
from consumer.drift import DriftMonitor
from consumer.errors import ConfigError, DeadLetter, DeviceUnavailable
from consumer.health import STUCK_S, Health, HealthServer
from consumer.kafka import client
from consumer.metrics import OUTCOME_DEAD_LETTERED, OUTCOME_DUPLICATE, OUTCOME_SCORED, Metrics
from consumer.pipeline import BatchResult, Pipeline
from consumer.settings import Settings
from consumer.sinks import RedisSink, Upsert
from consumer.source import KafkaSource, Partition, next_offsets, partition_of, record_id
from popscore.artifact import ArtifactError, ArtifactMeta
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.2
BUSY_POLL_S = 0.02
# `consume --report` prints the records of its run (the latest this many); without it none are
# kept, so a long-running service does not grow (docs/PERFORMANCE.md, "Memory").
REPORT_KEPT = 10_000
DNS_ALLOWANCE_S = 10.0  # glibc's resolver: 5 s x 2 attempts by default


@dataclass
class RunStats:
    """What this process did, for the demo's table and summary."""

    scored: deque[ScoreRecord] = field(default_factory=lambda: deque(maxlen=0))
    dead_letters: dict[str, int] = field(default_factory=dict)
    first_event_at: float | None = None
    last_write_at: float | None = None


@dataclass(frozen=True)
class InFlight:
    """A submitted batch: its messages and the future of its last stage."""

    messages: list[Message]
    future: "Future[BatchResult]"


def training_labels(meta: ArtifactMeta) -> tuple[str, str]:
    """popscore_model_info's provenance labels: the training data's name (a path's last part)
    and whether it was synthetic (true, false, unknown)."""
    data = (meta.training.data if meta.training else None) or "unknown"
    name = Path(data).name if "/" in data else data
    return name[:64], {True: "true", False: "false", None: "unknown"}[meta.synthetic]


def stuck_after(s: Settings) -> float:
    """How long records may wait uncommitted before /healthz calls the consumer stuck: at
    least STUCK_S, and twice the slowest legitimate batch (every event's fetch running to its
    deadline after a slow DNS lookup, the batch shared by the decode workers) plus the grace."""
    per_event = WORST_FETCH_FACTOR * s.audio_fetch_timeout_s + DNS_ALLOWANCE_S
    rounds = math.ceil(s.batch_size / s.decode_workers)
    return max(STUCK_S, 2 * rounds * per_event + s.shutdown_grace_s)


def load_scorer(s: Settings) -> Scorer:
    """The artifact on its device; a missing or unreadable artifact, or a device that is not
    there, is a bad setting: start-up stops with one line naming POPSCORE_MODEL or _DEVICE."""
    try:
        return Scorer(s.model, s.device)
    except DeviceUnavailable as exc:
        raise ConfigError(f"POPSCORE_DEVICE: {exc}") from None
    except ArtifactError as exc:
        raise ConfigError(f"POPSCORE_MODEL: {exc}") from None


def audio_policy(s: Settings) -> AudioPolicy:
    """The audio policy; a file root that is not a folder is a bad setting (else every
    file:// event would be dead-lettered as uri_forbidden while the mount is missing)."""
    for root in s.audio_file_roots:
        if not root.is_dir():
            raise ConfigError(f"POPSCORE_AUDIO_FILE_ROOTS: {str(root)!r} is not a folder")
    return AudioPolicy.create(
        s.audio_file_roots,
        s.audio_allow_private_hosts,
        s.audio_max_bytes,
        s.audio_max_seconds,
        s.audio_fetch_timeout_s,
        s.audio_s3_buckets,
        fetch_concurrency=s.decode_workers,
    )


class App:
    """One consumer process. Use as a context manager; ``run`` returns when asked to stop."""

    def __init__(self, settings: Settings, stop_at_end: bool = False, keep_scored: int = 0) -> None:
        self.settings = settings
        self.stop_at_end = stop_at_end
        self.metrics = Metrics()
        self.health = Health(stuck_s=stuck_after(settings))
        self.stats = RunStats(scored=deque(maxlen=keep_scored))
        self.running = True
        self.inflight: deque[InFlight] = deque()
        self._stop_writes = threading.Event()
        self._needs_rewind = False
        self._drops = 0  # how many times uncommitted work was dropped (see _fetch)
        self._stack = ExitStack()

    def __enter__(self) -> "App":
        s = self.settings
        policy = audio_policy(s)
        self.scorer = load_scorer(s)
        self._announce_model()
        self.health.model_loaded = True
        # Before the stage pools, so closed after them (last in, first out): a stage still
        # finishing a dropped batch never finds a closed client.
        self.redis = redis.Redis.from_url(
            s.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5
        )
        self._stack.callback(self.redis.close)
        pool = self._executor(s.decode_workers, "decode")
        self.pipeline = Pipeline(
            self.scorer,
            policy,
            pool,
            self.metrics,
            s.max_event_bytes,
            s.resample_on,
            max_future_skew_s=s.max_future_skew_s,
            drift=DriftMonitor.create(
                self.scorer.meta, self.metrics, s.drift_window, s.drift_min_events
            ),
        )
        # One thread per stage keeps batches in order while stage n+1 of one batch overlaps
        # stage n of the next (decode of batch k+1 while batch k is on the device).
        self._stages = [self._executor(1, name) for name in ("prepare", "device", "sink")]
        self.redis_sink = RedisSink(self.redis, s.redis_ttl_s, s.dedupe_ttl_s)
        self.batcher: MicroBatcher[Message] = MicroBatcher(s.batch_size, s.batch_wait_ms / 1e3)
        # The consumer first (it joins the group only at its first poll, in run()): a property
        # librdkafka refuses then fails start-up before init_transactions waits for a broker.
        self.source = client(
            lambda: KafkaSource(
                s.kafka_config("consumer"),
                s.group_id,
                s.input_topic,
                self.metrics,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        )
        try:
            self.txn = client(
                lambda: Transactions(
                    s.kafka_config("producer"),
                    s.instance_transactional_id(),
                    s.output_topic,
                    s.dlq_topic,
                )
            )
        except BaseException:
            self.source.close()
            raise
        # Last in, first out: the consumer leaves (its revoke may still commit) before the
        # producer is closed.
        self._stack.callback(self.txn.close)
        self._stack.callback(self.source.close)
        self.health.readiness = self._readiness
        self.health.waiting = self._waiting
        self.http = HealthServer(s.http_port, self.metrics.registry, self.health).start()
        self._stack.callback(self.http.close)
        # Last in, first out: unblock Redis retries before the stage threads are joined.
        self._stack.callback(self._stop_redis_retries)
        log.info("serving /metrics, /healthz, /readyz on port %d", self.http.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _announce_model(self) -> None:
        """popscore_model_info, and what the model learnt from in the log; a warning when it
        is synthetic data (the demo's model): its scores say nothing about real popularity."""
        meta = self.scorer.meta
        labels = (meta.model_version, str(self.scorer.device), *training_labels(meta))
        self.metrics.model_info.labels(*labels).set(1)
        log.info("serving %s", meta.provenance())
        if meta.synthetic:
            log.warning("%s was trained on SYNTHETIC data: its scores say nothing about real "
                        "popularity (POPSCORE_MODEL)", meta.model_version)  # fmt: skip

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batches in hand, then leave the loop."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def run(self) -> None:
        """The main loop; returns after a stop signal (or at the end, with ``stop_at_end``)."""
        while self.running:
            self.health.beat()
            self._commit_finished()
            self._poll()
            self.source.refresh_lag()
            if self.stop_at_end and self._idle() and self.source.caught_up():
                log.info("all assigned partitions read to the end; stopping")
                break
        self._drain(self.settings.shutdown_grace_s)

    # --- polling and submitting --------------------------------------------------------

    def _poll(self) -> None:
        if self._needs_rewind:
            self._needs_rewind = False
            self.source.rewind()
        full = len(self.inflight) >= self.settings.max_inflight_batches
        room = self.batcher.room()
        if full and room <= 0:
            # Backpressure only once the next batch is formed too: paused partitions fetch
            # nothing, and polling on keeps the group membership alive.
            self.source.pause()
            self._fetch(1, BUSY_POLL_S)
            return
        # While every slot is busy the next batch keeps filling, so it goes the moment a slot
        # frees; pausing here would cost a resume (docs/PERFORMANCE.md, "Targets": the
        # backpressure fix).
        self.source.resume()
        if full:
            timeout = BUSY_POLL_S  # wake soon: the head batch may finish any moment
        else:
            timeout = self.batcher.wait_left(BUSY_POLL_S if self.inflight else IDLE_POLL_S)
        if room > 0:
            self._fetch(room, timeout)
        if not full and self.batcher.ready():
            self._submit(self.batcher.take())

    def _fetch(self, n: int, timeout: float) -> None:
        """Up to n messages into the batcher. A rebalance callback inside the fetch may drop
        the uncommitted work: then what the same fetch returned is dropped too, as it lies
        past the committed offsets the partitions rewind to (and is fetched again there)."""
        drops = self._drops
        messages = self.source.fetch(n, timeout)
        if self._drops == drops:
            self.batcher.add(messages)

    def _submit(self, messages: list[Message]) -> None:
        if self.stats.first_event_at is None:
            self.stats.first_event_at = time.monotonic()
        prepare, device, sink = self._stages
        prepared = prepare.submit(self.pipeline.prepare, messages)
        scored = device.submit(lambda: self.pipeline.infer(prepared.result()))
        stop = self._stop_writes  # this batch's: a drop stops its Redis retries, not later ones
        written = sink.submit(lambda: self._write_redis(scored.result(), stop))
        self.inflight.append(InFlight(messages, written))
        self._set_inflight_gauge()

    def _write_redis(self, result: BatchResult, stop: threading.Event) -> BatchResult:
        """Sink stage: the idempotent upsert; drops re-deliveries of already claimed events.
        Dead-lettered records give up the event-id claims they hold first, so that another
        record of the same event, in this batch or a later one, is no duplicate."""
        start = time.perf_counter()
        self._release_claims(result.rejected, stop)
        records = [record for _msg, record in result.scored]
        sources = [record_id(msg) for msg, _r in result.scored]
        codes = self.redis_sink.write(records, sources, stop)
        self.metrics.stage_seconds.labels("redis").observe(time.perf_counter() - start)
        written_at = datetime.now(UTC)
        kept, unwritten = [], []
        for (msg, record), code in zip(result.scored, codes, strict=True):
            if isinstance(code, DeadLetter):
                unwritten.append(Rejected(msg, code, record.event_id))
                continue
            if code is Upsert.DUPLICATE:
                result.duplicates.append(msg)
                continue
            kept.append((msg, record))
            self.metrics.e2e_latency.observe((written_at - record.emitted_at).total_seconds())
        result.scored = kept
        self._release_claims(unwritten, stop)
        result.rejected += unwritten
        return result

    def _release_claims(self, rejected: list[Rejected], stop: threading.Event) -> None:
        claims = [(r.event_id, record_id(r.message)) for r in rejected if r.event_id]
        self.redis_sink.release(claims, stop)

    # --- committing ---------------------------------------------------------------------

    def _commit_finished(self) -> None:
        """Commit, in order, every batch at the head of the queue whose stages are done."""
        while self.inflight and self.inflight[0].future.done():
            self._commit(self.inflight.popleft())

    def _commit(self, item: InFlight) -> None:
        try:
            result = item.future.result()  # a stage's unexpected exception stops the process
        except BaseException:
            # ... and nothing behind the failed batch may be committed on the way out (the
            # revoke in the consumer's close drains): its offsets would skip the failed one.
            self._drop_uncommitted()
            raise
        start = time.perf_counter()
        try:
            produce_s = self.txn.commit(
                [record for _msg, record in result.scored],
                result.rejected,
                next_offsets(item.messages),
                self.source.group_metadata(),
            )
        except TransactionAborted:
            self.metrics.transactions.labels("aborted").inc()
            self._drop_uncommitted()
            return
        self.metrics.transactions.labels("committed").inc()
        self.health.progressed()
        self.metrics.stage_seconds.labels("produce").observe(produce_s)
        self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - start - produce_s)
        self._count(result)
        self._set_inflight_gauge()

    def _drain(self, timeout_s: float) -> None:
        """Finish and commit every batch in hand within ``timeout_s``, else drop the rest."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            head = self.inflight[0].future
            wait_futures([head], timeout=max(0.0, deadline - time.monotonic()))
            if not head.done():
                log.warning("batches in hand did not finish in %.0fs; dropping them", timeout_s)
                self._stop_writes.set()  # the dropped batches' Redis retries give up
                self._stop_writes = threading.Event()  # later batches (after a rebalance) retry
                self._drop_uncommitted()
                return
            self._commit_finished()

    def _stop_redis_retries(self) -> None:
        self._stop_writes.set()  # the current event: a drain timeout replaces it

    def _drop_uncommitted(self) -> None:
        """Forget everything not committed; the partitions rewind to their committed offsets.
        Stage threads may still finish old batches: their Redis writes are idempotent, and
        their results are never committed."""
        self.inflight.clear()
        self.batcher.take()
        self._needs_rewind = True
        self._drops += 1
        self._set_inflight_gauge()

    # --- rebalances -----------------------------------------------------------------------

    def _on_revoke(self, gone: set[Partition]) -> None:
        """We still own ``gone``: finish and commit what is in hand, or drop it uncommitted."""
        self._drain(self.settings.shutdown_grace_s)
        self.batcher.discard(lambda msg: partition_of(msg) not in gone)

    def _on_lost(self, gone: set[Partition]) -> None:
        """``gone`` already belongs to someone else: nothing of it may be committed."""
        log.warning("partitions lost: %s; dropping uncommitted work", sorted(gone))
        self._stop_writes.set()  # the dropped batches' Redis retries give up, as on a drain
        self._stop_writes = threading.Event()
        self._drop_uncommitted()

    # --- bookkeeping ----------------------------------------------------------------------

    def _count(self, result: BatchResult) -> None:
        scored = [record for _msg, record in result.scored]
        if result.messages:
            self.metrics.batch_size.observe(len(result.messages))
        self.metrics.events.labels(OUTCOME_SCORED).inc(len(scored))
        self.metrics.events.labels(OUTCOME_DEAD_LETTERED).inc(len(result.rejected))
        self.metrics.events.labels(OUTCOME_DUPLICATE).inc(len(result.duplicates))
        for item in result.rejected:
            reason = item.error.reason.value
            self.metrics.dead_letters.labels(reason).inc()
            self.stats.dead_letters[reason] = self.stats.dead_letters.get(reason, 0) + 1
            msg = item.message
            log.warning(
                "dead-lettered %s[%s]@%s: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                item.error,
            )
        self.stats.scored.extend(scored)
        self.stats.last_write_at = time.monotonic()

    def _set_inflight_gauge(self) -> None:
        in_hand = sum(len(item.messages) for item in self.inflight) + len(self.batcher)
        self.metrics.inflight.set(in_hand)

    def _idle(self) -> bool:
        return not self.inflight and len(self.batcher) == 0

    def _waiting(self) -> bool:
        """Records wait to be committed: some are in hand, or a partition is not read to its
        end (after an abort's rewind, say)."""
        return bool(self.source.assignment) and not (self._idle() and self.source.caught_up())

    def _executor(self, workers: int, name: str) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        # At exit only dropped batches' jobs can still be queued (a clean stop has committed
        # everything): cancel them rather than fetch, decode and score them first.
        self._stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        return pool

    def _readiness(self) -> tuple[bool, str]:
        if not self.health.model_loaded:
            return False, "model not loaded"
        if not self.source.assignment:
            return False, "no partitions assigned"
        if self.source.kafka_problem:
            return False, f"kafka unreachable: {self.source.kafka_problem}"
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        if self.redis_sink.failing:  # it answers PING but refuses writes (OOM, READONLY)
            return False, f"redis refusing writes: {self.redis_sink.failing}"
        return True, "ready"

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batches in hand", signum)
        self.running = False
