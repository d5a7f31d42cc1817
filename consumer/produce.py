"""``popscore produce``: publish ReleaseEvents — from a JSONL file or synthesized with real audio.

Synthetic releases are labelled so (``synth-`` track ids); their audio files are written to a
folder that the consumer must list in ``POPSCORE_AUDIO_FILE_ROOTS``.
"""

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer
from tqdm import tqdm

from consumer.errors import SinkError
from consumer.kafkalog import librdkafka_logger
from schemas.events import ReleaseEvent
from training.synthetic import sample_track, synth_audio, write_audio

FORMATS = ("MP3", "FLAC", "OGG", "WAV")
SUFFIX = {"MP3": ".mp3", "FLAC": ".flac", "OGG": ".ogg", "WAV": ".wav"}
SAMPLE_RATES = (22_050, 44_100, 48_000)


@dataclass(frozen=True)
class SyntheticSpec:
    """How to draw one synthetic release's audio file."""

    index: int
    seconds: float
    sample_rate: int
    channels: int
    fmt: str


def draw_specs(n: int, seed: int, min_s: float, max_s: float) -> list[SyntheticSpec]:
    """Formats, rates and channel counts cycle so any n >= 24 covers every combination."""
    rng = np.random.default_rng(seed)
    seconds = np.exp(rng.uniform(np.log(min_s), np.log(max_s), size=n))
    return [
        SyntheticSpec(
            index=i,
            seconds=round(float(seconds[i]), 2),
            sample_rate=SAMPLE_RATES[(i // len(FORMATS)) % len(SAMPLE_RATES)],
            channels=1 + (i // (len(FORMATS) * len(SAMPLE_RATES))) % 2,
            fmt=FORMATS[i % len(FORMATS)],
        )
        for i in range(n)
    ]


def synthesize(spec: SyntheticSpec, seed: int, out_dir: Path) -> ReleaseEvent:
    """Write the audio file for ``spec`` and return the event that points at it."""
    rng = np.random.default_rng([seed, spec.index])
    track = sample_track(rng)
    audio = synth_audio(rng, spec.seconds, spec.sample_rate, spec.channels, track.params)
    track_id = f"synth-{seed}-{spec.index:05d}"
    path = (out_dir / f"{track_id}{SUFFIX[spec.fmt]}").resolve()
    write_audio(path, audio, spec.sample_rate, spec.fmt)
    features: dict[str, Any] = dict(track.features)
    features.setdefault("release", {})
    features["release"] = {**features["release"], "duration_ms": int(spec.seconds * 1000)}
    return ReleaseEvent.model_validate(
        {
            "event_id": str(uuid.uuid4()),
            "track_id": track_id,
            "emitted_at": datetime.now(UTC),
            "audio_uri": path.as_uri(),
            **features,
        },
        strict=False,
    )


def synthetic_events(
    n: int, seed: int, out_dir: Path, min_s: float = 5.0, max_s: float = 240.0, workers: int = 2
) -> Iterator[ReleaseEvent]:
    """Synthesize n releases (encoding runs on threads: libsndfile releases the GIL)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = draw_specs(n, seed, min_s, max_s)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(lambda spec: synthesize(spec, seed, out_dir), specs)
        yield from tqdm(jobs, total=n, desc="synthesize audio", unit="file")


def jsonl_records(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) per non-blank line, sent as-is so malformed lines can test the DLQ."""
    with path.open("rb") as lines:
        for line in lines:
            value = line.rstrip(b"\r\n")
            if value.strip():
                yield _track_key(value), value


def _track_key(value: bytes) -> bytes | None:
    try:
        track = json.loads(value).get("track_id")
    except (ValueError, AttributeError):
        return None
    return track.encode() if isinstance(track, str) else None


def send(
    config: dict[str, Any],
    topic: str,
    records: Iterator[tuple[bytes | None, bytes]],
    total: int | None = None,
) -> int:
    """Produce every record, wait for all delivery reports; returns the count delivered."""
    producer = Producer(
        {
            **config,
            "enable.idempotence": True,
            "linger.ms": 20,
            "logger": librdkafka_logger("producer"),
        }
    )
    failures: list[str] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    count = 0
    for key, value in tqdm(records, total=total, desc=f"produce → {topic}", unit="event"):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:  # the local queue is full: let deliveries drain, then retry
                producer.poll(0.5)
        producer.poll(0)
        count += 1
    if producer.flush(30) or failures:
        raise SinkError(f"delivery failed: {failures[:1] or 'flush timed out'}")
    return count


def event_records(events: Iterator[ReleaseEvent]) -> Iterator[tuple[bytes | None, bytes]]:
    """Kafka (key, value) for each event: key = track id, ``emitted_at`` = the moment it is sent
    (the platform publishes a release once its audio exists, not while it is being made)."""
    for event in events:
        sent = event.model_copy(update={"emitted_at": datetime.now(UTC)})
        yield sent.track_id.encode(), sent.encode()
