"""A record that kills the consumer process costs that record alone (real Kafka and Redis).

The death is real: the audio server below SIGKILLs the consumer process when it is asked for
the poison's audio, as a native crash in a codec or the OOM killer would kill it in the middle
of that record. Nothing in the consumer knows. Before the crash journal, every restart read the
same batch and died again, and the partition stopped for ever.
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
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
import redis
from confluent_kafka import Message, Producer
from redis.cluster import RedisCluster

from consumer.cluster_sink import ClusterRedisSink
from consumer.crashguard import Alone, CrashGuard
from consumer.errors import DeadLetter
from consumer.redis_client import close, connect
from consumer.sinks import RedisSink
from schemas import ScoreRecord
from schemas.dead_letter import HEADER_REASON
from schemas.redis_keys import crash_journal_key
from tests.chaos.harness import CHAOS_KAFKA, KillingAudioServer
from tests.integration.conftest import ROOT, read_all
from tests.integration.test_service import write_tone

pytestmark = pytest.mark.integration
EVENTS = 24
POISON = 5


@dataclass
class Victim:
    """The consumer process being watched (one at a time)."""

    proc: "subprocess.Popen[bytes] | None" = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []


@pytest.fixture
def victim() -> Victim:
    return Victim()


@pytest.fixture
def audio_server(tmp_path: Path, victim: Victim) -> Iterator[KillingAudioServer]:
    tone = write_tone(tmp_path / "tone.wav", seconds=3.0, rate=22_050).read_bytes()
    with KillingAudioServer(tone, victim.pids) as server:
        yield server


def test_a_record_that_kills_the_process_is_dead_lettered_and_the_rest_scored(
    consumer_env: dict[str, str], audio_server: KillingAudioServer, victim: Victim, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **consumer_env,
        "POPSCORE_AUDIO_ALLOW_PRIVATE_HOSTS": "true",
        "POPSCORE_SHUTDOWN_GRACE_S": "5",
        # A dead member holds its partitions for the session timeout (45 s by default).
        "POPSCORE_KAFKA_PROPERTIES": json.dumps(CHAOS_KAFKA),
    }
    tracks = [f"crash-{uuid.uuid4().hex[:8]}-{i}" for i in range(EVENTS)]
    send(env, tracks, audio_server.url)
    deaths: list[int] = []
    logs = []
    deadline = time.monotonic() + 240
    while True:
        logs.append(tmp_path / f"consumer-{len(logs)}.log")
        proc = start(env, logs[-1])
        victim.proc = proc
        try:
            if proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0:
                break  # read to its end
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"not done in 240 s: a record holds its partition; deaths: {deaths}")
        deaths.append(proc.returncode)
    out = consumer_env["POPSCORE_OUTPUT_TOPIC"]
    scored = [
        ScoreRecord.model_validate_json(m.value())
        for m in read_all(env["POPSCORE_KAFKA_BOOTSTRAP"], out, EVENTS - 1)
    ]
    dead = read_all(env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_DLQ_TOPIC"], 1)
    # Killed on its first try in a batch, then on each of its POPSCORE_CRASH_LIMIT (2) tries
    # alone; the third start dead-letters it without fetching it and reads to the end.
    assert deaths == [-signal.SIGKILL] * 3, deaths
    assert audio_server.kills == ["/poison.wav"] * 3
    assert Counter(r.track_id for r in scored) == Counter(
        t for i, t in enumerate(tracks) if i != POISON
    )
    assert len(dead) == 1
    headers = dict(dead[0].headers())
    assert headers[HEADER_REASON] == b"process_crashed"
    assert json.loads(dead[0].value())["track_id"] == tracks[POISON]
    after_first = logs[1].read_text()
    assert "were in hand when its last consumer stopped without committing them" in after_first


def send(env: dict[str, str], tracks: list[str], url: str) -> None:
    producer = Producer({"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"]})
    for i, track in enumerate(tracks):
        audio = f"{url}/poison.wav" if i == POISON else f"{url}/{track}.wav"
        event = {
            "event_id": str(uuid.uuid4()),
            "track_id": track,
            "emitted_at": datetime.now(UTC).isoformat(),
            "audio_uri": audio,
        }
        producer.produce(env["POPSCORE_INPUT_TOPIC"], json.dumps(event).encode(), track.encode())
    assert producer.flush(30) == 0


def start(env: dict[str, str], log: Path) -> "subprocess.Popen[bytes]":
    command = [sys.executable, "-m", "popscore", "consume", "--stop-at-end"]
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=out)


# --- the journal itself, on the real Redis ------------------------------------------------


@pytest.fixture
def journal(redis_client: redis.Redis) -> Iterator[tuple[CrashGuard, str, str]]:
    group, topic = f"g-{uuid.uuid4().hex[:8]}", "t"
    sink = RedisSink(redis_client)
    guard = CrashGuard(redis_client, group, topic, limit=2, retry=sink.retrying)
    yield guard, group, topic
    redis_client.delete(crash_journal_key(group, topic))


def msg(partition: int, offset: int) -> Message:
    return Message(topic="t", partition=partition, offset=offset, value=b"{}")


def test_journal_names_what_was_in_hand_and_counts_tries_alone(
    journal: tuple[CrashGuard, str, str], redis_client: redis.Redis
) -> None:
    guard, group, topic = journal
    stop = threading.Event()
    guard.mark([msg(0, 10), msg(0, 11), msg(1, 3)], None, stop, {("t", 0): 10, ("t", 1): 2})
    guard.mark([msg(0, 12)], None, stop, {("t", 0): 11})
    guard.mark([msg(0, 4)], None, stop, {("t", 0): 4})  # rewound: the highest offset stays
    key = crash_journal_key(group, topic)
    assert redis_client.hgetall(key) == {b"0": b"12", b"0:low": b"11", b"1": b"3", b"1:low": b"2"}
    assert 0 < redis_client.ttl(key) <= 30 * 86_400

    # The next owner (a new process) starts where the group committed: 11 on partition 0.
    owner = CrashGuard(redis_client, group, topic, 2, RedisSink(redis_client).retrying)
    assert owner.suspects([msg(0, 11), msg(0, 12), msg(0, 13), msg(1, 4)])
    assert [owner.suspect(msg(0, o)) for o in (11, 12, 13)] == [True, True, False]
    assert not owner.suspect(msg(1, 4))  # partition 1 was committed past 3
    first = owner.verdict(msg(0, 11))
    assert first == Alone("0:alone", "11:1", "")
    owner.mark([msg(0, 11)], first, stop)
    assert redis_client.hget(key, "0:alone") == b"11:1"

    # It died with 11 alone; the next owner tries it once more, the one after dead-letters it.
    again = CrashGuard(redis_client, group, topic, 2, RedisSink(redis_client).retrying)
    assert again.suspects([msg(0, 11)])
    second = again.verdict(msg(0, 11))
    assert second == Alone("0:alone", "11:2", "11:1")
    assert again.verdict(msg(0, 12)) == Alone("0:alone", "12:1", "")
    again.mark([msg(0, 11)], second, stop)
    last = CrashGuard(redis_client, group, topic, 2, RedisSink(redis_client).retrying)
    assert last.suspects([msg(0, 11)])
    verdict = last.verdict(msg(0, 11))
    assert isinstance(verdict, DeadLetter) and verdict.reason.value == "process_crashed"
    # Once a batch after it is marked, the record alone was committed: its field goes.
    last.mark([msg(0, 12)], None, stop)
    assert redis_client.hget(key, "0:alone") is None


def test_a_clean_stop_takes_its_try_back(
    journal: tuple[CrashGuard, str, str], redis_client: redis.Redis
) -> None:
    guard, group, topic = journal
    key = crash_journal_key(group, topic)
    stop = threading.Event()
    redis_client.hset(key, mapping={"0": "7", "0:alone": "7:1"})
    assert guard.suspects([msg(0, 7)])
    alone = guard.verdict(msg(0, 7))
    assert isinstance(alone, Alone)
    guard.mark([msg(0, 7)], alone, stop)
    assert redis_client.hget(key, "0:alone") == b"7:2"
    guard.forgive()
    assert redis_client.hget(key, "0:alone") == b"7:1"
    guard.forgive()  # nothing pending: nothing changes
    assert redis_client.hget(key, "0:alone") == b"7:1"


def test_a_dropped_try_is_taken_back_once_its_stages_are_done(
    journal: tuple[CrashGuard, str, str], redis_client: redis.Redis
) -> None:
    """A partition lost (or a drain past the grace) while a record is alone: the process goes
    on, so the try was no death; but a death while the dropped batch still runs counts."""
    guard, group, topic = journal
    key = crash_journal_key(group, topic)
    redis_client.hset(key, mapping={"0": "7", "0:alone": "7:1"})
    assert guard.suspects([msg(0, 7)])
    alone = guard.verdict(msg(0, 7))
    assert isinstance(alone, Alone)
    guard.mark([msg(0, 7)], alone, threading.Event())
    running: Future[None] = Future()
    guard.dropped(running)
    guard.tidy()
    assert redis_client.hget(key, "0:alone") == b"7:2"  # its stages may still die on it
    running.set_result(None)
    guard.tidy()
    assert redis_client.hget(key, "0:alone") == b"7:1"
    guard.forgive()  # taken back once only
    assert redis_client.hget(key, "0:alone") == b"7:1"


def test_a_stale_or_unreadable_journal_names_nothing(
    journal: tuple[CrashGuard, str, str], redis_client: redis.Redis
) -> None:
    guard, group, topic = journal
    key = crash_journal_key(group, topic)
    # Its last consumer had committed partition 0 up to 900: reading from 5 is a recreated
    # topic's, or offsets reset by hand. Partition 1 was committed up to 0; partition 2's
    # journal has no low mark (written by the first version): taken as it is. Aborted
    # transactions upstream leave gaps of any size: the distance does not matter.
    redis_client.hset(key, mapping={"0": "1000", "0:low": "900", "1": "5000", "1:low": "0",
                                    "2": "10"})  # fmt: skip
    assert not guard.suspects([msg(0, 5)])
    assert guard.suspects([msg(1, 0)]) and guard.suspect(msg(1, 5000))
    assert guard.suspects([msg(2, 3)]) and guard.suspect(msg(2, 10))
    redis_client.delete(key)
    redis_client.set(key, "not a hash")
    other = CrashGuard(redis_client, group, topic, 2, RedisSink(redis_client).retrying)
    assert not other.suspects([msg(0, 0)])  # logged, not raised
    other.mark([msg(0, 0)], None, threading.Event())  # logged, not raised: the batch goes on
    assert redis_client.get(key) == b"not a hash"


def test_limit_zero_is_off(redis_client: redis.Redis) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    guard = CrashGuard(redis_client, group, "t", 0, RedisSink(redis_client).retrying)
    guard.mark([msg(0, 3)], None, threading.Event())
    assert not redis_client.exists(crash_journal_key(group, "t"))
    redis_client.hset(crash_journal_key(group, "t"), "0", "3")
    assert not guard.suspects([msg(0, 3)])
    redis_client.delete(crash_journal_key(group, "t"))


def test_journal_on_redis_cluster(redis_cluster_url: str) -> None:
    """The same script calls through the cluster client (one key: one slot)."""
    client = connect(redis_cluster_url, cluster=True)
    sink = ClusterRedisSink(cast(RedisCluster, client))
    group = f"g-{uuid.uuid4().hex[:8]}"
    try:
        CrashGuard(client, group, "t", 2, sink.retrying).mark(
            [msg(0, 5), msg(1, 9)], None, threading.Event(), {("t", 0): 4}
        )
        owner = CrashGuard(client, group, "t", 2, sink.retrying)
        assert owner.suspects([msg(0, 4), msg(0, 5)])
        alone = owner.verdict(msg(0, 5))
        assert alone == Alone("0:alone", "5:1", "")
        owner.mark([msg(0, 5)], alone, threading.Event())
        assert client.hgetall(crash_journal_key(group, "t")) == {
            b"0": b"5",
            b"0:low": b"4",
            b"1": b"9",
            b"1:low": b"9",
            b"0:alone": b"5:1",
        }
        owner.forgive()
        assert client.hget(crash_journal_key(group, "t"), "0:alone") is None
    finally:
        client.delete(crash_journal_key(group, "t"))
        close(client)
