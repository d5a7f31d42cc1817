"""The service end to end against the real Kafka broker and Redis (docs/INTERFACE.md)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
import soundfile as sf
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from consumer.app import App
from consumer.errors import ConfigError
from consumer.settings import load_settings
from popscore.cli import produce
from schemas import ReleaseEvent, ScoreRecord, score_key
from schemas.dead_letter import HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from tests.conftest import free_port
from tests.integration.conftest import ROOT, committed_and_end, read_all

pytestmark = pytest.mark.integration


def run_until_caught_up(env: dict[str, str]) -> App:
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    with App(settings, stop_at_end=True) as app:
        app.run()
    return app


def test_stop_at_end_on_a_topic_that_does_not_exist_fails_start_up(
    consumer_env: dict[str, str],
) -> None:
    """No partition of it is ever assigned, so none is ever read to its end: it waited for
    ever. The check creates nothing (the broker auto-creates topics on a producer's request)."""
    missing = consumer_env["POPSCORE_INPUT_TOPIC"] + "-missing"
    with pytest.raises(ConfigError, match=f"^POPSCORE_INPUT_TOPIC: topic '{missing}' does not"):
        run_until_caught_up({**consumer_env, "POPSCORE_INPUT_TOPIC": missing})
    admin = AdminClient({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]})
    assert missing not in admin.list_topics(timeout=10).topics


def produce_synthetic(env: dict[str, str], n: int, seed: int) -> list[ReleaseEvent]:
    out = Path(env["POPSCORE_AUDIO_FILE_ROOTS"])
    events = list(produce.synthetic_events(n, seed, out, min_s=3.0, max_s=12.0))
    config = {"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"]}
    produce.send(config, env["POPSCORE_INPUT_TOPIC"], produce.event_records(iter(events)))
    return events


def assert_all_committed(env: dict[str, str]) -> None:
    committed, ends = committed_and_end(
        env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_GROUP_ID"], env["POPSCORE_INPUT_TOPIC"]
    )
    assert [max(c, 0) for c in committed] == ends


def test_n_events_in_n_results_n_hashes_offsets_committed(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    events = produce_synthetic(consumer_env, 12, seed=int(time.time()))
    app = run_until_caught_up(consumer_env)

    results = read_all(
        consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_OUTPUT_TOPIC"], 12
    )
    records = [ScoreRecord.from_json(m.value()) for m in results]
    assert sorted(r.event_id for r in records) == sorted(e.event_id for e in events)
    assert all(m.key().decode() == ScoreRecord.from_json(m.value()).track_id for m in results)
    for event in events:
        stored = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert stored.event_id == event.event_id
        assert 0 <= stored.popularity <= 100 and stored.audio_used
    day = events[0].emitted_at.astimezone(UTC).date().isoformat()
    board = {m.decode() for m in redis_client.zrange(f"popscore:leaderboard:{day}", 0, -1)}
    assert {e.track_id for e in events} <= board
    assert_all_committed(consumer_env)
    get = app.metrics.registry.get_sample_value
    assert get("popscore_events_total", {"outcome": "scored"}) == 12
    for stage in ("fetch", "decode", "frontend", "inference", "redis", "produce", "commit"):
        assert (get("popscore_stage_seconds_count", {"stage": stage}) or 0) > 0, stage


def write_tone(path: Path, seconds: float = 4.0, rate: int = 44_100) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)
    return path


def event_json(track: str, uri: str, **extra: object) -> bytes:
    doc = {
        "event_id": str(uuid.uuid4()),
        "track_id": track,
        "emitted_at": datetime.now(UTC).isoformat(),
        "audio_uri": uri,
        **extra,
    }
    return json.dumps(doc).encode()


def test_bad_inputs_go_to_the_dlq_with_reasons_and_the_rest_is_scored(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    tag = uuid.uuid4().hex[:8]
    good = [f"good-{tag}-{i}" for i in range(5)]
    uris = [write_tone(audio / f"{t}.wav").as_uri() for t in good]
    (audio / "noise.mp3").write_bytes(os.urandom(5000))
    bad = {
        b"{this is not json": "invalid_json",
        json.dumps(
            {"event_id": "x", "track_id": f"bad-{tag}-1", "emitted_at": "2026-11-27T00:00:00Z"}
        ).encode(): "invalid_event",
        event_json(f"bad-{tag}-2", "file:///etc/passwd"): "uri_forbidden",
        event_json(f"bad-{tag}-3", (audio / "missing.wav").as_uri()): "audio_fetch_failed",
        event_json(f"bad-{tag}-4", (audio / "noise.mp3").as_uri()): "audio_decode_failed",
    }
    values: list[bytes] = []
    for i, bad_value in enumerate(bad):
        values += [event_json(good[i], uris[i], artist={"followers": 1000 * i}), bad_value]
    config = {"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]}
    produce.send(config, consumer_env["POPSCORE_INPUT_TOPIC"], iter([(b"k", v) for v in values]))

    app = run_until_caught_up(consumer_env)

    dead = read_all(consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_DLQ_TOPIC"], 5)
    got = {m.value(): dict(m.headers()) for m in dead}
    assert set(got) == set(bad), "the DLQ holds exactly the bad records, bytes untouched"
    for value, headers in got.items():
        assert headers[HEADER_REASON].decode() == bad[value]
        assert headers[HEADER_TOPIC].decode() == consumer_env["POPSCORE_INPUT_TOPIC"]
        assert int(headers[HEADER_PARTITION]) >= 0 and int(headers[HEADER_OFFSET]) >= 0
    for track in good:
        assert redis_client.exists(score_key(track))
    results = read_all(
        consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_OUTPUT_TOPIC"], 5
    )
    assert sorted(ScoreRecord.from_json(m.value()).track_id for m in results) == sorted(good)
    get = app.metrics.registry.get_sample_value
    assert get("popscore_events_total", {"outcome": "dead_lettered"}) == 5
    assert get("popscore_dead_letters_total", {"reason": "uri_forbidden"}) == 1
    assert_all_committed(consumer_env)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_redis_that_never_answers_gets_quick_probe_answers(consumer_env: dict[str, str]) -> None:
    """A Redis that takes connections and answers nothing (a hung node, a frozen proxy): the
    probes used to PING it in the handler and time out (liveness too, which restarts every pod
    at once). Now /readyz says why at once and /healthz stays 200."""
    produce_synthetic(consumer_env, 1, seed=7)  # the topic, so that partitions get assigned
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)  # connections complete in the backlog; nothing is ever read or sent
    port = free_port()
    env = {**os.environ, **consumer_env, "POPSCORE_HTTP_PORT": str(port),
           "POPSCORE_REDIS_URL": f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "popscore", "consume"], env=env, cwd=ROOT,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        answers: list[tuple[int, str]] = []

        def unready_for_redis() -> bool:
            started = time.monotonic()
            try:
                answers.append(http_get(port, "/readyz"))
            except OSError:  # not listening yet
                return False
            assert time.monotonic() - started < 1.5, "a probe waited on Redis"
            return answers[-1][1].startswith("redis unreachable")

        wait_for(unready_for_redis, 120, "/readyz naming Redis")
        assert answers[-1][0] == 503
        assert http_get(port, "/healthz") == (200, "ok\n")
    finally:
        proc.kill()
        proc.wait(30)
        black_hole.close()


def test_sigterm_mid_stream_then_restart_scores_every_event(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    n = 40
    events = produce_synthetic(consumer_env, n, seed=int(time.time()) + 1)
    port = free_port()
    env = {
        **os.environ,
        **consumer_env,
        "POPSCORE_HTTP_PORT": str(port),
        "POPSCORE_BATCH_SIZE": "4",
    }
    proc = subprocess.Popen([sys.executable, "-m", "popscore", "consume"], env=env, cwd=ROOT)
    try:
        tracks = [e.track_id for e in events]
        wait_for(
            lambda: any(redis_client.exists(score_key(t)) for t in tracks), 120, "the first score"
        )
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/readyz") == (200, "ready\n")
        status, body = http_get(port, "/metrics")
        assert status == 200 and 'popscore_events_total{outcome="scored"}' in body
        assert "popscore_model_info{" in body and 'synthetic="true"' in body  # the demo model
        assert 'cpu_optimized="true"' in body  # served optimised on this CPU
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before_restart = sum(bool(redis_client.exists(score_key(t))) for t in tracks)
    assert done_before_restart > 0, "the first process scored something before SIGTERM"

    run_until_caught_up(consumer_env)

    for event in events:
        stored = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert stored.event_id == event.event_id
    results = read_all(
        consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_OUTPUT_TOPIC"], n
    )
    assert {ScoreRecord.from_json(m.value()).event_id for m in results} == {
        e.event_id for e in events
    }
    assert_all_committed(consumer_env)


def test_a_dead_letter_too_large_to_copy_is_sent_without_its_value(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    # The broker takes records up to ~1 MiB, librdkafka's producer only 1,000,000 bytes: a bad
    # record in between cannot be copied to the DLQ. It used to abort its batch over and over.
    from consumer.replay import Selection, replay
    from schemas.dead_letter import HEADER_VALUE_OMITTED

    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    track = f"after-big-{uuid.uuid4().hex[:8]}"
    big = b"{" + b"x" * 1_010_000  # not JSON, under POPSCORE_MAX_EVENT_BYTES
    good = event_json(track, write_tone(audio / "after.wav").as_uri())
    producer = Producer({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"],
                         "message.max.bytes": 1_040_000})  # fmt: skip
    trace = [("traceparent", b"00-4bf92f3577b34da6-00f067aa0ba902b7-01")]
    producer.produce(consumer_env["POPSCORE_INPUT_TOPIC"], big, b"k", headers=trace)
    producer.produce(consumer_env["POPSCORE_INPUT_TOPIC"], good, b"k")
    assert producer.flush(30) == 0

    run_until_caught_up(consumer_env)

    bootstrap = consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]
    [dead] = read_all(bootstrap, consumer_env["POPSCORE_DLQ_TOPIC"], 1)
    headers = dict(dead.headers())
    assert dead.value() is None
    assert int(headers[HEADER_VALUE_OMITTED]) == len(big)
    assert headers[HEADER_REASON] == b"invalid_json"
    assert int(headers[HEADER_OFFSET]) >= 0  # where the original still lies
    assert headers["traceparent"] == trace[0][1], "the original's own headers are kept"
    assert redis_client.exists(score_key(track)), "the record behind it was scored"
    assert_all_committed(consumer_env)
    settings = load_settings(
        **{k.removeprefix("POPSCORE_").lower(): v for k, v in consumer_env.items()}
    )
    dlq, source = consumer_env["POPSCORE_DLQ_TOPIC"], consumer_env["POPSCORE_INPUT_TOPIC"]
    count = replay(settings, dlq, source, Selection(None, None, None), dry_run=True)
    assert (count.value_omitted, sum(count.replayed.values())) == (1, 0)
