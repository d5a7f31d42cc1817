"""``popscore produce``: publish ReleaseEvents from a JSONL file, or synthesized with real audio.

Synthetic releases are labelled so (``synth-`` track ids); their audio files are written to a
folder that the consumer must list in ``POPSCORE_AUDIO_FILE_ROOTS``.
"""

import argparse
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from consumer.errors import SinkError, UsageError
from consumer.kafka import client, ensure_topics, produce, producer_config
from consumer.settings import Settings
from popscore.cli.argtypes import (
    Subparsers,
    existing_file,
    finite_positive_float,
    int_at_least,
    kafka_topic,
    positive_int,
    writable_dir,
)
from schemas.events import ReleaseEvent

FORMATS = ("MP3", "FLAC", "OGG", "WAV", "M4A")
SAMPLE_RATES = (22_050, 44_100, 48_000)
Record = tuple[bytes | None, bytes]


def register(sub: Subparsers) -> None:
    """Add ``produce``."""
    parser = sub.add_parser("produce", help="publish ReleaseEvents to the input topic")
    parser.set_defaults(handler=_produce)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic", type=positive_int, metavar="N", help="synthesize N releases with real audio"
    )
    source.add_argument("--file", type=existing_file, help="a JSONL file, one event per line")
    parser.add_argument("--topic", type=kafka_topic, help="default: POPSCORE_INPUT_TOPIC")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument(
        "--out-dir",
        type=Path,  # checked only with --synthetic, the one that writes there
        default=Path(".demo/audio"),
        help="where synthetic audio files are written (made if missing)",
    )
    parser.add_argument("--min-seconds", type=finite_positive_float, default=5.0)
    parser.add_argument("--max-seconds", type=finite_positive_float, default=240.0)
    parser.add_argument(
        "--partitions",
        type=positive_int,
        default=3,
        help="partitions of the topic when it must be created",
    )


def _produce(args: argparse.Namespace, settings: Settings) -> int:
    topic = args.topic or settings.input_topic
    if args.synthetic and args.min_seconds > args.max_seconds:
        raise UsageError("--min-seconds must not exceed --max-seconds")
    if args.synthetic:
        _check_out_dir(args.out_dir)
    ensure_topics(settings.kafka_config("admin"), [topic], args.partitions, replication=-1)
    config = settings.kafka_config("producer")
    if args.synthetic:
        # Every audio file exists before the first event is sent, as on a real platform; so
        # emitted_at → scored latency measures the service, not the synthesizer.
        events = list(
            synthetic_events(
                args.synthetic, args.seed, args.out_dir, args.min_seconds, args.max_seconds
            )
        )
        sent = send(config, topic, event_records(iter(events)), len(events))
        print(f"sent {sent} synthetic events to {topic}; audio in {args.out_dir.resolve()}")
    else:
        sent = send(config, topic, jsonl_records(args.file))
        print(f"sent {sent} events from {args.file} to {topic}")
    return 0


def _check_out_dir(out_dir: Path) -> None:
    """The given folder or the default, only when it is used (not with --file)."""
    try:
        writable_dir(str(out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)  # what access() cannot tell (/proc, quotas)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--out-dir: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--out-dir: cannot make {out_dir}: {exc.strerror}") from None


@dataclass(frozen=True)
class SyntheticSpec:
    """How to draw one synthetic release's audio file."""

    index: int
    seconds: float
    sample_rate: int
    channels: int
    fmt: str


def draw_specs(n: int, seed: int, min_s: float, max_s: float) -> list[SyntheticSpec]:
    """Formats, rates and channel counts cycle so any n >= 30 covers every combination."""
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
    from popscore.training import synthetic

    rng = np.random.default_rng([seed, spec.index])
    track = synthetic.sample_track(rng)
    audio = synthetic.synth_audio(rng, spec.seconds, spec.sample_rate, spec.channels, track.params)
    track_id = f"synth-{seed}-{spec.index:05d}"
    path = (out_dir / f"{track_id}{synthetic.FILE_SUFFIXES[spec.fmt]}").resolve()
    synthetic.write_audio(path, audio, spec.sample_rate, spec.fmt)
    return synthetic.release_event(track, track_id, path.as_uri(), spec.seconds)


def synthetic_events(
    n: int, seed: int, out_dir: Path, min_s: float = 5.0, max_s: float = 240.0, workers: int = 2
) -> Iterator[ReleaseEvent]:
    """Synthesize n releases (encoding runs on threads: libsndfile releases the GIL)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = draw_specs(n, seed, min_s, max_s)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(lambda spec: synthesize(spec, seed, out_dir), specs)
        yield from tqdm(jobs, total=n, desc="synthesize audio", unit="file")


def jsonl_records(path: Path) -> Iterator[Record]:
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


def event_records(events: Iterator[ReleaseEvent]) -> Iterator[Record]:
    """Kafka (key, value) for each event: key = track id, ``emitted_at`` = the moment it is sent
    (the platform publishes a release once its audio exists, not while it is being made)."""
    for event in events:
        sent = event.model_copy(update={"emitted_at": datetime.now(UTC)})
        yield sent.track_id.encode(), sent.encode()


def send(
    config: dict[str, Any], topic: str, records: Iterator[Record], total: int | None = None
) -> int:
    """Produce every record, wait for all delivery reports; returns the count delivered."""
    producer = client(lambda: Producer(producer_config(config)))
    failures: list[str] = []

    def report(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    count = 0
    for key, value in tqdm(records, total=total, desc=f"produce → {topic}", unit="event"):
        produce(producer, topic, value, key, on_delivery=report)
        producer.poll(0)
        count += 1
    if producer.flush(30) or failures:
        raise SinkError(f"delivery failed: {failures[:1] or 'flush timed out'}")
    return count
