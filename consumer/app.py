"""The service: wires settings, source, pipeline and sinks, and runs the loop.

    while running:
        poll a micro-batch → pipeline (parse, decode, score) → Redis → results + DLQ → commit

Offsets are committed only after Redis and the Kafka sinks confirmed the batch. SIGTERM and
SIGINT set a flag: the batch in hand is finished, flushed and committed before exit.
"""

import logging
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType

import redis
from confluent_kafka import Message

from consumer.audio import AudioPolicy
from consumer.batcher import MicroBatcher
from consumer.device import Scorer
from consumer.health import Health, HealthServer
from consumer.metrics import OUTCOME_DEAD_LETTERED, OUTCOME_SCORED, Metrics
from consumer.pipeline import BatchResult, Pipeline
from consumer.settings import Settings
from consumer.sinks import KafkaSink, RedisSink
from consumer.source import KafkaSource
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5
# The demo prints the records of its run; a long-running service keeps only the latest.
STATS_KEPT = 10_000


@dataclass
class RunStats:
    """What this process did, for the demo's table and summary."""

    started: float = field(default_factory=time.monotonic)
    scored: deque[ScoreRecord] = field(default_factory=lambda: deque(maxlen=STATS_KEPT))
    dead_letters: dict[str, int] = field(default_factory=dict)
    first_event_at: float | None = None
    last_write_at: float | None = None


class App:
    """One consumer process. Use as a context manager; ``run`` returns when asked to stop."""

    def __init__(self, settings: Settings, stop_at_end: bool = False) -> None:
        self.settings = settings
        self.stop_at_end = stop_at_end
        self.metrics = Metrics()
        self.health = Health()
        self.stats = RunStats()
        self.running = True
        self._stack = ExitStack()

    def __enter__(self) -> "App":
        s = self.settings
        self.scorer = Scorer(s.model, s.device)
        meta, device = self.scorer.meta, str(self.scorer.device)
        self.metrics.model_info.labels(meta.model_version, device).set(1)
        self.health.model_loaded = True
        policy = AudioPolicy.create(
            s.audio_file_roots,
            s.audio_allow_private_hosts,
            s.audio_max_bytes,
            s.audio_max_seconds,
            s.audio_fetch_timeout_s,
        )
        pool = self._stack.enter_context(ThreadPoolExecutor(s.decode_workers, "decode"))
        self.pipeline = Pipeline(self.scorer, policy, pool, self.metrics)
        self.redis = redis.Redis.from_url(
            s.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5
        )
        self._stack.callback(self.redis.close)
        self.redis_sink = RedisSink(self.redis, s.redis_ttl_s)
        self.kafka_sink = KafkaSink(s.kafka_common(), s.output_topic, s.dlq_topic)
        self._stack.callback(self.kafka_sink.close)
        batcher = MicroBatcher(s.batch_size, s.batch_wait_ms / 1000.0)
        self.source = KafkaSource(
            s.kafka_common(), s.group_id, s.input_topic, batcher, self.metrics
        )
        self._stack.callback(self.source.close)
        self.health.readiness = self._readiness
        self.http = HealthServer(s.http_port, self.metrics.registry, self.health).start()
        self._stack.callback(self.http.close)
        log.info("serving /metrics, /healthz, /readyz on port %d", self.http.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batch in hand, then leave the loop."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def run(self) -> None:
        """The main loop; returns after a stop signal (or at the end, with ``stop_at_end``)."""
        while self.running:
            self.health.beat()
            messages = self.source.poll_batch(IDLE_POLL_S)
            if messages:
                self._handle(messages)
            self.source.refresh_lag(force=not messages)
            if self.stop_at_end and self.source.caught_up():
                log.info("all assigned partitions read to the end; stopping")
                break

    def _handle(self, messages: list[Message]) -> None:
        if self.stats.first_event_at is None:
            self.stats.first_event_at = time.monotonic()
        self.metrics.inflight.set(len(messages))
        result = self.pipeline.run(messages)
        self._write(result)
        with self._timed("commit"):
            self.source.commit(messages)
        self.metrics.inflight.set(0)
        self._count(result)

    def _write(self, result: BatchResult) -> None:
        with self._timed("redis"):
            self.redis_sink.write(result.scored)
        written_at = datetime.now(UTC)
        for record in result.scored:
            self.metrics.e2e_latency.observe((written_at - record.emitted_at).total_seconds())
        with self._timed("produce"):
            self.kafka_sink.write_scores(result.scored)
            self.kafka_sink.write_dead_letters(result.rejected)
            self.kafka_sink.flush()
        self.stats.last_write_at = time.monotonic()

    def _count(self, result: BatchResult) -> None:
        if result.scored:
            self.metrics.batch_size.observe(len(result.scored))
        self.metrics.events.labels(OUTCOME_SCORED).inc(len(result.scored))
        self.metrics.events.labels(OUTCOME_DEAD_LETTERED).inc(len(result.rejected))
        for item in result.rejected:
            reason = item.error.reason.value
            self.metrics.dead_letters.labels(reason).inc()
            self.stats.dead_letters[reason] = self.stats.dead_letters.get(reason, 0) + 1
            log.warning(
                "dead-lettered %s[%s]@%s: %s",
                item.message.topic(),
                item.message.partition(),
                item.message.offset(),
                item.error,
            )
        self.stats.scored.extend(result.scored)

    def _timed(self, stage: str) -> "_StageTimer":
        return _StageTimer(self.metrics, stage)

    def _readiness(self) -> tuple[bool, str]:
        if not self.health.model_loaded:
            return False, "model not loaded"
        if not self.source.assignment:
            return False, "no partitions assigned"
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return False, f"redis unreachable: {exc}"
        return True, "ready"

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: finishing the batch in hand", signum)
        self.running = False


class _StageTimer:
    def __init__(self, metrics: Metrics, stage: str) -> None:
        self.metrics, self.stage = metrics, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.metrics.stage_seconds.labels(self.stage).observe(time.perf_counter() - self.start)
