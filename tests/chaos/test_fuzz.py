"""Fuzz the whole path: a seeded mix of valid and hostile records (values, keys, headers,
audio files, URIs) into a real one-partition topic, one real consumer process.

Invariants: every valid record is scored; every record has exactly one outcome (a score or a
dead letter); the process stays up (it exits only when told to, with 0); its peak RSS stays
under RSS_BOUND_MB. ``make test`` sends FUZZ_RECORDS (160) records; ``make chaos`` 2,000,
appending its figures to CHAOS_REPORT.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from confluent_kafka import KafkaError, Message, Producer

from consumer.kafka import ensure_topics
from schemas import ScoreRecord
from schemas.dead_letter import HEADER_OFFSET, HEADER_REASON
from tests.integration.conftest import ROOT, read_all
from tests.unit.av_helpers import declaring, encode

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
FUZZ_RECORDS = int(os.environ.get("FUZZ_RECORDS", "160"))
RSS_BOUND_MB = 2048.0
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None, bool]


def test_fuzz_valid_and_hostile_records(consumer_env: dict[str, str], tmp_path: Path) -> None:
    seed = int(os.environ.get("FUZZ_SEED", str(time.time_ns() % 2**31)))
    rng = random.Random(seed)
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    files = Files(audio, rng)
    records = [random_record(rng, files, i) for i in range(FUZZ_RECORDS)]
    topic = consumer_env["POPSCORE_INPUT_TOPIC"] + "-fuzz"  # deleted with the fixture's topics
    ensure_topics({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]}, [topic], 1)
    env = {**os.environ, **consumer_env, "POPSCORE_INPUT_TOPIC": topic}
    offsets = send(env, topic, records)

    started = time.monotonic()
    with (tmp_path / "consumer.log").open("wb") as log:  # the child keeps its own descriptor
        command = [sys.executable, "-m", "popscore", "--log-level", "ERROR", "consume"]
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        peak_mb, outcomes = watch(proc, env, len(records), timeout_s=120 + 0.5 * len(records))
        assert proc.poll() is None, f"the consumer exited ({proc.returncode}): {seed=}"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    elapsed = time.monotonic() - started
    assert code == 0, f"{seed=}"

    by_offset = {offset: i for i, offset in enumerate(offsets)}
    seen: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    for kind, key in outcomes:
        if kind == "scored":
            seen[event_index(key)] += 1
        else:
            index = by_offset[int(key.split(":")[1])]
            seen[index] += 1
            reasons[key.split(":")[0]] += 1
    assert all(seen[i] == 1 for i in range(len(records))), (
        f"{seed=}: records without exactly one outcome: "
        f"{[(i, seen[i]) for i in range(len(records)) if seen[i] != 1][:10]}"
    )
    scored = {event_index(key) for kind, key in outcomes if kind == "scored"}
    must = {i for i, record in enumerate(records) if record[3]}
    assert must <= scored, f"{seed=}: valid records not scored: {sorted(must - scored)[:10]}"
    assert peak_mb < RSS_BOUND_MB, f"{seed=}: peak RSS {peak_mb:.0f} MB"
    line = (f"fuzz[seed={seed}]: records={len(records)} valid={len(must)} scored={len(scored)} "
            f"dead_lettered={dict(sorted(reasons.items()))} peak_rss_mb={peak_mb:.0f} "
            f"seconds={elapsed:.0f}")  # fmt: skip
    print(line)
    if report := os.environ.get("CHAOS_REPORT"):
        with open(report, "a") as out:
            out.write(line + "\n")


def watch(
    proc: subprocess.Popen[bytes], env: dict[str, str], n: int, timeout_s: float
) -> tuple[float, list[tuple[str, str]]]:
    """Peak RSS of the consumer (VmHWM) and the outcomes, once there are n or the time is up."""
    deadline = time.monotonic() + timeout_s
    bootstrap = env["POPSCORE_KAFKA_BOOTSTRAP"]
    outcomes: list[tuple[str, str]] = []
    peak = 0.0
    while time.monotonic() < deadline and proc.poll() is None:
        peak = max(peak, vm_hwm_mb(proc.pid))
        scored = read_all(bootstrap, env["POPSCORE_OUTPUT_TOPIC"], 0, timeout_s=5)
        dead = read_all(bootstrap, env["POPSCORE_DLQ_TOPIC"], 0, timeout_s=5)
        outcomes = [("scored", ScoreRecord.from_json(m.value()).event_id) for m in scored]
        outcomes += [("dead", dead_key(m)) for m in dead]
        if len(outcomes) >= n:
            break
        time.sleep(1)
    return max(peak, vm_hwm_mb(proc.pid)), outcomes


def dead_key(msg: Message) -> str:
    headers = dict(msg.headers() or [])
    return f"{headers[HEADER_REASON].decode()}:{int(headers[HEADER_OFFSET])}"


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def send(env: dict[str, str], topic: str, records: list[Record]) -> list[int]:
    """Produce in order; returns each record's offset (one partition)."""
    producer = Producer({"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"],
                         "message.max.bytes": 1_040_000, "enable.idempotence": True})  # fmt: skip
    offsets: list[int] = [-1] * len(records)

    def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            offsets[index] = msg.offset() or 0

        return report

    for i, (key, value, headers, _valid) in enumerate(records):
        producer.produce(topic, value, key, headers=headers, on_delivery=delivered(i))
        producer.poll(0)
    assert producer.flush(60) == 0
    return offsets


# --- the records ------------------------------------------------------------------------------


class Files:
    """Audio files under the consumer's root: good ones in every format, and hostile ones."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        kinds = (("wav", "WAV", 22_050, 1), ("flac", "FLAC", 44_100, 2),
                 ("ogg", "OGG", 48_000, 2), ("mp3", "MP3", 44_100, 1))  # fmt: skip
        self.good = [tone(root / f"good.{ext}", fmt, rate, ch) for ext, fmt, rate, ch in kinds]
        wide = tone(root / "wide.flac", "FLAC", 192_000, 8)
        self.good.append(wide)  # valid, if unusual: must be scored
        for name in ("m4a", "webm"):  # decoded by FFmpeg
            self.good.append(write(root / f"good.{name}", encode(ffmpeg_tone(), 48_000, name)))
        flac = (root / "good.flac").read_bytes()
        m4a = (root / "good.m4a").read_bytes()
        self.hostile = [
            write(root / "truncated.m4a", m4a[: len(m4a) // 2]),
            write(root / "declaring.m4a", declaring(20_000_000)),
            write(root / "empty.wav", b""),
            write(root / "noise.ogg", rng.randbytes(4096)),
            write(root / "truncated.flac", flac[: len(flac) // 3]),
            write(root / "header-only.mp3", (root / "good.mp3").read_bytes()[:200]),
            lying_wav(root / "lying.wav"),
            fifo(root / "pipe.wav"),
            (root / "missing.wav").as_uri(),
        ]


def tone(path: Path, fmt: str, rate: int, channels: int, seconds: float = 2.0) -> str:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.repeat((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[:, None], channels, 1)
    with sf.SoundFile(path, "w", rate, channels, format=fmt) as f:
        for start in range(0, len(wave), rate):  # 1 s blocks: libsndfile's Vorbis encoder
            f.write(wave[start : start + rate])
    return path.as_uri()


def ffmpeg_tone(seconds: float = 2.0, rate: int = 48_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None, :], 2, 0)


def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return path.as_uri()


def lying_wav(path: Path) -> str:
    """A WAV header that claims an hour of 8-channel audio over a few bytes of data."""
    frames = 3600 * 48_000
    size = frames * 8 * 2
    header = (b"RIFF" + (36 + size).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
              + (48_000).to_bytes(4, "little") + (48_000 * 16).to_bytes(4, "little")
              + (16).to_bytes(2, "little") + (16).to_bytes(2, "little")
              + b"data" + size.to_bytes(4, "little"))  # fmt: skip
    return write(path, header + bytes(64))


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return path.as_uri()


def event_index(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


def random_record(rng: random.Random, files: Files, i: int) -> Record:
    """One record: half valid events on good audio, half hostile in one of many ways, with
    keys and headers as strange as the values."""
    key = rng.choice([f"track-{i}".encode(), None, rng.randbytes(rng.randint(0, 64)),
                      b"k" * rng.choice([1, 5000])])  # fmt: skip
    headers = None
    if rng.random() < 0.3:
        names = ["traceparent", "x-\u00e9\u00e8", "popscore.error.reason", "h"]
        count = rng.randint(1, 20)
        headers = [(rng.choice(names), rng.randbytes(rng.randint(0, 40))) for _ in range(count)]
    if rng.random() < 0.5:
        return key, valid_event(rng, i, rng.choice(files.good)), headers, True
    value, valid = rng.choice(HOSTILE)(rng, i, files)
    return key, value, headers, valid


def doc(i: int, uri: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"fuzz-{uuid.uuid4().hex[:8]}-{i}", "track_id": f"fuzz-track-{i}",
            "emitted_at": datetime.now(UTC).isoformat(), "audio_uri": uri, **extra}  # fmt: skip


def valid_event(rng: random.Random, i: int, uri: str) -> bytes:
    extra: dict[str, Any] = {}
    if rng.random() < 0.5:
        followers = rng.choice([0, 12, 10**9, 10**400])
        name = "\u2603" * rng.randint(0, 80)
        extra["artist"] = {"followers": followers, "popularity": rng.uniform(0, 100), "name": name}
    if rng.random() < 0.3:
        extra["unknown_field"] = {"nested": [1, 2, {"x": None}]}
    return json.dumps(doc(i, uri, **extra)).encode()


def _garbage(rng: random.Random, i: int, files: Files) -> tuple[bytes | None, bool]:
    return rng.choice([rng.randbytes(rng.randint(0, 300)), None, b"[]", b"42", b'"s"',
                       b"{" * 5000, b'{"event_id": ']), False  # fmt: skip


def _bad_fields(rng: random.Random, i: int, files: Files) -> tuple[bytes, bool]:
    d = doc(i, rng.choice(files.good))
    field, value = rng.choice([
        ("artist", {"followers": "12"}), ("artist", {"popularity": 300}), ("event_id", ""),
        ("track_id", "x" * 500), ("schema_version", 2), ("release", {"date": "2024-02-30"}),
        ("audio_uri", None), ("engagement", {"streams": -1}),
    ])  # fmt: skip
    return json.dumps({**d, field: value}).encode(), False


def _bad_time(rng: random.Random, i: int, files: Files) -> tuple[bytes, bool]:
    when = rng.choice(["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+14:00",
                       (datetime.now(UTC) + timedelta(days=400)).isoformat(),
                       "2026-11-27T10:00:00", "yesterday"])  # fmt: skip
    return json.dumps({**doc(i, rng.choice(files.good)), "emitted_at": when}).encode(), False


def _bad_uri(rng: random.Random, i: int, files: Files) -> tuple[bytes, bool]:
    uri = rng.choice(["file:///etc/passwd", "http://127.0.0.1:1/a.wav", "http://[::1/a.wav",
                      "ftp://example.com/a.mp3", "http://[64:ff9b::7f00:1]/a.wav", "",
                      "http://0177.0.0.1/", f"file://{files.root}/../../etc/hosts",
                      "file://otherhost/a.wav", "s3://bucket/key.mp3"])  # fmt: skip
    return json.dumps(doc(i, uri)).encode(), False


def _bad_audio(rng: random.Random, i: int, files: Files) -> tuple[bytes, bool]:
    return json.dumps(doc(i, rng.choice(files.hostile))).encode(), False


def _huge(rng: random.Random, i: int, files: Files) -> tuple[bytes, bool]:
    if rng.random() < 0.5:  # over POPSCORE_MAX_EVENT_BYTES, under the broker's limit
        return b"{" + b" " * 1_020_000, False
    return json.dumps(doc(i, rng.choice(files.good), pad="x" * 200_000)).encode(), True


HOSTILE = (_garbage, _bad_fields, _bad_time, _bad_uri, _bad_audio, _huge)
