"""Mode (c), the naive reference consumer: what a first version would do, one message at a time.

poll one message → decode the WHOLE file → mono → resample all of it → crop the centred window →
score it alone with the same artifact → write Redis → produce the score → flush → commit.
No batching, no seek, no overlap. Kept as the yardstick the real consumer is measured against.
"""

import threading
import time

import numpy as np
import redis
import soundfile as sf
import torch
import torchaudio
from confluent_kafka import Consumer, Producer

from consumer.audio import AudioPolicy, open_uri
from consumer.device import Scorer
from consumer.kafka import client, ensure_topics
from consumer.mixdown import mix_down
from consumer.pipeline import score_record
from consumer.settings import Settings
from consumer.sinks import RedisSink
from consumer.source import record_id
from popscore.artifact.features import extract
from popscore.bench.e2e import Recorder, assigned, send, wait_assigned, warmed_producer
from popscore.bench.stats import ModeResult, peak_rss_mb, reset_peak_rss
from schemas.events import ReleaseEvent
from schemas.scores import ScoreRecord, utc_now


def centre_crop(wave: np.ndarray, samples: int) -> np.ndarray:
    """The centred ``samples`` of ``wave``, zero-padded at the end when shorter."""
    out = np.zeros(samples, dtype=np.float32)
    start = max(0, (wave.shape[0] - samples) // 2)
    piece = wave[start : start + samples]
    out[: piece.shape[0]] = piece
    return out


def score_message(value: bytes, scorer: Scorer, policy: AudioPolicy) -> ScoreRecord:
    """One Kafka value to its ScoreRecord, the naive way (the whole file is decoded)."""
    meta = scorer.meta
    event = ReleaseEvent.from_json(value)
    with open_uri(event.audio_uri, policy) as source:
        data, rate = sf.read(source, dtype="float32", always_2d=True)  # every frame of the file
    mono = torch.from_numpy(mix_down(data))  # the service's mixdown: the ratio is architecture
    with torch.inference_mode():
        if rate != meta.sample_rate:
            mono = torchaudio.functional.resample(mono, rate, meta.sample_rate)
    wave = centre_crop(mono.numpy(), round(meta.sample_rate * meta.clip_seconds))
    feats = extract(event.model_dump(), meta.features)
    scores = scorer.score(wave[None], feats[None], np.ones(1, dtype=bool))
    return score_record(event, meta, scores, 0, utc_now(), audio_used=True)


def run(
    settings: Settings,
    scorer: Scorer,
    policy: AudioPolicy,
    events: list[ReleaseEvent],
    partitions: int = 3,
    timeout_s: float = 900.0,
) -> ModeResult:
    """Consume ``events`` (sent at once after the group join) one at a time; all are written."""
    s = settings
    ensure_topics(s.kafka_config("admin"), [s.input_topic, s.output_topic], partitions)
    # A first version's own client settings, not consumer.kafka's builders: the yardstick.
    naive_config = {
        **s.kafka_config("consumer"),
        "group.id": s.group_id,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    }
    consumer = client(lambda: Consumer(naive_config))
    producer = client(lambda: Producer({**s.kafka_config("producer"), "linger.ms": 0}))
    redis_client = redis.Redis.from_url(s.redis_url.get_secret_value(), socket_timeout=10)
    sink = RedisSink(redis_client, s.redis_ttl_s, s.dedupe_ttl_s)
    recorder = Recorder(len(events), "naive consumer")
    never = threading.Event()
    score_message(events[0].encode(), scorer, policy)  # warm-up, as for the other modes
    try:
        consumer.subscribe([s.input_topic])
        wait_assigned(lambda: assigned(consumer), "naive")
        sender = warmed_producer(s.kafka_config("producer"), s.kafka_config("admin"), s.input_topic)
        reset_peak_rss()
        first = send(sender, s.input_topic, events, None)
        deadline = time.monotonic() + timeout_s
        while not recorder.done.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"naive: {len(recorder.latencies)}/{len(events)} written")
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            record = score_message(msg.value() or b"", scorer, policy)
            sink.write([record], [record_id(msg)], never)
            recorder.written([record])
            producer.produce(s.output_topic, record.encode(), record.track_id.encode())
            producer.flush(30)
            consumer.commit(message=msg, asynchronous=False)
    finally:
        recorder.close()
        consumer.close()
        redis_client.close()
    return ModeResult(
        mode="naive",
        events=len(events),
        seconds=recorder.last_write - first,
        latencies_s=recorder.latencies,
        peak_rss_mb=peak_rss_mb(),
        notes={"offered": "all at once"},
    )
