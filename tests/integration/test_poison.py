"""A record that breaks processing costs that record alone (real Kafka and Redis): the rest of
its batch is scored and committed, and the partition moves on.

Each poison below made the consumer raise out of a stage, so the batch was never committed
and the restart read it again and raised again, for ever."""

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

import consumer.commit
import consumer.pipeline
import consumer.sinks
from consumer.app import App
from consumer.errors import ConfigError
from consumer.settings import load_settings
from schemas import ScoreRecord, score_key
from schemas.dead_letter import (
    HEADER_KEY_OMITTED,
    HEADER_REASON,
    HEADER_VALUE_OMITTED,
)
from tests.integration.conftest import read_all
from tests.integration.test_service import assert_all_committed, http_get, write_tone

pytestmark = pytest.mark.integration
CAUGHT_UP_S = 180.0


def run_until_caught_up(env: dict[str, str]) -> App:
    """The App until every partition is read to its end; a poison loop shows as a timeout."""
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    failures: list[BaseException] = []
    with App(settings, stop_at_end=True) as app:

        def run() -> None:
            try:
                app.run()
            except BaseException as exc:
                failures.append(exc)

        loop = threading.Thread(target=run, daemon=True)
        loop.start()
        loop.join(CAUGHT_UP_S)
        if loop.is_alive():
            app.running = False
            loop.join(60)
            pytest.fail(f"not caught up in {CAUGHT_UP_S:.0f} s: a record holds its partition")
    if failures:
        raise failures[0]
    return app


def event(event_id: str, track: str, uri: str, **extra: Any) -> bytes:
    doc = {"event_id": event_id, "track_id": track,
           "emitted_at": datetime.now(UTC).isoformat(), "audio_uri": uri, **extra}  # fmt: skip
    return json.dumps(doc).encode()


def send(env: dict[str, str], records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": env["POPSCORE_KAFKA_BOOTSTRAP"],
                         "message.max.bytes": 1_040_000})  # fmt: skip
    for key, value in records:
        producer.produce(env["POPSCORE_INPUT_TOPIC"], value, key)
    assert producer.flush(30) == 0


def failing_for(original: Callable[..., Any], poisoned: Callable[..., bool]) -> Callable[..., Any]:
    """``original``, except that it raises when ``poisoned`` says its arguments are the poison."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if poisoned(*args, **kwargs):
            raise RuntimeError("poisoned https://user:secret@host/x?X-Amz-Signature=abc")
        return original(*args, **kwargs)

    return call


def dead_letters_by(env: dict[str, str], n: int) -> dict[bytes, list[Any]]:
    out: dict[bytes, list[Any]] = {}
    for msg in read_all(env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_DLQ_TOPIC"], n):
        out.setdefault(dict(msg.headers())[HEADER_REASON], []).append(msg)
    return out


def test_a_record_that_breaks_any_stage_costs_itself_alone(
    consumer_env: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    tag = uuid.uuid4().hex[:8]
    uri = write_tone(audio / "ok.wav", seconds=2.0).as_uri()
    boom_uri = write_tone(audio / "boom-decode.wav", seconds=2.0).as_uri()
    good = [f"good-{tag}-{i}" for i in range(5)]
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"k", event(track, track, uri)) for track in good
    ]
    huge = f"huge-{tag}"  # a 400-digit count: valid JSON, beyond a float
    records.append((b"k", event(huge, huge, uri, artist={"followers": 10**400})))
    for name in ("boom-parse", "boom-features", "boom-redis"):
        records.append((b"k", event(f"{name}-{tag}", f"{name}-{tag}", uri)))
    records.append((b"k", event(f"boom-decode-{tag}", f"boom-decode-{tag}", boom_uri)))
    records.append((b"boom-dlq", b"{not json"))  # dead-lettered; building its dead letter fails
    for when in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+14:00"):  # beyond UTC
        doc = json.loads(event(f"edge-{when}-{tag}", f"edge-{tag}", uri))
        records.append((b"k", json.dumps({**doc, "emitted_at": when}).encode()))

    def poison(owner: object, name: str, poisoned: Callable[..., bool]) -> None:
        monkeypatch.setattr(owner, name, failing_for(getattr(owner, name), poisoned))

    poison(consumer.pipeline.ReleaseEvent, "from_json", lambda value: b"boom-parse" in value)
    poison(consumer.pipeline, "open_uri", lambda uri, *_: "boom-decode" in uri)
    poison(consumer.pipeline, "extract", lambda doc, _: doc["event_id"].startswith("boom-feat"))
    poison(consumer.sinks, "_script_item", lambda rec, _: rec.event_id.startswith("boom-redis"))
    poison(consumer.commit, "dead_letter_forms", lambda item: item.message.key() == b"boom-dlq")
    send(consumer_env, records)

    run_until_caught_up(consumer_env)

    for track in [*good, huge]:
        assert redis_client.exists(score_key(track)), track
    results = read_all(consumer_env["POPSCORE_KAFKA_BOOTSTRAP"],
                       consumer_env["POPSCORE_OUTPUT_TOPIC"], len(good) + 1)  # fmt: skip
    assert {ScoreRecord.from_json(m.value()).track_id for m in results} == {*good, huge}
    dead = dead_letters_by(consumer_env, 7)
    internal = dead[b"internal_error"]
    assert len(internal) == 5 and len(dead[b"invalid_event"]) == 2
    assert sum(len(v) for v in dead.values()) == 7, "one outcome per record"
    for msg in internal:
        detail = dict(msg.headers())["popscore.error.detail"].decode()
        assert detail.startswith("RuntimeError: poisoned") and "secret" not in detail
        assert "Traceback" not in detail
    [unbuildable] = [m for m in internal if m.value() is None]  # the dead letter of boom-dlq
    assert unbuildable.key() is None
    assert not redis_client.exists(score_key(f"boom-redis-{tag}")), "dead-lettered, not written"
    assert_all_committed(consumer_env)


def test_a_dead_letter_too_large_even_without_its_value_goes_without_its_key(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """A ~1 MB key on an invalid record: its dead letter without the value is still over the
    producer's message.max.bytes; the batch used to abort, rewind and abort again for ever."""
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    track = f"after-huge-key-{uuid.uuid4().hex[:8]}"
    huge_key = b"k" * 999_900
    good = event(track, track, write_tone(audio / "t.wav").as_uri())
    send(consumer_env, [(huge_key, b"{not json"), (b"k", good)])

    run_until_caught_up(consumer_env)

    [dead] = dead_letters_by(consumer_env, 1)[b"invalid_json"]
    headers = dict(dead.headers())
    assert dead.key() is None and dead.value() is None
    assert int(headers[HEADER_KEY_OMITTED]) == len(huge_key)
    assert int(headers[HEADER_VALUE_OMITTED]) == len(b"{not json")
    assert redis_client.exists(score_key(track)), "the record behind it was scored"
    assert_all_committed(consumer_env)


def test_a_dead_letter_over_the_dlq_topics_limit_goes_smaller(
    consumer_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """The DLQ topic takes 20,000 bytes; a 50 kB invalid record fits the producer but not the
    topic: the broker refused its dead letter, which aborted the batch, and its replay, for
    ever. The producer now stays within the topics' limit, so the dead letter goes without
    its value and the record behind it is scored."""
    admin = AdminClient({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]})
    small = f"{consumer_env['POPSCORE_DLQ_TOPIC']}-small"
    config = {"max.message.bytes": "20000"}
    admin.create_topics([NewTopic(small, 1, 1, config=config)])[small].result(30)
    env = {**consumer_env, "POPSCORE_DLQ_TOPIC": small}
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    track = f"after-big-{uuid.uuid4().hex[:8]}"
    junk = b"{" + os.urandom(50_000)  # incompressible: zstd cannot bring it under the limit
    send(env, [(b"k", junk), (b"k", event(track, track, write_tone(audio / "t.wav").as_uri()))])

    run_until_caught_up(env)

    [dead] = dead_letters_by(env, 1)[b"invalid_json"]
    assert dead.value() is None and int(dict(dead.headers())[HEADER_VALUE_OMITTED]) == len(junk)
    assert redis_client.exists(score_key(track)), "the record behind it was scored"
    assert_all_committed(env)


def test_a_topic_the_service_writes_that_does_not_exist_fails_start_up(
    consumer_env: dict[str, str],
) -> None:
    """On a broker with auto-create off it aborted every batch that reached it, for ever."""
    env = {**consumer_env, "POPSCORE_DLQ_TOPIC": f"{consumer_env['POPSCORE_DLQ_TOPIC']}-absent"}
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    refused = pytest.raises(ConfigError, match=r"^POPSCORE_DLQ_TOPIC: topic '.*-absent' does not")
    with refused, App(settings):
        pass


def test_a_claim_left_by_an_aborted_attempt_does_not_make_a_replay_a_duplicate(
    consumer_env: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event is written to Redis (claiming its id for its record), then its transaction
    aborts; on the retry its audio is gone, so it is dead-lettered. Re-published later (as
    replay-dlq does, a new record), it must be scored, not dropped as a duplicate."""
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    track = f"claim-{uuid.uuid4().hex[:8]}"
    tone = write_tone(audio / "expiring.wav")
    value = event(track, track, tone.as_uri())
    real_commit = consumer.commit.Transactions.commit
    aborted: list[bool] = []

    def abort_once(self: consumer.commit.Transactions, *args: Any) -> float:
        if aborted:
            return real_commit(self, *args)
        aborted.append(True)
        self.producer.begin_transaction()
        self.producer.abort_transaction()
        tone.unlink()  # by the retry the URL has expired
        raise consumer.commit.TransactionAborted("aborted by the test")

    monkeypatch.setattr(consumer.commit.Transactions, "commit", abort_once)
    send(consumer_env, [(track.encode(), value)])
    run_until_caught_up(consumer_env)
    assert aborted and redis_client.exists(score_key(track)), "written before the abort"
    assert list(dead_letters_by(consumer_env, 1)) == [b"audio_fetch_failed"]

    write_tone(tone)  # the audio is back; the event is re-published, as replay-dlq does
    send(consumer_env, [(track.encode(), value)])
    run_until_caught_up(consumer_env)

    results = read_all(consumer_env["POPSCORE_KAFKA_BOOTSTRAP"],
                       consumer_env["POPSCORE_OUTPUT_TOPIC"], 1)  # fmt: skip
    assert [ScoreRecord.from_json(m.value()).track_id for m in results] == [track]
    assert_all_committed(consumer_env)


def test_an_abort_loop_turns_healthz_red(
    consumer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every transaction aborts (as a record nothing could dead-letter once made it): the loop
    beats, Kafka and Redis answer, yet nothing commits; liveness must say so, and the aborts
    are counted."""

    def always_abort(self: consumer.commit.Transactions, *_args: Any) -> float:
        self.producer.begin_transaction()
        self.producer.abort_transaction()
        raise consumer.commit.TransactionAborted("aborted by the test")

    monkeypatch.setattr(consumer.commit.Transactions, "commit", always_abort)
    audio = Path(consumer_env["POPSCORE_AUDIO_FILE_ROOTS"])
    track = f"stuck-{uuid.uuid4().hex[:8]}"
    send(consumer_env, [(b"k", event(track, track, write_tone(audio / "s.wav").as_uri()))])
    settings = load_settings(
        **{k.removeprefix("POPSCORE_").lower(): v for k, v in consumer_env.items()}
    )
    with App(settings) as app:
        app.health.stuck_s = 3.0
        loop = threading.Thread(target=app.run, daemon=True)
        loop.start()
        try:
            deadline = time.monotonic() + 60
            while app.health.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            ok, why = app.health.liveness()
            assert not ok and "nothing committed" in why
            status, body = http_get(app.http.port, "/healthz")
            assert status == 503 and "records wait" in body
            aborted = app.metrics.registry.get_sample_value(
                "popscore_transactions_total", {"outcome": "aborted"}
            )
            assert aborted and aborted >= 1
        finally:
            app.running = False
            loop.join(60)
