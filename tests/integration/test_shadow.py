"""Shadow scoring against the real Kafka and Redis: a second model scores every batch on the
same decoded audio, into its own namespace and topic, compared with the primary; a failing
shadow costs the primary nothing."""

import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from consumer.app import App
from consumer.device import Scorer
from consumer.kafka import ensure_topics
from consumer.settings import load_settings
from popscore.artifact import load, resave
from schemas import ScoreRecord, model_score_key, score_key
from tests.integration.conftest import read_all
from tests.integration.test_service import assert_all_committed, produce_synthetic

pytestmark = pytest.mark.integration
SHADOW = ("scored", "failed", "duplicate", "skipped", "late")
N = 12


@pytest.fixture
def shadow_env(consumer_env: dict[str, str], model_path: Path, tmp_path: Path) -> dict[str, str]:
    """The demo model again under another version whose decision cut calls every track a hit."""
    artifact = load(model_path)
    version = f"{artifact.meta.model_version}-shadow-{tmp_path.name[-6:]}"
    shadow = resave(
        artifact.module,
        tmp_path / "shadow.pt",
        artifact.meta.replace(model_version=version, hit_threshold=0.0),
    )
    topic = consumer_env["POPSCORE_OUTPUT_TOPIC"] + "-shadow"
    ensure_topics({"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]}, [topic], 3)
    return {
        **consumer_env,
        "POPSCORE_SHADOW_MODEL": str(shadow),
        "POPSCORE_SHADOW_TOPIC": topic,
        "POPSCORE_SHADOW_WAIT_MS": "30000",
    }


def run(env: dict[str, str], patch: object = None) -> App:
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    with App(settings, stop_at_end=True) as app:
        if patch:
            patch(app)  # type: ignore[operator]
        app.run()
    return app


def test_the_shadow_scores_every_event_beside_the_primary(
    shadow_env: dict[str, str], redis_client: redis.Redis
) -> None:
    events = produce_synthetic(shadow_env, N, seed=int(time.time()))
    app = run(shadow_env)
    bootstrap = shadow_env["POPSCORE_KAFKA_BOOTSTRAP"]
    primary = [
        ScoreRecord.from_json(m.value())
        for m in read_all(bootstrap, shadow_env["POPSCORE_OUTPUT_TOPIC"], N)
    ]
    shadow = [
        ScoreRecord.from_json(m.value())
        for m in read_all(bootstrap, shadow_env["POPSCORE_SHADOW_TOPIC"], N)
    ]
    ids = sorted(e.event_id for e in events)
    assert sorted(r.event_id for r in primary) == ids
    assert sorted(r.event_id for r in shadow) == ids, "every event once in the shadow topic"
    version = shadow[0].model_version
    assert {r.model_version for r in shadow} == {version} != {r.model_version for r in primary}
    by_id = {r.event_id: r for r in primary}
    for record in shadow:
        # The same weights on the same decoded audio: the same score, another decision cut.
        assert record.popularity == pytest.approx(by_id[record.event_id].popularity, abs=1e-4)
        assert record.is_hit
    for event in events:
        view = ScoreRecord.from_redis(redis_client.hgetall(score_key(event.track_id)))
        assert view.model_version == primary[0].model_version, "the view stays the primary's"
        mine = ScoreRecord.from_redis(
            redis_client.hgetall(model_score_key(version, event.track_id))
        )
        assert mine.event_id == event.event_id
    assert_all_committed(shadow_env)
    get = app.metrics.registry.get_sample_value
    assert get("popscore_shadow_events_total", {"outcome": "scored"}) == N
    assert get("popscore_shadow_score_difference_count") == N
    assert abs(get("popscore_shadow_score_difference_sum") or 0.0) < 1e-2
    hits = sum(r.is_hit for r in primary)
    assert get("popscore_shadow_hit_agreement_total", {"agree": "true"}) == hits
    assert get("popscore_shadow_hit_agreement_total", {"agree": "false"}) == N - hits
    assert get("popscore_shadow_model_info", {"model_version": version}) == 1


def test_a_failing_shadow_is_counted_and_the_primary_scores_everything(
    shadow_env: dict[str, str], redis_client: redis.Redis
) -> None:
    events = produce_synthetic(shadow_env, N, seed=int(time.time()) + 1)

    def break_shadow(app: App) -> None:
        def broken(*_args: object) -> None:
            raise RuntimeError("shadow exploded")

        app.shadow.score = broken  # type: ignore[union-attr, method-assign]

    app = run(shadow_env, break_shadow)
    bootstrap = shadow_env["POPSCORE_KAFKA_BOOTSTRAP"]
    primary = read_all(bootstrap, shadow_env["POPSCORE_OUTPUT_TOPIC"], N)
    assert sorted(ScoreRecord.from_json(m.value()).event_id for m in primary) == sorted(
        e.event_id for e in events
    )
    assert read_all(bootstrap, shadow_env["POPSCORE_SHADOW_TOPIC"], 0, timeout_s=10) == []
    assert read_all(bootstrap, shadow_env["POPSCORE_DLQ_TOPIC"], 0, timeout_s=10) == []
    get = app.metrics.registry.get_sample_value
    assert get("popscore_shadow_events_total", {"outcome": "failed"}) == N
    assert get("popscore_events_total", {"outcome": "scored"}) == N
    assert_all_committed(shadow_env)


def test_a_stalled_shadow_never_holds_the_primary_back(
    shadow_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """The shadow blocks until every primary score is in Redis: the primary goes on (the shadow
    falls behind and is skipped), then the batches commit once it is released."""
    n = 32
    env = {**shadow_env, "POPSCORE_BATCH_SIZE": "4", "POPSCORE_SHADOW_WAIT_MS": "60000"}
    events = produce_synthetic(env, n, seed=int(time.time()) + 2)
    release = threading.Event()
    settings = load_settings(**{k.removeprefix("POPSCORE_").lower(): v for k, v in env.items()})
    with App(settings, stop_at_end=True) as app:
        shadow = cast(Scorer, app.shadow)
        score = shadow.score

        def stalled(*args: Any) -> Any:
            release.wait(120)
            return score(*args)

        shadow.score = stalled  # type: ignore[method-assign]
        loop = threading.Thread(target=app.run, daemon=True)
        loop.start()
        try:
            deadline = time.monotonic() + 120
            while not all(redis_client.exists(score_key(e.track_id)) for e in events):
                assert time.monotonic() < deadline, "the primary waited for the shadow"
                time.sleep(0.2)
        finally:
            release.set()
        loop.join(120)
        assert not loop.is_alive()
    get = app.metrics.registry.get_sample_value
    outcomes = {o: get("popscore_shadow_events_total", {"outcome": o}) or 0 for o in SHADOW}
    assert outcomes["skipped"] + outcomes["late"] > 0, outcomes
    assert sum(outcomes.values()) == n, outcomes
    assert get("popscore_events_total", {"outcome": "scored"}) == n
    assert_all_committed(env)
