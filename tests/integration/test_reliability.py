"""Delivery guarantees against the real Kafka and Redis: duplicates, idempotent upserts,
slow batches that outlast max.poll.interval.ms, backpressure."""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import redis
import soundfile as sf

from consumer.app import App
from consumer.errors import DeadLetter, SinkError
from consumer.settings import load_settings
from consumer.sinks import RedisSink, Upsert
from popscore.cli import produce
from schemas import ScoreRecord, score_key
from schemas.dead_letter import DeadLetterReason as Reason
from schemas.redis_keys import (
    MODELS_KEY,
    event_key,
    model_info_key,
    model_leaderboard_key,
    model_score_key,
)
from tests.integration.conftest import committed_and_end, database_url, read_all
from tests.integration.test_service import produce_synthetic

pytestmark = pytest.mark.integration


def settings_from(env: dict[str, str]):  # type: ignore[no-untyped-def]
    fields = {k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()}
    if "kafka_properties" in fields:  # from the environment it is JSON text
        fields["kafka_properties"] = json.loads(fields["kafka_properties"])
    return load_settings(**fields)


def tone_file(folder: Path, name: str, seconds: float = 2.0) -> Path:
    t = np.arange(int(seconds * 22_050)) / 22_050
    path = folder / name
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 22_050)
    return path


def event(event_id: str, track: str, uri: str, emitted: datetime | None = None) -> bytes:
    when = (emitted or datetime.now(UTC)).isoformat()
    doc = {"event_id": event_id, "track_id": track, "emitted_at": when, "audio_uri": uri}
    return json.dumps(doc).encode()


def send(env: dict[str, str], values: list[tuple[bytes, bytes]]) -> None:
    config = {"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"]}
    produce.send(config, env["POPSCORE_INPUT_TOPIC"], iter(values))


def record(event_id: str, track: str, emitted: datetime, popularity: float) -> ScoreRecord:
    return ScoreRecord(
        event_id=event_id,
        track_id=track,
        model_version="m",
        popularity=popularity,
        hit_probability=0.5,
        is_hit=False,
        audio_used=True,
        emitted_at=emitted,
        scored_at=emitted + timedelta(seconds=1),
        latency_ms=1000.0,
    )


def test_redis_upsert_is_idempotent_and_never_goes_back_in_time(
    redis_client: redis.Redis,
) -> None:
    sink, stop = RedisSink(redis_client), threading.Event()
    track = f"upsert-{uuid.uuid4().hex[:8]}"
    t0 = datetime(2026, 11, 27, 12, tzinfo=UTC)
    newer, older = (
        record("e-new", track, t0, 80.0),
        record("e-old", track, t0 - timedelta(hours=1), 20.0),
    )

    assert sink.write([newer], ["in/0/10"], stop) == [Upsert.WRITTEN]
    assert sink.write([older], ["in/0/11"], stop) == [Upsert.STALE]
    assert sink.write([newer], ["in/0/10"], stop) == [Upsert.WRITTEN]  # a replay of the record
    assert sink.write([newer], ["in/1/99"], stop) == [Upsert.DUPLICATE]  # same event, other record
    stored = ScoreRecord.from_redis(redis_client.hgetall(score_key(track)))
    assert (stored.event_id, stored.popularity) == ("e-new", 80.0)
    board = f"popscore:leaderboard:{t0.date().isoformat()}"
    assert redis_client.zscore(board, track) == 80.0


@pytest.fixture
def spare_db(stack: dict[str, str]) -> Iterator[redis.Redis]:
    """A database of its own: these tests plant keys of the wrong type, shared ones included."""
    client = redis.Redis.from_url(database_url(stack, 11))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_a_key_of_the_wrong_type_costs_its_record_alone(spare_db: redis.Redis) -> None:
    """A stray writer's string on one track's hash: that record is dead-lettered naming the key
    (once a Lua script erred, the process used to stop and meet it again after each restart);
    the rest of the batch, before and after it, is written."""
    sink, when = RedisSink(spare_db), datetime(2026, 11, 27, 12, tzinfo=UTC)
    spare_db.set(score_key("t-bad"), "not a hash")
    batch = [record(f"e{i}", f"t-{name}", when, 50.0) for i, name in enumerate(("a", "b", "bad"))]
    batch += [record("e9", "t-c", when, 60.0)]
    codes = sink.write(batch, [f"in/0/{i}" for i in range(4)], threading.Event())
    assert codes[:2] == [Upsert.WRITTEN] * 2 and codes[3] is Upsert.WRITTEN
    assert isinstance(codes[2], DeadLetter) and codes[2].reason is Reason.INTERNAL_ERROR
    assert codes[2].detail == "redis key 'popscore:score:t-bad' holds a string, not a hash"
    for track in ("t-a", "t-b", "t-c"):
        assert ScoreRecord.from_redis(spare_db.hgetall(score_key(track))).track_id == track
    # the dead-lettered record left nothing behind: its keys are read before it writes
    assert not spare_db.exists(model_score_key("m", "t-bad"), event_key("e2", "m"))
    board = model_leaderboard_key("m", when.date())
    assert spare_db.zscore(board, "t-bad") is None and spare_db.zcard(board) == 3
    assert spare_db.hget(model_info_key("m"), "tracks") == b"3"


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (MODELS_KEY, "set"),
        ("popscore:leaderboard:2026-11-27", "zset"),  # the day every record of it writes
        ("popscore:model:m:info", "hash"),
    ],
)
def test_a_key_many_records_write_of_the_wrong_type_stops_the_process_naming_it(
    spare_db: redis.Redis, key: str, kind: str
) -> None:
    """Every record writing it would be dead-lettered: the fault is the store's."""
    sink, stop = RedisSink(spare_db), threading.Event()
    day_before = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert sink.write([record("e0", "t-a", day_before, 40.0)], ["in/0/0"], stop) == [Upsert.WRITTEN]
    spare_db.delete(key)
    spare_db.set(key, "not a " + kind)
    when = datetime(2026, 11, 27, 12, tzinfo=UTC)
    with pytest.raises(SinkError, match=f"'{key}' holds a string, not a {kind}: fix or delete"):
        sink.write([record("e1", "t-a", when, 50.0)], ["in/0/1"], stop)


def test_a_stray_value_on_the_day_a_track_leaves_is_written_past(spare_db: redis.Redis) -> None:
    """The failed script moved the hash off that day before its ZREM failed: tried again
    alone, the record is written (nothing of the stray day is touched)."""
    sink, stop = RedisSink(spare_db), threading.Event()
    day_before, when = (
        datetime(2026, 11, 26, 12, tzinfo=UTC),
        datetime(2026, 11, 27, 12, tzinfo=UTC),
    )
    assert (
        sink.write([record("e0", "t-a", day_before, 40.0)], ["in/0/0"], stop)[0] is Upsert.WRITTEN
    )
    spare_db.delete("popscore:leaderboard:2026-11-26")
    spare_db.set("popscore:leaderboard:2026-11-26", "not a zset")
    assert sink.write([record("e1", "t-a", when, 50.0)], ["in/0/1"], stop) == [Upsert.WRITTEN]
    assert spare_db.zscore("popscore:leaderboard:2026-11-27", "t-a") == 50.0


def test_with_a_ttl_scores_and_their_leaderboard_expire(redis_client: redis.Redis) -> None:
    sink = RedisSink(redis_client, ttl_s=3600)
    track = f"ttl-{uuid.uuid4().hex[:8]}"
    rec = record("e-ttl", track, datetime(2020, 1, 2, tzinfo=UTC), 50.0)
    assert sink.write([rec], ["in/0/1"], threading.Event()) == [Upsert.WRITTEN]
    assert 0 < redis_client.ttl(score_key(track)) <= 3600
    assert 0 < redis_client.ttl("popscore:leaderboard:2020-01-02") <= 3600


def test_same_event_id_twice_is_scored_once_and_emitted_once(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    uri = tone_file(Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"]), "d.wav").as_uri()
    tag = uuid.uuid4().hex[:8]
    twice = event(f"dup-{tag}", f"track-{tag}", uri)
    other = event(f"other-{tag}", f"track2-{tag}", uri)
    send(
        consumer_env,
        [
            (f"track-{tag}".encode(), twice),
            (f"track2-{tag}".encode(), other),
            (f"track-{tag}".encode(), twice),
        ],
    )
    with App(settings_from(consumer_env), stop_at_end=True) as app:
        app.run()
    results = read_all(
        consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], consumer_env["POPSCORE_OUTPUT_TOPIC"], 2
    )
    ids = sorted(ScoreRecord.from_json(m.value()).event_id for m in results)
    assert ids == sorted([f"dup-{tag}", f"other-{tag}"])
    get = app.metrics.registry.get_sample_value
    assert get("popscore_events_total", {"outcome": "duplicate"}) == 1
    assert get("popscore_events_total", {"outcome": "scored"}) == 2
    committed, ends = committed_and_end(
        consumer_env["POPSCORE_KAFKA_BOOTSTRAP"],
        consumer_env["POPSCORE_GROUP_ID"],
        consumer_env["POPSCORE_INPUT_TOPIC"],
    )
    assert [max(c, 0) for c in committed] == ends


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[str]:
    """Serves a real audio file, taking ~12 s for it (a slow CDN)."""
    body = tone_file(tmp_path, "slow.wav", seconds=1.0).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = len(body) // 24 + 1
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                time.sleep(0.5)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.wav"
    server.shutdown()
    server.server_close()


def test_batch_slower_than_max_poll_interval_keeps_the_group(
    consumer_env: dict[str, str], slow_server: str
) -> None:
    """A 12 s fetch with max.poll.interval.ms = 7 s: the poll loop never stops, so the member
    is never kicked out, nothing is lost or re-processed."""
    env = {
        **consumer_env,
        "POPSCORE_AUDIO_ALLOW_PRIVATE_HOSTS": "true",
        "POPSCORE_AUDIO_FETCH_TIMEOUT_S": "60",
        "POPSCORE_KAFKA_PROPERTIES": json.dumps(
            {
                "consumer.max.poll.interval.ms": "7000",
                "consumer.session.timeout.ms": "6000",
                "consumer.heartbeat.interval.ms": "1000",
            }
        ),
    }
    tag = uuid.uuid4().hex[:8]
    send(env, [(f"slow-{tag}".encode(), event(f"slow-{tag}", f"slow-{tag}", slow_server))])
    started = time.monotonic()
    with App(settings_from(env), stop_at_end=True) as app:
        app.run()
        get = app.metrics.registry.get_sample_value
        lost = get("popscore_rebalances_total", {"event": "lost"}) or 0
        revoked = get("popscore_rebalances_total", {"event": "revoked"}) or 0
    assert time.monotonic() - started > 10, "the fetch really outlasted max.poll.interval.ms"
    assert (lost, revoked) == (0, 0)
    results = read_all(env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_OUTPUT_TOPIC"], 1)
    assert [ScoreRecord.from_json(m.value()).event_id for m in results] == [f"slow-{tag}"]
    assert get("popscore_events_total", {"outcome": "scored"}) == 1


def test_a_store_fault_that_stops_the_process_commits_nothing(
    consumer_env: dict[str, str], spare_db: redis.Redis, stack: dict[str, str]
) -> None:
    """Offsets are committed only after the scores are in Redis, at the level of the service:
    a shared key of the wrong type stops the App, and no offset, result or dead letter of the
    batch is committed (a sink failure swallowed and reported as written passed every test
    before this one)."""
    spare_db.set(MODELS_KEY, "not a set")
    env = {**consumer_env, "POPSCORE_REDIS_URL": database_url(stack, 11)}  # spare_db's
    produce_synthetic(env, 3, seed=11)
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    refused = pytest.raises(SinkError, match="'popscore:models' holds a string, not a set")
    with refused, App(settings, stop_at_end=True) as app:
        app.run()
    committed, _ends = committed_and_end(
        env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_GROUP_ID"], env["POPSCORE_INPUT_TOPIC"]
    )
    assert all(offset < 0 for offset in committed), committed
    bootstrap = env["POPSCORE_KAFKA_BOOTSTRAP"]
    assert read_all(bootstrap, env["POPSCORE_OUTPUT_TOPIC"], 0, timeout_s=3) == []
    assert read_all(bootstrap, env["POPSCORE_DLQ_TOPIC"], 0, timeout_s=3) == []
