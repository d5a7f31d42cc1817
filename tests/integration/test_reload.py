"""Hot reload against the real Kafka and Redis: SIGHUP swaps the model between batches, nothing
is dropped or scored twice across the switch, and a broken artifact is refused while scoring
goes on (docs/OPERATIONS.md, "Reloading the model")."""

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from popscore.artifact import load, resave
from schemas import ReleaseEvent, ScoreRecord, score_key
from tests.integration.conftest import ROOT, read_all
from tests.integration.test_service import (
    assert_all_committed,
    free_port,
    http_get,
    produce_synthetic,
    wait_for,
)

pytestmark = pytest.mark.integration


def sample(port: int, name: str, **labels: str) -> float:
    """One sample of the consumer's /metrics (0 when absent)."""
    _status, body = http_get(port, "/metrics")
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def all_in_redis(client: redis.Redis, events: list[ReleaseEvent]) -> bool:
    return all(client.exists(score_key(e.track_id)) for e in events)


def test_sighup_swaps_the_model_between_batches_and_refuses_a_broken_one(
    consumer_env: dict[str, str], redis_client: redis.Redis, model_path: Path, tmp_path: Path
) -> None:
    served = tmp_path / "model.pt"
    shutil.copy(model_path, served)
    old = load(model_path)
    v1 = old.meta.model_version
    v2 = f"{v1}-reloaded"
    new = resave(old.module, tmp_path / "new.pt", old.meta.replace(model_version=v2))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(os.urandom(64 * 1024))
    seed = uuid.uuid4().int % 10**9
    port = free_port()
    env = {**os.environ, **consumer_env, "POPSCORE_MODEL": str(served),
           "POPSCORE_HTTP_PORT": str(port), "POPSCORE_BATCH_SIZE": "4"}  # fmt: skip
    # Enough in flight that the reload lands inside the first wave: loading, the CPU
    # optimisation with its probe and the self-test take 0.4 s on an idle core (0.15 s
    # without the optimisation), more on two cores busy scoring.
    first = produce_synthetic(consumer_env, 96, seed)
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "popscore", "consume"], env=env, cwd=ROOT, stderr=out
        )
    try:
        wait_for(lambda: any(redis_client.exists(score_key(e.track_id)) for e in first), 120,
                 "the first score")  # fmt: skip
        os.replace(new, served)  # atomically, as a volume update or `kubectl cp` + mv does
        proc.send_signal(signal.SIGHUP)  # while most of the first wave is still in flight
        wait_for(lambda: sample(port, "popscore_model_reloads_total", outcome="loaded") == 1,
                 120, "the reload")  # fmt: skip
        second = produce_synthetic(consumer_env, 8, seed + 1)
        wait_for(lambda: all_in_redis(redis_client, first + second), 180, "every score")

        os.replace(broken, served)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sample(port, "popscore_model_reloads_total", outcome="refused") == 1,
                 60, "the refusal")  # fmt: skip
        third = produce_synthetic(consumer_env, 8, seed + 2)
        wait_for(lambda: all_in_redis(redis_client, third), 120, "the scores after the refusal")
        assert sample(port, "popscore_model_info", model_version=v2) == 1
        assert sample(port, "popscore_model_info", model_version=v1) == 0, "old labels removed"
        assert sample(port, "popscore_model_reloads_total", outcome="loaded") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    text = log.read_text()
    assert f"model reload: {v1} -> {v2} from the next batch on" in text
    assert f"serving {v2}: trained on" in text, "the new provenance, as at start-up"
    assert re.search(rf"model reload refused, {re.escape(v2)} serves on: cannot load: ", text)

    events = first + second + third
    bootstrap = consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]
    records = [
        ScoreRecord.from_json(m.value())
        for m in read_all(bootstrap, consumer_env["POPSCORE_OUTPUT_TOPIC"], len(events))
    ]
    assert sorted(r.event_id for r in records) == sorted(e.event_id for e in events), (
        "every event scored exactly once across the switch"
    )
    assert read_all(bootstrap, consumer_env["POPSCORE_DLQ_TOPIC"], 0, timeout_s=20) == []
    version = {r.event_id: r.model_version for r in records}
    assert {version[e.event_id] for e in second + third} == {v2}
    assert {version[e.event_id] for e in first} == {v1, v2}, "switched inside the first wave"
    # The device stage scores batches in order and swaps between two of them.
    last_old = max(r.scored_at for r in records if r.model_version == v1)
    first_new = min(r.scored_at for r in records if r.model_version == v2)
    assert last_old <= first_new
    for event in events:
        stored = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert (stored.event_id, stored.model_version) == (event.event_id, version[event.event_id])
    assert_all_committed(consumer_env)


def test_a_watched_artifact_reloads_without_a_signal(
    consumer_env: dict[str, str], redis_client: redis.Redis, model_path: Path, tmp_path: Path
) -> None:
    """As a Kubernetes volume update does it: the path is a symlink, swapped atomically."""
    old = load(model_path)
    v2 = f"{old.meta.model_version}-watched"
    resave(old.module, tmp_path / "v2.pt", old.meta.replace(model_version=v2))
    shutil.copy(model_path, tmp_path / "v1.pt")
    served = tmp_path / "model.pt"
    served.symlink_to("v1.pt")
    seed = uuid.uuid4().int % 10**9
    port = free_port()
    env = {**os.environ, **consumer_env, "POPSCORE_MODEL": str(served),
           "POPSCORE_HTTP_PORT": str(port), "POPSCORE_MODEL_WATCH_S": "0.2"}  # fmt: skip
    first = produce_synthetic(consumer_env, 4, seed)
    proc = subprocess.Popen([sys.executable, "-m", "popscore", "consume"], env=env, cwd=ROOT)
    try:
        wait_for(lambda: all_in_redis(redis_client, first), 120, "the first wave")
        (tmp_path / "next.pt").symlink_to("v2.pt")
        os.replace(tmp_path / "next.pt", served)
        wait_for(lambda: sample(port, "popscore_model_reloads_total", outcome="loaded") == 1,
                 60, "the reload")  # fmt: skip
        second = produce_synthetic(consumer_env, 4, seed + 1)
        wait_for(lambda: all_in_redis(redis_client, second), 120, "the second wave")
        assert sample(port, "popscore_model_reloads_total", outcome="unchanged") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for event in second:
        stored = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert (stored.event_id, stored.model_version) == (event.event_id, v2)
