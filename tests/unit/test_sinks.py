"""RedisSink's retries, against a fake client (the upsert itself is tested on a real Redis)."""

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from consumer.errors import SinkError
from consumer.sinks import RedisSink, Upsert
from schemas import ScoreRecord


class Pool:
    def __init__(self) -> None:
        self.disconnects = 0

    def disconnect(self) -> None:
        self.disconnects += 1


class FlakyRedis:
    """The upsert script raises each of ``errors`` once, then answers WRITTEN."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0
        self.connection_pool = Pool()

    def register_script(self, _lua: str) -> Any:
        def run(keys: list[str], args: list[Any]) -> list[int]:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return [Upsert.WRITTEN.value]

        return run


def record() -> ScoreRecord:
    t = datetime(2026, 11, 28, 12, tzinfo=UTC)
    return ScoreRecord(event_id="e", track_id="t", model_version="m", popularity=50.0,
                       hit_probability=0.5, is_hit=False, audio_used=True, emitted_at=t,
                       scored_at=t + timedelta(seconds=1), latency_ms=1000.0)  # fmt: skip


def test_failover_and_memory_replies_are_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumer.sinks.MAX_BACKOFF_S", 0.01)
    errors: list[Exception] = [
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        redis.ConnectionError("Connection refused"),
    ]
    client = FlakyRedis(errors)
    sink = RedisSink(client)  # type: ignore[arg-type]
    assert sink.write([record()], ["in/0/1"], threading.Event()) == [Upsert.WRITTEN]
    assert client.calls == 4
    assert client.connection_pool.disconnects == 1  # after READONLY: reconnect to the primary


def test_other_error_replies_are_not_retried() -> None:
    client = FlakyRedis([redis.ResponseError("ERR Error running script")])
    with pytest.raises(redis.ResponseError):
        RedisSink(client).write([record()], ["in/0/1"], threading.Event())  # type: ignore[arg-type]
    assert client.calls == 1


def test_a_set_stop_ends_the_retries() -> None:
    stop = threading.Event()
    stop.set()
    client = FlakyRedis([redis.exceptions.ReadOnlyError("replica")])
    with pytest.raises(SinkError, match="stopping"):
        RedisSink(client).write([record()], ["in/0/1"], stop)  # type: ignore[arg-type]
