"""Chaos harness: a corpus of good and bad events, supervised consumer processes, and the
exactly-once audit of what reached the results topic, Redis and the DLQ.

Consumers run as real ``python -m popscore consume`` processes; a supervisor restarts any that
exit (as Kubernetes would), except the ones a scenario kills for good.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf

from consumer.redis_client import AnyRedis, keys_for
from popscore.cli import produce
from schemas import ScoreRecord
from schemas.dead_letter import HEADER_REASON
from tests.integration.conftest import ROOT, committed_and_end, read_all

FORMATS = (("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG"), ("mp3", "MP3"))
BAD_EVERY = 50
# Short timeouts so a killed member's partitions and its open transaction are released
# in seconds, not the production defaults' minute.
CHAOS_KAFKA = {  # each reaches only its kind of client: no CONFWARN lines in the logs
    "consumer.session.timeout.ms": "6000",
    "consumer.heartbeat.interval.ms": "1500",
    "producer.transaction.timeout.ms": "10000",
}


@dataclass
class Corpus:
    """What was sent: good events by id, and the exact bytes of every bad one with its reason."""

    good: dict[str, str] = field(default_factory=dict)  # event_id -> track_id
    bad: dict[bytes, str] = field(default_factory=dict)  # value -> expected reason


def write_audio_files(folder: Path, n: int = 8) -> list[str]:
    """A few short real audio files in each format; events point at them round-robin."""
    uris = []
    for i in range(n):
        ext, fmt = FORMATS[i % len(FORMATS)]
        t = np.arange(3 * 22_050) / 22_050
        wave = (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32)[:, None]
        path = folder / f"chaos-{i}.{ext}"
        with sf.SoundFile(path, "w", 22_050, 1, format=fmt) as f:
            for start in range(0, len(wave), 22_050):
                f.write(wave[start : start + 22_050])
        uris.append(path.as_uri())
    return uris


def make_corpus(n: int, folder: Path) -> tuple[Corpus, list[tuple[bytes, bytes]]]:
    """n records, every BAD_EVERY-th one bad in one of three ways."""
    uris = write_audio_files(folder)
    tag = uuid.uuid4().hex[:6]
    corpus, records = Corpus(), []
    for i in range(n):
        track = f"chaos-{tag}-{i:05d}"
        if i % BAD_EVERY == BAD_EVERY - 1:
            value, reason = _bad_value(i, track, folder)
            corpus.bad[value] = reason
        else:
            event_id = f"{track}-e"
            corpus.good[event_id] = track
            value = _event(event_id, track, uris[i % len(uris)])
        records.append((track.encode(), value))
    return corpus, records


def _event(event_id: str, track: str, uri: str) -> bytes:
    doc = {
        "event_id": event_id,
        "track_id": track,
        "audio_uri": uri,
        "emitted_at": datetime.now(UTC).isoformat(),
        "artist": {"followers": 1000 + len(track), "popularity": 50},
    }
    return json.dumps(doc).encode()


def _bad_value(i: int, track: str, folder: Path) -> tuple[bytes, str]:
    kind = (i // BAD_EVERY) % 3
    if kind == 0:
        return f"{{not json {i}".encode(), "invalid_json"
    if kind == 1:
        return _event(f"{track}-e", track, "file:///etc/passwd"), "uri_forbidden"
    return _event(f"{track}-e", track, (folder / f"missing-{i}.wav").as_uri()), "audio_fetch_failed"


class Supervisor:
    """Runs consumer processes and restarts any that exit unless told they are gone for good."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.retired: set[str] = set()
        self.restarts = 0
        self.exit_codes: list[int] = []  # of the exits the supervisor restarted from
        self.ports: dict[str, int] = {}

    def start(self, name: str, port: int) -> None:
        env = {
            **os.environ,
            **self.env,
            "POPSCORE_HTTP_PORT": str(port),
            "POPSCORE_TRANSACTIONAL_ID": f"{self.env['POPSCORE_GROUP_ID']}-{name}",
        }
        with (self.log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own fd
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "popscore", "--log-level", "WARNING", "consume"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.ports[name] = port

    def kill(self, name: str, for_good: bool = False) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()
        if for_good:
            self.retired.add(name)

    def tick(self) -> None:
        """Restart exited consumers (a crash loop is the orchestrator's job, not ours)."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None and name not in self.retired:
                self.restarts += 1
                self.exit_codes.append(proc.returncode)
                self.start(name, self.ports[name])

    def stop_all(self) -> None:
        # An exit after the last tick() was not restarted; record it too.
        self.exit_codes += [
            proc.returncode
            for name, proc in self.procs.items()
            if proc.poll() is not None and name not in self.retired
        ]
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def all_committed(env: dict[str, str]) -> bool:
    committed, ends = committed_and_end(
        env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_GROUP_ID"], env["POPSCORE_INPUT_TOPIC"]
    )
    return [max(c, 0) for c in committed] == ends


@dataclass
class Audit:
    """The result of one chaos run; every count but ``events`` must be 0."""

    events: int
    lost: int
    duplicated: int
    missing_in_redis: int
    dlq_wrong: int
    duplicates: list[str] = field(default_factory=list)
    """Each duplicated event's results: (partition, offset, scored_at), for the failure's
    message (when and where each copy was written tells which consumer wrote it)."""

    def line(self, name: str) -> str:
        return (
            f"chaos[{name}]: events={self.events} lost={self.lost} "
            f"duplicated={self.duplicated} missing_in_redis={self.missing_in_redis} "
            f"dlq_wrong={self.dlq_wrong}"
        )


def audit(env: dict[str, str], corpus: Corpus, client: AnyRedis) -> Audit:
    bootstrap = env["POPSCORE_KAFKA_BOOTSTRAP"]
    results = read_all(bootstrap, env["POPSCORE_OUTPUT_TOPIC"], len(corpus.good))
    copies: dict[str, list[tuple[int, int, str]]] = {}
    for m in results:
        record = ScoreRecord.from_json(m.value())
        copies.setdefault(record.event_id, []).append(
            (m.partition(), m.offset(), record.scored_at.isoformat())
        )
    seen = Counter({event_id: len(rows) for event_id, rows in copies.items()})
    lost = sum(1 for event_id in corpus.good if seen[event_id] == 0)
    duplicated = sum(count - 1 for count in seen.values() if count > 1)
    duplicated += sum(1 for event_id in seen if event_id not in corpus.good)
    duplicates = [
        f"{event_id} {rows}"
        for event_id, rows in copies.items()
        if len(rows) > 1 or event_id not in corpus.good
    ]
    pipe = client.pipeline()
    for track in corpus.good.values():
        pipe.hget(keys_for(client).score(track), "event_id")
    stored = pipe.execute()
    missing = sum(
        1
        for (event_id, _t), got in zip(corpus.good.items(), stored, strict=True)
        if got is None or got.decode() != event_id
    )
    dead = read_all(bootstrap, env["POPSCORE_DLQ_TOPIC"], len(corpus.bad))
    got_dead = Counter((m.value(), dict(m.headers())[HEADER_REASON].decode()) for m in dead)
    expected_dead = Counter(corpus.bad.items())
    dlq_wrong = sum(((got_dead - expected_dead) + (expected_dead - got_dead)).values())
    return Audit(
        len(corpus.good) + len(corpus.bad), lost, duplicated, missing, dlq_wrong, duplicates
    )


def send(env: dict[str, str], records: list[tuple[bytes, bytes]]) -> None:
    produce.send(
        {"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"]},
        env["POPSCORE_INPUT_TOPIC"],
        iter(records),
        len(records),
    )


def wait_until(condition, timeout_s: float, tick=None) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick:
            tick()
        if condition():
            return True
        time.sleep(0.5)
    return False


def scored_count(client: AnyRedis, corpus: Corpus) -> int:
    pipe = client.pipeline()
    for track in corpus.good.values():
        pipe.exists(keys_for(client).score(track))
    return sum(pipe.execute())


def pid_of_peer(port: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the loopback TCP socket whose local port is ``port`` (the
    client end of a connection to us): its inode in /proc/net/tcp, then the process whose
    descriptors name it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """The peer was killed mid-request, by design: no traceback on stderr."""


class KillingAudioServer:
    """Serves ``tone`` for any path; a request for a path with ``poison`` in it kills the
    process that asked (SIGKILL, before the answer), among ``pids()``: a codec that crashes on
    that record, as a real one would, in whichever consumer holds it."""

    def __init__(self, tone: bytes, pids: Callable[[], Iterable[int]]) -> None:
        self.kills: list[str] = []
        self.unattributed = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "poison" in self.path:
                    pid = pid_of_peer(self.client_address[1], pids())
                    if pid is None:
                        server.unattributed += 1
                    else:
                        server.kills.append(self.path)
                        os.kill(pid, signal.SIGKILL)
                        return
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(tone)))
                self.end_headers()
                self.wfile.write(tone)

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "KillingAudioServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def poison(corpus: Corpus, records: list[tuple[bytes, bytes]], url: str, count: int) -> None:
    """Turn ``count`` good events, spread over the run, into ones whose audio kills the
    consumer that fetches it: each is expected in the DLQ as ``process_crashed``."""
    for n in range(count):
        i = (n + 1) * len(records) // (count + 1)
        while _event_id(records[i][1]) not in corpus.good:
            i += 1
        key, value = records[i]
        doc = json.loads(value)
        del corpus.good[doc["event_id"]]
        doc["audio_uri"] = f"{url}/poison-{n}.wav"
        value = json.dumps(doc).encode()
        corpus.bad[value] = "process_crashed"
        records[i] = (key, value)


def _event_id(value: bytes) -> str | None:
    try:
        return str(json.loads(value)["event_id"])
    except (ValueError, KeyError, TypeError):
        return None
