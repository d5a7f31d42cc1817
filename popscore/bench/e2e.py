"""Mode (b), end to end: the real consumer (``consumer.app.App``, in-process) on unique topics.

The App runs its own loop on a thread; this module produces the events (``emitted_at`` = the
moment each is sent) either all at once (max throughput) or at a fixed rate, and records for
every event the time from ``emitted_at`` to its Redis write (the same point the service's
``popscore_e2e_latency_seconds`` observes).
"""

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from consumer.app import App
from consumer.kafka import client, ensure_topics, produce, producer_config
from consumer.metrics import SHADOW_OUTCOMES
from consumer.settings import Settings
from popscore.bench.corpus import stamped
from popscore.bench.stats import CpuUse, ModeResult, peak_rss_mb, reset_peak_rss
from schemas.events import ReleaseEvent
from schemas.scores import ScoreRecord

ASSIGN_TIMEOUT_S = 60.0


class Recorder:
    """Latency of every record at its Redis write, and when the last one was written."""

    def __init__(self, total: int, desc: str) -> None:
        self.latencies: list[float] = []
        self.last_write = 0.0
        self.done = threading.Event()
        self.total = total
        self._lock = threading.Lock()
        self._bar = tqdm(total=total, desc=desc, unit="event")

    def written(self, records: Sequence[ScoreRecord]) -> None:
        now = datetime.now(UTC)
        with self._lock:
            self.latencies += [(now - r.emitted_at).total_seconds() for r in records]
            self.last_write = time.perf_counter()
            self._bar.update(len(records))
            if len(self.latencies) >= self.total:
                self.done.set()

    def close(self) -> None:
        self._bar.close()


def warmed_producer(
    config: dict[str, Any], admin: dict[str, Any], topic: str, rate: float | None = None
) -> Producer:
    """The driver's producer, ready to send: it has delivered one record to a side topic
    (``{topic}-warmup``, created with the ``admin`` config). An idempotent producer's first
    records wait about 0.5 s for its producer id (librdkafka; PR #5032 there); a platform's
    long-lived producer has one, and charging that wait to the service cost 8-10 % of a
    192-event e2e_max run. Make it before the CPU and clock snapshots of a measured run."""
    producer = client(lambda: Producer(producer_config(config, {"linger.ms": 0 if rate else 5})))
    side = f"{topic}-warmup"
    ensure_topics(admin, [side], 1)
    produce(producer, side, b"warm-up")
    if producer.flush(30):
        raise TimeoutError(f"the bench's producer could not deliver to {side} in 30 s")
    return producer


def send(producer: Producer, topic: str, events: list[ReleaseEvent], rate: float | None) -> float:
    """Produce the events (paced at ``rate`` per second, or at once); returns the first send."""
    first = time.perf_counter()
    for i, event in enumerate(events):
        if rate:
            delay = first + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        produce(producer, topic, stamped(event), event.track_id.encode())
        producer.poll(0)
    producer.flush(30)
    return first


def wait_assigned(is_assigned: Callable[[], bool], what: str) -> None:
    """Wait until the consumer holds its partitions (so the group join is not measured)."""
    deadline = time.monotonic() + ASSIGN_TIMEOUT_S
    while not is_assigned():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no partitions assigned in {ASSIGN_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def run(
    settings: Settings,
    events: list[ReleaseEvent],
    rate: float | None,
    mode: str,
    partitions: int = 3,
    timeout_s: float = 600.0,
    on_done: Callable[[], object] | None = None,
) -> ModeResult:
    """Run the App on fresh topics, send ``events``, return when all are written to Redis.
    ``on_done`` runs once they are, before the App stops."""
    s = settings
    ensure_topics(s.kafka_config("admin"), [s.input_topic, s.output_topic, s.dlq_topic], partitions)
    recorder = Recorder(len(events), f"end to end ({mode})")
    app = App(s, stop_at_end=False)
    with app:
        sink = app.redis_sink
        original = sink.write

        def write(records: Any, sources: Any, stop: threading.Event, primary: bool = True) -> Any:
            codes = original(records, sources, stop, primary)
            if primary:  # a shadow model's scores are not the events' results
                recorder.written(records)
            return codes

        sink.write = write  # type: ignore[method-assign]
        # Warm-up outside the measurement: TorchScript's profiling executor optimises on the
        # first calls, and the resampler builds its kernel for the corpus's rate.
        app.pipeline.score_events(events[:1])
        app.pipeline.score_events(events[: s.batch_size])
        loop = threading.Thread(target=app.run, name="bench-app", daemon=True)
        loop.start()
        try:
            wait_assigned(lambda: bool(app.source.assignment), mode)
            producer = warmed_producer(
                s.kafka_config("producer"), s.kafka_config("admin"), s.input_topic, rate
            )
            reset_peak_rss()
            before = stage_totals(app.metrics.registry)
            cpu_before = CpuUse.now()
            first = send(producer, s.input_topic, events, rate)
            finished = recorder.done.wait(timeout_s)
            cpu = CpuUse.now().since(cpu_before)
            if on_done is not None:
                on_done()
            stages = stage_means(before, stage_totals(app.metrics.registry))
        finally:
            app.running = False
            loop.join(timeout=120)
            recorder.close()
        if not finished:
            raise TimeoutError(f"{mode}: {len(recorder.latencies)}/{len(events)} events written")
        rss = peak_rss_mb()
        dead = dict(app.stats.dead_letters)
        shadow = shadow_outcomes(app)
    return ModeResult(
        mode=mode,
        events=len(events),
        seconds=recorder.last_write - first,
        latencies_s=recorder.latencies,
        peak_rss_mb=rss,
        offered_rate=rate,
        notes={
            "stages": stages,
            # The service and this driver in one process; the others are mostly the broker
            # and Redis, which on a production pod run elsewhere.
            "cpu": cpu,
            **({"dead_letters": dead} if dead else {}),
            **({"shadow": shadow} if shadow else {}),
        },
    )


def shadow_outcomes(app: App) -> dict[str, int]:
    """What the shadow model did (scored, failed, late, ...); empty without one."""
    if app.shadow is None:
        return {}
    get = app.metrics.registry.get_sample_value
    counts = {o: get("popscore_shadow_events_total", {"outcome": o}) for o in SHADOW_OUTCOMES}
    return {outcome: int(count or 0) for outcome, count in counts.items()}


def stage_totals(registry: CollectorRegistry) -> dict[str, tuple[float, float]]:
    """(observations, seconds) so far per stage of ``popscore_stage_seconds``."""
    totals: dict[str, list[float]] = {}
    for metric in registry.collect():
        if metric.name != "popscore_stage_seconds":
            continue
        for sample in metric.samples:
            slot = totals.setdefault(sample.labels.get("stage", ""), [0.0, 0.0])
            if sample.name.endswith("_count"):
                slot[0] = sample.value
            elif sample.name.endswith("_sum"):
                slot[1] = sample.value
    return {stage: (count, seconds) for stage, (count, seconds) in totals.items()}


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, dict[str, float]]:
    """What the service's own stage histograms saw between two snapshots: observations, mean
    ms per observation (per event for fetch/decode, per batch for the rest), total seconds."""
    out = {}
    for stage, (count, seconds) in after.items():
        n = count - before.get(stage, (0.0, 0.0))[0]
        total = seconds - before.get(stage, (0.0, 0.0))[1]
        if n > 0:
            out[stage] = {
                "n": int(n),
                "mean_ms": round(1e3 * total / n, 1),
                "total_s": round(total, 2),
            }
    return out


def assigned(consumer: Consumer) -> bool:
    """True once a plain consumer holds at least one partition (polls once)."""
    consumer.poll(0.1)
    return bool(consumer.assignment())
