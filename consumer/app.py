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
batches in hand are finished and committed, then exit 0. SIGHUP: the model is reloaded between
two batches (``consumer.reload``).
"""

import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import cast

import redis
from confluent_kafka import KafkaError, Message, Producer
from redis.cluster import RedisCluster

from consumer.audio import WORST_FETCH_FACTOR, AudioPolicy, lower_decode_thread_priority
from consumer.batcher import MicroBatcher
from consumer.cluster_sink import ClusterRedisSink
from consumer.commit import TransactionAborted, Transactions
from consumer.crashguard import Alone, CrashGuard
from consumer.dead_letters import Rejected
from consumer.device import Scorer
from consumer.drift import DriftMonitor
from consumer.errors import ConfigError, DeadLetter, DeviceFailure, DeviceUnavailable
from consumer.ffmpeg_sandbox import Limits
from consumer.health import STUCK_S, BackgroundCheck, Health, HealthServer
from consumer.kafka import TOPIC_LOOKUPS, client, output_topics_limit, transactional_config
from consumer.metrics import OUTCOME_DEAD_LETTERED, OUTCOME_DUPLICATE, OUTCOME_SCORED, Metrics
from consumer.pipeline import BatchResult, Pipeline, Prepared, shadow_problem
from consumer.progress import Progress
from consumer.redis_client import close as close_redis
from consumer.redis_client import connect
from consumer.reload import FileWatch, Reloader
from consumer.rollout import ViewWatch
from consumer.settings import Settings
from consumer.sinks import RedisSink, Upsert
from consumer.source import KafkaSource, Partition, next_offsets, partition_of, record_id
from consumer.yielding import LiveTraffic
from popscore.artifact import ArtifactError, ArtifactMeta
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.2
# The readiness probe's PING of Redis, on its own thread: well within the probes' 5 s timeout.
PROBE_TIMEOUT_S = 2.0
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
class ShadowOutcome:
    """What the shadow model did with one batch (its records are for the shadow topic)."""

    records: list[ScoreRecord]
    duplicates: int = 0
    failed: int = 0


@dataclass
class InFlight:
    """A submitted batch: its messages, the future of its last stage and of its shadow."""

    messages: list[Message]
    future: "Future[BatchResult]"
    shadow: "Future[ShadowOutcome] | None" = None
    shadow_wait_from: float | None = None
    """When the commit started waiting for the shadow (the primary was done)."""
    alone: bool = False
    """A record processed alone (consumer.crashguard)."""


def training_labels(meta: ArtifactMeta) -> tuple[str, str]:
    """popscore_model_info's provenance labels: the training data's name (a path's last part)
    and whether it was synthetic (true, false, unknown)."""
    data = (meta.training.data if meta.training else None) or "unknown"
    name = Path(data).name if "/" in data else data
    return name[:64], {True: "true", False: "false", None: "unknown"}[meta.synthetic]


def model_labels(scorer: Scorer) -> tuple[str, str, str, str, str]:
    """popscore_model_info's labels for ``scorer``."""
    meta = scorer.meta
    optimized = "true" if scorer.optimized else "false"
    return (meta.model_version, str(scorer.device), *training_labels(meta), optimized)


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
        return Scorer(s.model, s.device, optimize=s.cpu_optimize)
    except DeviceUnavailable as exc:
        raise ConfigError(f"POPSCORE_DEVICE: {exc}") from None
    except ArtifactError as exc:
        raise ConfigError(f"POPSCORE_MODEL: {exc}") from None


def load_shadow(s: Settings, primary: Scorer) -> Scorer | None:
    """The shadow artifact (POPSCORE_SHADOW_MODEL) on the primary's device, when set; one that
    cannot score the primary's decoded audio is a bad setting."""
    if s.shadow_model is None:
        return None
    try:
        shadow = Scorer(s.shadow_model, str(primary.device), optimize=primary.optimize)
    except (ArtifactError, DeviceUnavailable) as exc:
        raise ConfigError(f"POPSCORE_SHADOW_MODEL: {exc}") from None
    problem = shadow_problem(primary.meta, primary.listens, shadow)
    if shadow.meta.model_version == primary.meta.model_version:
        problem = f"the same model_version as POPSCORE_MODEL ({primary.meta.model_version})"
    if problem:
        raise ConfigError(f"POPSCORE_SHADOW_MODEL: {problem}")
    return shadow


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
        ffmpeg_limits=Limits(s.ffmpeg_memory_mb, s.ffmpeg_timeout_s),
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
        self.progress = Progress()
        self._shadow_jobs: set[Future[ShadowOutcome]] = set()
        self._yielded = False
        self.live: LiveTraffic | None = None
        self._stack = ExitStack()
        self._alone: deque[Message] = deque()
        """Taken from the batcher, to be processed one at a time (consumer.crashguard)."""
        self._orphans: list[Future[BatchResult]] = []
        """Dropped batches' last stages, which may still run."""

    def __enter__(self) -> "App":
        try:
            return self._start()
        except BaseException:  # what started is stopped: `with` calls no __exit__ for us
            self._stack.close()
            raise

    def _start(self) -> "App":
        s = self.settings
        if s.cpu_nice:
            # First, so every thread started below (pools, torch's) inherits it: on Linux a
            # nice value is per thread, and new threads take their creator's.
            os.nice(s.cpu_nice)
        # The port is taken before anything slow or fencing (init_transactions fences the
        # instance running with this transactional.id): one taken fails start-up at once.
        # Served from now on, probes get a quick 503 "starting" rather than a hung connection.
        self.http = self._listen(s.http_port).start()
        self._stack.callback(self.http.close)
        policy = audio_policy(s)
        self.scorer = load_scorer(s)
        self.shadow = load_shadow(s, self.scorer)
        if self.scorer.device.type == "cuda":  # on CPU the first batch costs ~1 s; on CUDA more
            for scorer in filter(None, (self.scorer, self.shadow)):
                took = scorer.warm_up(s.batch_size)
                log.info("%s warmed up at batch %d (first call %.1f s)",
                         scorer.meta.model_version, s.batch_size, took)  # fmt: skip
        self._announce_model()
        self.health.model_loaded = True
        # Before the stage pools, so closed after them (last in, first out): a stage still
        # finishing a dropped batch never finds a closed client.
        self.redis = connect(s.redis_url.get_secret_value(), s.redis_cluster)
        self._stack.callback(close_redis, self.redis)
        self._redis_check = self._redis_probe()
        self.redis_sink = (
            ClusterRedisSink(
                self.redis,
                s.redis_ttl_s,
                s.dedupe_ttl_s,
                s.redis_min_replicas,
                s.redis_replica_wait_ms,
            )
            if isinstance(self.redis, RedisCluster)
            else RedisSink(self.redis, s.redis_ttl_s, s.dedupe_ttl_s)
        )
        self.guard = CrashGuard(
            self.redis, s.group_id, s.input_topic, s.crash_limit, self.redis_sink.retrying
        )
        # Before the stage pools, so run after they are shut down (last in, first out): no
        # stage can count a try after the try is taken back.
        self._stack.callback(self.guard.forgive)
        pool = self._executor(s.decode_workers, "decode", lower_decode_thread_priority)
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
        # The shadow model scores beside the sink stage, on its own thread: a slow or failing
        # shadow never holds up the primary's Redis write.
        self._shadow_stage = self._executor(1, "shadow") if self.shadow else None
        self.reloader = self._reloader()
        self.view = ViewWatch(self.redis, self.metrics.view_fed, live=s.role == "live")
        self.batcher: MicroBatcher[Message] = MicroBatcher(s.batch_size, s.batch_wait_ms / 1e3)
        # The consumer first: a property librdkafka refuses then fails start-up before any
        # broker is asked. It joins the group in the background from here on, so a start-up
        # failing below costs the group one (cooperative: the others keep their partitions)
        # rebalance.
        self.source = client(
            lambda: KafkaSource(
                s.kafka_config("consumer"),
                s.group_id,
                s.input_topic,
                self.metrics,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
                admin=s.kafka_config("admin"),
            )
        )
        try:
            if self.stop_at_end:  # before init_transactions can fence a running instance
                self._check_input_exists()
            # A producer property librdkafka refuses fails start-up before any broker is asked
            # (the topic check below needs one); built, never started, then dropped.
            client(lambda: Producer(transactional_config(s.kafka_config("producer"), "check")))
            limit = output_topics_limit(s.kafka_config("admin"), s.written_topics())
            self.txn = client(
                lambda: Transactions(
                    s.kafka_config("producer"),
                    s.instance_transactional_id(),
                    s.output_topic,
                    s.dlq_topic,
                    s.shadow_topic if self.shadow else None,
                    limit,
                )
            )
        except BaseException:
            self.source.close()
            raise
        # Last in, first out: the consumer leaves (its revoke may still commit) before the
        # producer is closed.
        self._stack.callback(self.txn.close)
        self.txn.on_wedged = self.guard.forgive
        self._stack.callback(self.source.close)
        self.live = self._live_traffic()
        self.health.readiness = self._readiness
        self.health.waiting = self._waiting
        self.health.beat()
        self.health.started = True
        # Last in, first out: unblock Redis retries before the stage threads are joined.
        self._stack.callback(self._stop_redis_retries)
        log.info("serving /metrics, /healthz, /readyz on port %d", self.http.port)
        self._check_view()  # a live primary that no longer feeds the view says so at once
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _check_input_exists(self) -> None:
        """With --stop-at-end a missing input topic would be waited on for ever: no partition
        is ever assigned, so none is ever read to its end."""
        topic = self.settings.input_topic
        for attempt in range(TOPIC_LOOKUPS):  # a topic created a moment ago may lag in metadata
            found = self.source.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if found is not None and found.partitions:
                return
            refused = KafkaError.TOPIC_AUTHORIZATION_FAILED
            if found is not None and found.error is not None and found.error.code() == refused:
                raise ConfigError(f"POPSCORE_INPUT_TOPIC: not authorized to read {topic!r}")
            if attempt < TOPIC_LOOKUPS - 1:
                time.sleep(0.5)
        raise ConfigError(f"POPSCORE_INPUT_TOPIC: topic {topic!r} does not exist")

    def _listen(self, port: int) -> HealthServer:
        try:
            return HealthServer(port, self.metrics.registry, self.health)
        except OSError as exc:
            detail = f"cannot listen on {port}: {exc.strerror}"
            raise ConfigError(f"POPSCORE_HTTP_PORT: {detail}") from exc

    def _announce_model(self) -> None:
        """popscore_model_info, and what the model learnt from in the log; a warning when it
        is synthetic data (the demo's model): its scores say nothing about real popularity."""
        meta = self.scorer.meta
        self.metrics.model_info.labels(*model_labels(self.scorer)).set(1)
        log.info("serving %s", meta.provenance())
        if meta.synthetic:
            log.warning("%s was trained on SYNTHETIC data: its scores say nothing about real "
                        "popularity (POPSCORE_MODEL)", meta.model_version)  # fmt: skip
        if self.shadow:
            self.metrics.shadow_info.labels(self.shadow.meta.model_version).set(1)
            log.info("shadow %s", self.shadow.meta.provenance())

    def _reloader(self) -> Reloader:
        s = self.settings
        watch = FileWatch(s.model, s.model_watch_s, time.monotonic) if s.model_watch_s else None
        return Reloader(
            s.model,
            s.device,
            self.scorer,
            loader=self._executor(1, "reload"),
            stage=self._stages[1],
            swap=self._swap_model,
            metrics=self.metrics,
            watch=watch,
            taken=frozenset({self.shadow.meta.model_version} if self.shadow else ()),
            # As at start: on CUDA the first batches of a cold model cost seconds.
            warm_batch=s.batch_size if self.scorer.device.type == "cuda" else 0,
        )

    def _swap_model(self, new: Scorer) -> None:
        """On the device stage, between two batches (``consumer.reload``)."""
        old, self.scorer = self.scorer, new
        self.pipeline.scorer = new
        self.metrics.model_info.remove(*model_labels(old))
        self._announce_model()
        # Drift is measured against the serving model's own training reference.
        m, s = self.metrics, self.settings
        for gauge in (m.feature_missing_ratio, m.feature_missing_ratio_reference, m.feature_psi,
                      m.score_psi):  # fmt: skip
            gauge.clear()
        self.pipeline.drift = DriftMonitor.create(new.meta, m, s.drift_window, s.drift_min_events)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batches in hand, then leave the loop. SIGHUP: reload the
        model (the handler only sets a flag; the main loop does the rest)."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reloader.request())

    def _live_traffic(self) -> LiveTraffic | None:
        """What this consumer yields to (POPSCORE_YIELD_TO_GROUP), closed on exit."""
        s = self.settings
        if not s.yield_to_group:
            return None
        live = LiveTraffic(s.kafka_config("admin"), s.yield_to_group, s.yield_to_topic,
                           s.yield_max_lag)  # fmt: skip
        self._stack.callback(live.close)
        return live

    def run(self) -> None:
        """The main loop; returns after a stop signal (or at the end, with ``stop_at_end``)."""
        while self.running:
            self.health.beat()
            self._commit_finished()
            self._next_alone()
            self.reloader.poll()
            self._poll()
            self.source.refresh_lag()
            self._set_eta()
            # Not while a drop waits for its rewind: the dropped records are not read yet.
            if (
                self.stop_at_end
                and self._idle()
                and not self._needs_rewind
                and self.source.caught_up()
            ):
                log.info("all assigned partitions read to the end; stopping")
                break
        self._drain(self.settings.shutdown_grace_s)

    # --- polling and submitting --------------------------------------------------------

    def _poll(self) -> None:
        if self._needs_rewind:
            self._needs_rewind = False
            self.source.rewind()
        if self._yielding():
            self.source.pause()  # live lags: take nothing new, keep polling (group membership)
            self._fetch(1, BUSY_POLL_S)
            return
        full = self._slots_taken() >= self.settings.max_inflight_batches
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
            self._take_batch()

    def _set_eta(self) -> None:
        self.metrics.eta.set(self.progress.eta_s(self.source.remaining))

    def _slots_taken(self) -> int:
        """Batches whose primary work is not done. One done but waiting for its shadow before
        its commit does not hold the next batch back (a slow shadow must not pace the primary),
        up to as many again, so memory stays bounded. While records wait to be processed alone,
        every slot is taken, and while one is in flight: the next batch forms behind them."""
        if self._alone or self._alone_in_flight():
            return self.settings.max_inflight_batches
        busy = sum(1 for item in self.inflight if not item.future.done())
        if len(self.inflight) >= 2 * self.settings.max_inflight_batches:
            return len(self.inflight)
        return busy

    def _yielding(self) -> bool:
        busy = self.live is not None and self.live.busy()
        if busy != self._yielded:
            log.info("live group %s %s", self.settings.yield_to_group,
                     "lags: pausing" if busy else "caught up: resuming")  # fmt: skip
        self._yielded = busy
        self.metrics.yielding.set(int(busy))
        return busy

    def _fetch(self, n: int, timeout: float) -> None:
        """Up to n messages into the batcher. A rebalance callback inside the fetch may drop
        the uncommitted work: then what the same fetch returned is dropped too, as it lies
        past the committed offsets the partitions rewind to (and is fetched again there)."""
        drops = self._drops
        messages = self.source.fetch(n, timeout)
        if self._drops == drops:
            self.batcher.add(messages)

    def _take_batch(self) -> None:
        """The batcher's batch, submitted; one holding records in hand at a death of the
        process is processed a record at a time instead (``_next_alone``)."""
        messages = self.batcher.take()
        if self.guard.suspects(messages):
            self._alone.extend(messages)
            self._set_inflight_gauge()
        else:
            self._submit(messages)

    def _next_alone(self) -> None:
        """Submit the next record waiting to be processed alone, once nothing else is in
        flight; the records after the last suspect go together as a batch. A suspect whose
        tries are spent is dead-lettered unprocessed. A record alone stays alone until it is
        committed: a death before then is counted against it, so nothing may run beside it."""
        if self._alone_in_flight():
            return
        # Every dropped record alone is done here: its try is taken back before any new one
        # is counted (the same record's next try writes the same journal value).
        self.guard.tidy()
        if not self._alone:
            return
        if not self.guard.suspect(self._alone[0]):
            batch = []
            while self._alone and not self.guard.suspect(self._alone[0]):
                batch.append(self._alone.popleft())
            self._submit(batch)
            return
        if self.inflight or self._shadow_jobs or not all(f.done() for f in self._orphans):
            return
        self._orphans.clear()
        msg = self._alone.popleft()
        verdict = self.guard.verdict(msg)
        if isinstance(verdict, Alone):
            self.metrics.processed_alone.inc()
            self._submit([msg], verdict)
            return
        log.error("record %s: %s; dead-lettered (%s)", record_id(msg), verdict.detail,
                  verdict.reason.value)  # fmt: skip
        result = BatchResult(
            [msg], self.scorer.meta.model_version, rejected=[Rejected(msg, verdict)]
        )
        done: Future[BatchResult] = Future()
        done.set_result(result)
        self.inflight.append(InFlight([msg], done))
        self._set_inflight_gauge()

    def _alone_in_flight(self) -> bool:
        """A record alone is in flight, or still running after its batch was dropped."""
        return any(item.alone for item in self.inflight) or self.guard.dropped_running()

    def _submit(self, messages: list[Message], alone: Alone | None = None) -> None:
        if self.stats.first_event_at is None:
            self.stats.first_event_at = time.monotonic()
        prepare, device, sink = self._stages
        stop = self._stop_writes  # this batch's: a drop stops its Redis retries, not later ones
        lows = {key: self.source.rewind_point(key) for key in {partition_of(m) for m in messages}}
        prepared = prepare.submit(self._prepare, messages, alone, stop, lows)
        scored = device.submit(lambda: self.pipeline.infer(prepared.result()))
        written = sink.submit(lambda: self._write_redis(scored.result(), stop))
        shadowed = self._submit_shadow(prepared, len(messages), stop)
        self.inflight.append(InFlight(messages, written, shadowed, alone=alone is not None))
        self._set_inflight_gauge()

    def _prepare(
        self,
        messages: list[Message],
        alone: Alone | None,
        stop: threading.Event,
        lows: dict[Partition, int | None],
    ) -> Prepared:
        """Prepare stage: the crash journal first, so a death while these records are in hand
        is known to the next owner of their partitions."""
        self.guard.mark(messages, alone, stop, lows)
        return self.pipeline.prepare(messages)

    def _submit_shadow(
        self, prepared: "Future[Prepared]", events: int, stop: threading.Event
    ) -> "Future[ShadowOutcome] | None":
        """The shadow's job for a batch; skipped (counted) while it is a whole window of
        batches behind, so a slow shadow costs shadow records, never primary throughput."""
        if self._shadow_stage is None:
            return None
        if len(self._shadow_jobs) >= self.settings.max_inflight_batches:
            self.metrics.shadow_events.labels("skipped").inc(events)
            return None
        job = self._shadow_stage.submit(self._run_shadow, prepared, events, stop)
        # Jobs queued or running, dropped batches' included; a set's add and discard are
        # atomic, and the callback runs on the shadow thread (or here, on a cancel).
        self._shadow_jobs.add(job)
        job.add_done_callback(self._shadow_jobs.discard)
        return job

    def _run_shadow(
        self, prepared: "Future[Prepared]", events: int, stop: threading.Event
    ) -> ShadowOutcome:
        """Shadow stage: score the decoded batch with the shadow model and write its namespace.
        Never raises: whatever fails is counted as ``failed``."""
        shadow = cast(Scorer, self.shadow)
        try:
            ready = prepared.result().ready
            scored, failed = self.pipeline.shadow_records(shadow, ready)
            records = [record for _msg, record in scored]
            sources = [record_id(msg) for msg, _r in scored]
            codes = self.redis_sink.write(records, sources, stop, primary=False) if scored else []
        except Exception as exc:  # a stage before failed, or Redis stopped: counted, not raised
            log.warning("shadow stage failed: %s", f"{type(exc).__name__}: {exc}"[:300])
            return ShadowOutcome([], failed=events)
        good = (Upsert.WRITTEN, Upsert.STALE)
        kept = [r for r, code in zip(records, codes, strict=True) if code in good]
        duplicates = sum(1 for code in codes if code is Upsert.DUPLICATE)
        return ShadowOutcome(kept, duplicates, failed + len(codes) - len(kept) - duplicates)

    def _write_redis(self, result: BatchResult, stop: threading.Event) -> BatchResult:
        """Sink stage: the idempotent upsert; drops re-deliveries of already claimed events.
        Dead-lettered records give up the event-id claims they hold first, so that another
        record of the same event, in this batch or a later one, is no duplicate."""
        start = time.perf_counter()
        self._release_claims(result, result.rejected, stop)
        records = [record for _msg, record in result.scored]
        sources = [record_id(msg) for msg, _r in result.scored]
        primary = self.settings.role == "live"  # a backfill's model never claims the view
        codes = self.redis_sink.write(records, sources, stop, primary)
        self.metrics.stage_seconds.labels("redis").observe(time.perf_counter() - start)
        self._check_view()
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
        self._release_claims(result, unwritten, stop)
        result.rejected += unwritten
        return result

    def _check_view(self) -> None:
        shadow = self.shadow.meta.model_version if self.shadow else None
        self.view.check(self.scorer.meta.model_version, shadow)

    def _release_claims(
        self, result: BatchResult, rejected: list[Rejected], stop: threading.Event
    ) -> None:
        version = result.model_version
        claims = [(r.event_id, version, record_id(r.message)) for r in rejected if r.event_id]
        self.redis_sink.release(claims, stop)

    # --- committing ---------------------------------------------------------------------

    def _commit_finished(self) -> None:
        """Commit, in order, every batch at the head of the queue whose stages are done (its
        shadow too, or the shadow's wait is over)."""
        while self.inflight and self.inflight[0].future.done() and self._shadow_settled():
            self._commit(self.inflight.popleft())

    def _shadow_settled(self) -> bool:
        """The head batch's shadow is done, or has had POPSCORE_SHADOW_WAIT_MS since the
        primary was, or the batches behind it fill every slot."""
        head = self.inflight[0]
        if head.shadow is None or head.shadow.done():
            return True
        if len(self.inflight) >= 2 * self.settings.max_inflight_batches:
            return True  # waiting longer would stop the primary taking new batches: late
        now = time.monotonic()
        if head.shadow_wait_from is None:
            head.shadow_wait_from = now
        return now - head.shadow_wait_from >= self.settings.shadow_wait_ms / 1000

    def _commit(self, item: InFlight) -> None:
        try:
            result = item.future.result()  # a stage's unexpected exception stops the process
        except BaseException as exc:
            if item.alone and isinstance(exc, DeviceFailure):
                self.guard.blame()
            # ... and nothing behind the failed batch may be committed on the way out (the
            # revoke in the consumer's close drains): its offsets would skip the failed one.
            self._drop_uncommitted()
            raise
        shadow = self._shadow_outcome(item)
        start = time.perf_counter()
        try:
            produce_s = self.txn.commit(
                [record for _msg, record in result.scored],
                result.rejected,
                next_offsets(item.messages),
                self.source.group_metadata(),
                shadow.records if shadow else (),
            )
        except TransactionAborted:
            self.metrics.transactions.labels("aborted").inc()
            if item.alone:
                self.guard.dropped(item.future)  # replayed: this try was no death
            self._drop_uncommitted()
            return
        self.metrics.transactions.labels("committed").inc()
        self.source.mark_committed(next_offsets(item.messages))
        if item.alone:
            self.guard.settled()
        self.progress.committed(len(item.messages))
        self.health.progressed()
        self.metrics.stage_seconds.labels("produce").observe(produce_s)
        self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - start - produce_s)
        self._count(result)
        if shadow:
            self._count_shadow(result, shadow)
        self._set_inflight_gauge()

    def _shadow_outcome(self, item: InFlight) -> ShadowOutcome | None:
        """The batch's shadow result for its transaction; None when there is no shadow, or it
        is late (counted, and its job cancelled if it has not started)."""
        if item.shadow is None:
            return None
        if not item.shadow.done():
            item.shadow.cancel()
            self.metrics.shadow_events.labels("late").inc(len(item.messages))
            return None
        return item.shadow.result()

    def _count_shadow(self, result: BatchResult, shadow: ShadowOutcome) -> None:
        """The shadow's outcomes, and how it compares with the primary on the events both
        scored (once per committed batch)."""
        events = self.metrics.shadow_events
        events.labels("scored").inc(len(shadow.records))
        events.labels("duplicate").inc(shadow.duplicates)
        events.labels("failed").inc(shadow.failed)
        primary = {record.event_id: record for _msg, record in result.scored}
        for record in shadow.records:
            if (mine := primary.get(record.event_id)) is not None:
                self.metrics.shadow_difference.observe(record.popularity - mine.popularity)
                agree = "true" if record.is_hit == mine.is_hit else "false"
                self.metrics.shadow_agreement.labels(agree).inc()

    def _drain(self, timeout_s: float) -> None:
        """Finish and commit every batch in hand within ``timeout_s``, else drop the rest."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            item = self.inflight[0]
            head = item.future
            wait_futures([head], timeout=max(0.0, deadline - time.monotonic()))
            if item.shadow is not None and head.done():
                # The shadow gets its usual wait (within the grace), then the batch commits.
                left = max(0.0, deadline - time.monotonic())
                wait_futures([item.shadow], timeout=min(self.settings.shadow_wait_ms / 1000, left))
                item.shadow_wait_from = -math.inf
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
        for item in self.inflight:
            if item.shadow is not None:
                item.shadow.cancel()  # not started: no shadow work for a batch that replays
            if item.alone:
                self.guard.dropped(item.future)  # its try was no death: taken back when done
        running = [future for future in self._orphans if not future.done()]
        self._orphans = running + [item.future for item in self.inflight]
        self.inflight.clear()
        self._alone.clear()
        self.batcher.take()
        self._needs_rewind = True
        self._drops += 1
        self._set_inflight_gauge()

    # --- rebalances -----------------------------------------------------------------------

    def _on_revoke(self, gone: set[Partition]) -> None:
        """We still own ``gone``: finish and commit what is in hand, or drop it uncommitted."""
        self._drain(self.settings.shutdown_grace_s)
        self.batcher.discard(lambda msg: partition_of(msg) not in gone)
        self._alone = deque(msg for msg in self._alone if partition_of(msg) not in gone)
        self.guard.forget(gone)

    def _on_lost(self, gone: set[Partition]) -> None:
        """``gone`` already belongs to someone else: nothing of it may be committed."""
        log.warning("partitions lost: %s; dropping uncommitted work", sorted(gone))
        self._stop_writes.set()  # the dropped batches' Redis retries give up, as on a drain
        self._stop_writes = threading.Event()
        self._drop_uncommitted()
        self.guard.forget(gone)

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
        in_hand = sum(len(item.messages) for item in self.inflight)
        in_hand += len(self.batcher) + len(self._alone)
        self.metrics.inflight.set(in_hand)

    def _idle(self) -> bool:
        return not self.inflight and len(self.batcher) == 0 and not self._alone

    def _waiting(self) -> bool:
        """Records wait to be committed: some are in hand, or a partition is not read to its
        end (after an abort's rewind, say)."""
        if self._yielded:  # paused for live on purpose: not stuck (/healthz stays green)
            return False
        return bool(self.source.assignment) and not (self._idle() and self.source.caught_up())

    def _executor(
        self, workers: int, name: str, initializer: Callable[[], None] | None = None
    ) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=initializer)
        # At exit only dropped batches' jobs can still be queued (a clean stop has committed
        # everything): cancel them rather than fetch, decode and score them first.
        self._stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        return pool

    def _redis_probe(self) -> BackgroundCheck:
        """PING on a client of its own with a short timeout, on a thread of its own: /readyz
        reads the last answer."""
        s = self.settings
        client = connect(s.redis_url.get_secret_value(), s.redis_cluster, PROBE_TIMEOUT_S)
        self._stack.callback(close_redis, client)

        def ping() -> str | None:
            try:
                client.ping()
            except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                return str(exc)
            return None

        check = BackgroundCheck(ping).start()
        self._stack.callback(check.close)
        return check

    def _readiness(self) -> tuple[bool, str]:
        if not self.health.model_loaded:
            return False, "model not loaded"
        if not self.source.assignment:
            return False, "no partitions assigned"
        if self.source.kafka_problem:
            return False, f"kafka unreachable: {self.source.kafka_problem}"
        if problem := self._redis_check.problem():
            return False, f"redis unreachable: {problem}"
        if self.redis_sink.failing:  # it answers PING but refuses writes (OOM, READONLY)
            return False, f"redis refusing writes: {self.redis_sink.failing}"
        return True, "ready"

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batches in hand", signum)
        self.running = False
