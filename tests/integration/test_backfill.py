"""``popscore backfill`` against the real Kafka and Redis: a catalog re-scored under another
model through its own topic and group (no duplicates of the live scores, the view untouched),
resumable from its offsets, and paused while the live group lags."""

import argparse
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.app import App
from consumer.kafka import ensure_topics
from consumer.settings import load_settings
from popscore.artifact import load, resave
from popscore.cli.main import main
from popscore.cli.rollout import backfill_settings
from schemas import ScoreRecord, model_score_key, score_key
from tests.integration.conftest import committed_and_end, read_all
from tests.integration.test_service import produce_synthetic, run_until_caught_up

pytestmark = pytest.mark.integration
N = 10


def candidate(model_path: Path, folder: Path) -> tuple[Path, str]:
    artifact = load(model_path)
    version = f"{artifact.meta.model_version}-cand-{uuid.uuid4().hex[:6]}"
    path = resave(artifact.module, folder / "cand.pt", artifact.meta.replace(model_version=version))
    return path, version


def test_a_catalog_is_rescored_under_a_candidate_without_touching_the_view(
    consumer_env: dict[str, str],
    model_path: Path,
    tmp_path: Path,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = produce_synthetic(consumer_env, N, seed=int(time.time()))
    run_until_caught_up(consumer_env)  # the live model scored them: their event ids are claimed
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(e.model_dump_json() + "\n" for e in events))
    for name, value in consumer_env.items():
        monkeypatch.setenv(name, value)
    topic = consumer_env["POPSCORE_INPUT_TOPIC"] + "-backfill"  # deleted with the fixture's
    cand, version = candidate(model_path, tmp_path)
    group = f"bf-{uuid.uuid4().hex[:8]}"

    assert main(["backfill", "publish", "--catalog", str(catalog), "--topic", topic]) == 0
    # ... and the topics its consumers write: a Kubernetes backfill runs `consume`, which
    # creates none and refuses to start without them
    admin = AdminClient({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]})
    listed = admin.list_topics(timeout=10).topics
    for written in ("POPSCORE_OUTPUT_TOPIC", "POPSCORE_DLQ_TOPIC"):
        assert f"{consumer_env[written]}-backfill" in listed
    with pytest.raises(SystemExit, match="2"):  # the topic holds the catalog already
        main(["backfill", "publish", "--catalog", str(catalog), "--topic", topic])
    run = ["backfill", "run", "--model", str(cand), "--topic", topic, "--group", group,
           "--yield-to", "", "--nice", "0", "--http-port", "0"]  # fmt: skip
    assert main(run) == 0

    out = consumer_env["POPSCORE_OUTPUT_TOPIC"] + "-backfill"
    scored = [
        ScoreRecord.from_json(m.value())
        for m in read_all(consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], out, N)
    ]
    assert sorted(r.event_id for r in scored) == sorted(e.event_id for e in events)
    assert {r.model_version for r in scored} == {version}
    for event in events:
        view = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert view.model_version != version, "a backfill never writes the view"
        mine = redis_client.hgetall(model_score_key(version, event.track_id))
        assert ScoreRecord.from_redis(mine).event_id == event.event_id

    # Resumable: the group's offsets are committed, so a second run scores nothing again.
    assert main(run) == 0
    again = read_all(consumer_env["POPSCORE_KAFKA_BOOTSTRAP"], out, N, timeout_s=10)
    assert len(again) == N


def test_a_backfill_pauses_while_the_live_group_lags(
    consumer_env: dict[str, str], model_path: Path, tmp_path: Path
) -> None:
    produce_synthetic(consumer_env, 4, seed=int(time.time()) + 7)
    run_until_caught_up(consumer_env)  # the live group has committed offsets ...
    commit_where_none(consumer_env)
    produce_synthetic(consumer_env, 4, seed=int(time.time()) + 8)  # ... and now 4 to read
    live = load_settings(
        **{k.removeprefix("POPSCORE_").lower(): v for k, v in consumer_env.items()}
    )
    topic = consumer_env["POPSCORE_INPUT_TOPIC"] + "-backfill"  # deleted with the fixture's
    ensure_topics(live.kafka_config("admin"), [topic], 2)
    produce_synthetic({**consumer_env, "POPSCORE_INPUT_TOPIC": topic}, 4, seed=3)
    cand, _version = candidate(model_path, tmp_path)
    args = argparse.Namespace(model=cand, topic=topic, group=f"bf-{uuid.uuid4().hex[:8]}",
                              nice=0, yield_to=None, http_port=0)  # fmt: skip
    settings = backfill_settings(args, live.model_copy(update={"yield_max_lag": 0}), "cand")
    ensure_topics(live.kafka_config("admin"), [settings.output_topic, settings.dlq_topic], 2)
    with App(settings, stop_at_end=True) as app:
        loop = threading.Thread(target=app.run, daemon=True)
        loop.start()
        time.sleep(12)
        get = app.metrics.registry.get_sample_value
        assert get("popscore_yielding") == 1
        assert get("popscore_events_total", {"outcome": "scored"}) == 0, "it waits for live"
        # The live group catches up: the backfill goes on.
        run_until_caught_up(consumer_env)
        loop.join(timeout=120)
        assert not loop.is_alive()
    assert get("popscore_events_total", {"outcome": "scored"}) == 4
    assert get("popscore_yielding") == 0


def commit_where_none(env: dict[str, str]) -> None:
    """Commit the live group at the log end of every input partition it holds no commit on.
    The gate leaves such partitions out of the lag (docs/OPERATIONS.md); four records keyed at
    random leave one of three partitions empty about half the time, and the next four all land
    there about once in a hundred runs, which is a live group with no lag to yield to."""
    bootstrap, topic = env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_INPUT_TOPIC"]
    committed, ends = committed_and_end(bootstrap, env["POPSCORE_GROUP_ID"], topic)
    pairs = enumerate(zip(committed, ends, strict=True))
    missing = [TopicPartition(topic, p, end) for p, (done, end) in pairs if done < 0]
    if missing:
        committer = Consumer({"bootstrap.servers": bootstrap, "group.id": env["POPSCORE_GROUP_ID"]})
        committer.commit(offsets=missing, asynchronous=False)
        committer.close()
