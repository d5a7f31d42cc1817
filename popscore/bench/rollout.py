"""The costs of rolling out a model, measured side by side in one invocation:

- ``shadow``: the end-to-end maximum with and without a shadow model (the primary's weights
  under another version, so the extra work is exactly one more model on the same audio);
- ``backfill``: live events at a fixed rate alone, then the same rate while a backfill process
  (``popscore backfill run``: nice 10, yielding to the live group) re-scores a catalog;
- ``promote``: ``popscore promote`` of a version's scores of N tracks into the view.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer.errors import UsageError
from consumer.kafka import consumer_config, ensure_topics
from consumer.redis_client import with_database
from consumer.rollout import promote
from consumer.settings import Settings
from consumer.sinks import RedisSink
from popscore.artifact import load, resave
from popscore.bench import e2e
from popscore.bench.stats import ModeResult
from schemas.events import ReleaseEvent
from schemas.scores import ScoreRecord

BACKFILL_START_S = 15.0  # torch import, model load, group join: before live is measured


def shadow_copy(model: Path, folder: Path) -> Path:
    """The primary artifact again under another model_version."""
    artifact = load(model)
    meta = artifact.meta.replace(model_version=f"{artifact.meta.model_version}-shadow")
    return resave(artifact.module, folder / "shadow.pt", meta)


def shadow(base: Settings, plain: Settings, events: list[ReleaseEvent]) -> ModeResult:
    """The e2e maximum with a shadow model beside the primary (``plain`` names its topics)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = shadow_copy(base.model, Path(folder))
        topic = f"{plain.output_topic}-shadow"
        ensure_topics(plain.kafka_config("admin"), [topic], 3)
        settings = plain.model_copy(update={"shadow_model": copy, "shadow_topic": topic})
        return e2e.run(settings, events, None, "e2e_shadow_max")


def backfill(
    alone: Settings,
    beside: Settings,
    live: tuple[list[ReleaseEvent], list[ReleaseEvent]],
    catalog: list[ReleaseEvent],
    rate: float,
) -> list[ModeResult]:
    """Live at ``rate`` alone, then beside a backfill process over ``catalog``."""
    results = [e2e.run(alone, live[0], rate, "live_alone")]
    topic = f"{beside.input_topic}-backfill"
    admin = beside.kafka_config("admin")
    ensure_topics(admin, [topic], 8)
    producer = e2e.warmed_producer(beside.kafka_config("producer"), admin, topic)
    e2e.send(producer, topic, catalog, None)
    ensure_topics(admin, [beside.input_topic], 3)
    process = _backfill_process(beside, topic)
    try:
        time.sleep(BACKFILL_START_S)
        started = time.time()
        with_backfill = e2e.run(beside, live[1], rate, "live_with_backfill")
        ended = time.time()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()  # gone before the bench deletes its topics (auto-create)
            process.communicate()
            raise
    during = _records_between(beside, f"{beside.output_topic}-backfill", started, ended)
    with_backfill.notes["backfill"] = {
        "events_scored": _scored(out),
        "events_scored_during_live_run": during,
        "events_per_s_during_live_run": round(during / (ended - started), 3),
        "nice": 10,
    }
    return [*results, with_backfill]


def _records_between(settings: Settings, topic: str, start: float, end: float) -> int:
    """Committed records of ``topic`` whose Kafka timestamps lie in [start, end] (epoch s)."""
    config = consumer_config(settings.kafka_config("consumer"), f"bench-count-{uuid.uuid4().hex}")
    reader = Consumer(config)
    try:
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        count, at_end = 0, set[int]()
        while len(at_end) < len(parts):
            msg = reader.poll(5.0)
            if msg is None:
                break
            if msg.error():
                at_end.add(int(msg.partition() or 0))
                continue
            count += start * 1000 <= msg.timestamp()[1] <= end * 1000
        return count
    finally:
        reader.close()


def _backfill_process(live: Settings, topic: str) -> "subprocess.Popen[str]":
    env = {
        **os.environ,
        "POPSCORE_KAFKA_BOOTSTRAP": live.kafka_bootstrap,
        "POPSCORE_REDIS_URL": live.redis_url.get_secret_value(),
        "POPSCORE_AUDIO_FILE_ROOTS": ",".join(str(p) for p in live.audio_file_roots),
        "POPSCORE_DEVICE": live.device,
        "POPSCORE_BATCH_SIZE": str(live.batch_size),
        "POPSCORE_DECODE_WORKERS": str(live.decode_workers),
        "POPSCORE_INPUT_TOPIC": live.input_topic,  # what the backfill yields to
        "POPSCORE_GROUP_ID": live.group_id,
        "POPSCORE_OUTPUT_TOPIC": live.output_topic,  # the backfill's: this name + "-backfill"
        "POPSCORE_DLQ_TOPIC": live.dlq_topic,
    }
    command = [sys.executable, "-m", "popscore", "--log-level", "WARNING", "backfill", "run",
               "--model", str(live.model), "--topic", topic, "--group", f"{live.group_id}-bf",
               "--http-port", "0", "--nice", "10", "--follow"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _scored(output: str) -> int:
    """The events the backfill scored, from its last line (``backfill: N events scored``)."""
    for line in reversed(output.splitlines()):
        if line.startswith("backfill: "):
            return int(line.split()[1])
    return 0


PROMOTE_DB = 15  # a scratch database: a promotion sets the pointer for its whole database


def promotion_database(settings: Settings) -> redis.Redis:
    """Database PROMOTE_DB of the settings' Redis, refused unless empty (never someone else's
    data: it is emptied after the run, once it is the run's) or on a cluster (no databases).
    Checked before the run's first mode."""
    if settings.redis_cluster:
        raise UsageError("--modes promote: needs a single Redis node (a cluster has no databases)")
    url = with_database(settings.redis_url.get_secret_value(), PROMOTE_DB)
    client = redis.Redis.from_url(url, socket_timeout=60)
    if held := client.dbsize():
        client.close()
        raise UsageError(
            f"--modes promote: Redis database {PROMOTE_DB} holds {held} keys; it runs there and "
            "empties it after, so it must start empty"
        )
    return client


def promotion(settings: Settings, tracks: int) -> ModeResult:
    """``popscore promote`` of ``tracks`` tracks (one day): the switch's time and rate, in
    Redis database PROMOTE_DB, which must be empty (refused otherwise) and is emptied after."""
    client = promotion_database(settings)
    try:
        sink, stop = RedisSink(client), threading.Event()
        when = datetime(2026, 11, 30, 12, tzinfo=UTC)
        for start in range(0, tracks, 500):
            ids = [f"t{i}" for i in range(start, min(start + 500, tracks))]
            for version, primary in (("old", True), ("new", False)):
                records = [_record(version, track, when) for track in ids]
                sink.write(records, [f"bench/0/{track}" for track in ids], stop, primary)
        began = time.perf_counter()
        done = promote(client, "new")
        seconds = time.perf_counter() - began
    finally:
        client.flushdb()
        client.close()
    return ModeResult(
        mode="promote",
        events=done.tracks_replaced,
        seconds=seconds,
        notes={"tracks": tracks, "days": done.days, "tracks_per_s": round(tracks / seconds)},
    )


def _record(version: str, track: str, when: datetime) -> ScoreRecord:
    return ScoreRecord(
        event_id=f"e-{track}", track_id=track, model_version=version, popularity=50.0,
        hit_probability=0.5, is_hit=False, audio_used=True, emitted_at=when,
        scored_at=when, latency_ms=0.0,
    )  # fmt: skip
