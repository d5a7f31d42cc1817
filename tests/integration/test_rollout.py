"""Scores per model version and one current view, against the real Redis and a real local
Redis Cluster (each test runs on both): per-model duplicate detection, ``popscore promote``
(and rollback), and what a reader observes during the switch.

The current-model pointer is global to a Redis database, so these tests use a database of
their own (ROLLOUT_DB), emptied before and after each: the other tests' consumers must keep
writing the view as the live primary. The cluster is emptied the same way.
"""

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from prometheus_client import CollectorRegistry, Gauge
from redis.cluster import RedisCluster

from consumer import rollout
from consumer.cluster_sink import ClusterRedisSink
from consumer.redis_client import AnyRedis, close, keys_for
from consumer.rollout import PromotionError, current_model, models, promote
from consumer.sinks import RedisSink, Upsert
from popscore.cli.main import main
from schemas import ScoreRecord
from tests.integration.conftest import database_url, flush_cluster

pytestmark = pytest.mark.integration
ROLLOUT_DB = 5
DAY = datetime(2026, 11, 30, 12, tzinfo=UTC)
# Each model scores every track the same, so a reader can tell the models apart by score.
SCORES = {"model-a": 20.0, "model-b": 80.0}


def db_url(stack: dict[str, str]) -> str:
    """The stack's Redis URL, database ROLLOUT_DB."""
    return database_url(stack, ROLLOUT_DB)


@pytest.fixture(params=["single", "cluster"])
def db(request: pytest.FixtureRequest) -> Iterator[AnyRedis]:
    """An empty Redis: one node (the stack's, database ROLLOUT_DB) or the local cluster."""
    client: AnyRedis
    if request.param == "cluster":
        client = RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
        flush: Callable[[], object] = lambda: flush_cluster(client)  # noqa: E731
    else:
        client = redis.Redis.from_url(db_url(request.getfixturevalue("stack")))
        flush = client.flushdb
    flush()
    yield client
    flush()
    close(client)


def sink_for(db: AnyRedis) -> RedisSink:
    return ClusterRedisSink(db) if isinstance(db, RedisCluster) else RedisSink(db)


def cli_env(db: AnyRedis, stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the CLI at ``db``."""
    if isinstance(db, RedisCluster):
        node = db.get_default_node()
        monkeypatch.setenv("POPSCORE_REDIS_URL", f"redis://{node.host}:{node.port}")
        monkeypatch.setenv("POPSCORE_REDIS_CLUSTER", "true")
    else:
        monkeypatch.setenv("POPSCORE_REDIS_URL", db_url(stack))


def record(version: str, track: str, event_id: str, emitted: datetime = DAY) -> ScoreRecord:
    return ScoreRecord(
        event_id=event_id,
        track_id=track,
        model_version=version,
        popularity=SCORES.get(version, 50.0),
        hit_probability=0.5,
        is_hit=False,
        audio_used=True,
        emitted_at=emitted,
        scored_at=emitted + timedelta(seconds=1),
        latency_ms=1000.0,
    )


def write(
    sink: RedisSink, version: str, tracks: list[str], primary: bool, tag: str = "e"
) -> list[Upsert]:
    records = [record(version, t, f"{tag}-{t}") for t in tracks]
    sources = [f"in/0/{i}" for i in range(len(tracks))]
    codes = sink.write(records, sources, threading.Event(), primary=primary)
    assert not [c for c in codes if not isinstance(c, Upsert)]
    return [c for c in codes if isinstance(c, Upsert)]


def view_version(db: AnyRedis, track: str) -> str:
    return ScoreRecord.from_redis(db.hgetall(keys_for(db).score(track))).model_version


def test_each_version_has_its_own_scores_and_duplicates_are_per_version(db: AnyRedis) -> None:
    sink = sink_for(db)
    live = record("model-a", "t1", "e1")
    assert sink.write([live], ["in/0/1"], threading.Event()) == [Upsert.WRITTEN]
    # The same event re-scored by another version (a backfill's record): no duplicate ...
    shadow = record("model-b", "t1", "e1")
    assert sink.write([shadow], ["backfill/0/7"], threading.Event(), primary=False) == [
        Upsert.WRITTEN
    ]
    # ... but the same event under the same version from another record still is.
    assert sink.write([shadow], ["backfill/1/3"], threading.Event(), primary=False) == [
        Upsert.DUPLICATE
    ]
    assert view_version(db, "t1") == "model-a", "a non-primary version never writes the view"
    stored = ScoreRecord.from_redis(db.hgetall(keys_for(db).model_score("model-b", "t1")))
    assert (stored.event_id, stored.popularity) == ("e1", 80.0)
    listed = {entry.version: entry.tracks for entry in models(db)}
    assert listed == {"model-a": 1, "model-b": 1}


def test_an_older_event_never_overwrites_a_newer_one_and_ties_go_by_event_id(
    db: AnyRedis,
) -> None:
    """Newer-wins on both layouts (the cluster sink keeps its own copy of the rule): by
    emitted_at, then event_id, whatever the order the records arrive in."""
    sink, stop = sink_for(db), threading.Event()
    keys = keys_for(db)
    newer = record("model-a", "t1", "e-2", DAY + timedelta(hours=1))
    older = record("model-a", "t1", "e-9", DAY)
    assert sink.write([newer], ["in/0/1"], stop) == [Upsert.WRITTEN]
    assert sink.write([older], ["in/0/2"], stop) == [Upsert.STALE]
    for stored in (keys.score("t1"), keys.model_score("model-a", "t1")):
        assert ScoreRecord.from_redis(db.hgetall(stored)).event_id == "e-2"
    # the same emitted_at: the larger event_id wins, in either order
    tie_a, tie_b = (record("model-a", t, e, DAY) for t, e in (("t2", "e-a"), ("t2", "e-b")))
    assert sink.write([tie_b], ["in/0/3"], stop) == [Upsert.WRITTEN]
    assert sink.write([tie_a], ["in/0/4"], stop) == [Upsert.STALE]
    tie_c, tie_d = (record("model-a", t, e, DAY) for t, e in (("t3", "f-a"), ("t3", "f-b")))
    assert sink.write([tie_c], ["in/0/5"], stop) == [Upsert.WRITTEN]
    assert sink.write([tie_d], ["in/0/6"], stop) == [Upsert.WRITTEN]
    for track, winner in (("t2", "e-b"), ("t3", "f-b")):
        assert ScoreRecord.from_redis(db.hgetall(keys.score(track))).event_id == winner


def test_promote_switches_every_track_and_day_then_rolls_back(db: AnyRedis) -> None:
    sink = sink_for(db)
    tracks = [f"t{i}" for i in range(50)]
    write(sink, "model-a", tracks, primary=True)
    write(sink, "model-b", tracks[:40], primary=False)  # the candidate lacks ten tracks
    board = keys_for(db).leaderboard(DAY.date())

    done = promote(db, "model-b")
    # A cluster moves each track between the view's days with its hash (no COPY between slots).
    days = 0 if keys_for(db).cluster else 1
    assert (done.previous, done.days, done.tracks_seen, done.tracks_replaced) == (
        None,
        days,
        40,
        40,
    )
    assert current_model(db) == "model-b"
    assert {view_version(db, t) for t in tracks[:40]} == {"model-b"}
    assert {view_version(db, t) for t in tracks[40:]} == {"model-a"}, "never scored by B: kept"
    ranked = set(db.zrange(board, 0, -1, withscores=True))
    expected = {(t.encode(), 80.0) for t in tracks[:40]}
    if keys_for(db).cluster:  # the ranking agrees with every hash, the kept ones too
        expected |= {(t.encode(), 20.0) for t in tracks[40:]}
    assert ranked == expected
    assert db.hget(keys_for(db).promotion, "state") == b"done"

    # Now the pointer decides, not the role: the live primary (A) no longer writes the view, the
    # candidate does, even as a shadow.
    write(sink, "model-a", ["t1"], primary=True, tag="later")
    write(sink, "model-b", ["t45"], primary=False, tag="later")
    assert view_version(db, "t1") == "model-b"
    assert view_version(db, "t45") == "model-b"

    back = promote(db, "model-a")  # rollback is a promotion of the previous version
    assert back.previous == "model-b"
    assert {view_version(db, t) for t in tracks} == {"model-a"}
    assert {score for _m, score in db.zrange(board, 0, -1, withscores=True)} == {20.0}
    later = ScoreRecord.from_redis(db.hgetall(keys_for(db).score("t1")))
    assert later.event_id == "later-t1", "A's own later record, written while B was current"


def test_a_reader_sees_whole_records_and_whole_leaderboards_during_the_switch(
    db: AnyRedis,
) -> None:
    sink = sink_for(db)
    tracks = [f"r{i}" for i in range(3000)]
    for i in range(0, len(tracks), 500):
        write(sink, "model-a", tracks[i : i + 500], primary=True)
        write(sink, "model-b", tracks[i : i + 500], primary=False)
    board = keys_for(db).leaderboard(DAY.date())
    seen_b: set[str] = set()
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for track in tracks[::97]:
                fields = db.hgetall(keys_for(db).score(track))
                rec = ScoreRecord.from_redis(fields)
                if rec.popularity != SCORES[rec.model_version]:
                    problems.append(f"{track}: mixed record {rec}")
                if rec.model_version == "model-a" and track in seen_b:
                    problems.append(f"{track}: back to model-a after model-b")
                if rec.model_version == "model-b":
                    seen_b.add(track)
            day = {score for _m, score in db.zrange(board, 0, -1, withscores=True)}
            # One node switches a day's ranking in one command; a cluster moves each track
            # with its hash, so the day mixes models until the promotion ends.
            if not day <= set(SCORES.values()) or (len(day) != 1 and not keys_for(db).cluster):
                problems.append(f"leaderboard: {sorted(day)}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        promote(db, "model-b")
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:5]
    assert {view_version(db, t) for t in tracks} == {"model-b"}
    assert {score for _m, score in db.zrange(board, 0, -1, withscores=True)} == {80.0}
    assert db.zcard(board) == len(tracks)


def test_a_live_write_during_the_switch_leaves_each_track_on_one_day(
    db: AnyRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B moves a track to a new day while the switch runs: it must end on that day alone."""
    sink = sink_for(db)
    old_day = record("model-a", "t1", "e-a")  # A: day DAY
    db_day = DAY + timedelta(days=1)
    assert sink.write([old_day], ["in/0/1"], threading.Event()) == [Upsert.WRITTEN]
    b_old = record("model-b", "t1", "e-b", emitted=db_day)  # B: the next day
    assert sink.write([b_old], ["bf/0/1"], threading.Event(), primary=False) == [Upsert.WRITTEN]
    switch_tracks = rollout._switch_tracks

    def with_a_live_write(*args: object) -> tuple[int, int]:
        later = record("model-b", "t1", "e-live", emitted=DAY + timedelta(days=2))
        sink.write([later], ["in/0/2"], threading.Event(), primary=False)
        return switch_tracks(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(rollout, "_switch_tracks", with_a_live_write)
    promote(db, "model-b")
    days = [DAY + timedelta(days=n) for n in range(3)]
    keys = keys_for(db)
    ranked = [d for d in days if db.zscore(keys.leaderboard(d.date()), "t1") is not None]
    stored = db.hget(keys.score("t1"), "_leaderboard")
    assert ranked == [days[2]], "on the live event's day alone"
    assert stored == keys.leaderboard(days[2].date()).encode()


def test_promotion_is_refused_for_an_unknown_version_or_while_another_runs(
    db: AnyRedis,
) -> None:
    with pytest.raises(PromotionError, match="no scores of 'nope'"):
        promote(db, "nope")
    with pytest.raises(PromotionError, match="is no model_version"):
        promote(db, "a:score")
    write(sink_for(db), "model-b", ["t1"], primary=False)
    db.set(keys_for(db).promotion_lock, "model-c 1234 earlier", px=60_000)
    with pytest.raises(PromotionError, match="another promotion is running"):
        promote(db, "model-b")
    assert current_model(db) is None


def test_a_stalled_promotion_never_writes_over_a_later_one(
    db: AnyRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promotion A (to model-b) stalls past its lock's TTL; promotion C (to model-c) runs whole
    meanwhile. A must stop at its next step: the pointer, every view hash, the day's ranking
    and the promotion's state all stay model-c's (A used to finish, leaving most tracks on
    model-b and the pointer on model-c)."""
    sink = sink_for(db)
    tracks = [f"t{i}" for i in range(12)]
    for version, primary in (("model-a", True), ("model-b", False), ("model-c", False)):
        write(sink, version, tracks, primary=primary)
    monkeypatch.setattr(rollout, "BATCH_TRACKS", 3)
    keys = keys_for(db)

    def stall(seen: int, _replaced: int) -> None:
        if seen == 3:  # A's first batch is in; its lock "expires" and C runs
            db.delete(keys.promotion_lock)
            promote(db, "model-c")

    with pytest.raises(PromotionError, match="a later promotion began while this one ran"):
        promote(db, "model-b", progress=stall)
    assert current_model(db) == "model-c"
    assert {view_version(db, t) for t in tracks} == {"model-c"}
    board = keys.leaderboard(DAY.date())
    assert {score for _m, score in db.zrange(board, 0, -1, withscores=True)} == {50.0}
    assert db.hmget(keys.promotion, ["to", "state"]) == [b"model-c", b"done"]
    assert not db.exists(keys.promotion_lock), "C released its own lock; A took none back"


def test_the_view_watch_says_when_a_live_consumer_no_longer_feeds_the_view(
    db: AnyRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a promotion only the promoted version reaches the view: a live consumer reloaded
    to another model scores on while the view stands still, and says so."""
    monkeypatch.setattr(rollout, "VIEW_CHECK_S", 0.0)
    registry = CollectorRegistry()
    gauge = Gauge("view_fed", "test", registry=registry)
    live, backfill = rollout.ViewWatch(db, gauge, live=True), rollout.ViewWatch(db, gauge, False)

    def fed() -> float | None:
        return registry.get_sample_value("view_fed")

    live.check("model-a", None)
    assert fed() == 1, "no promotion: the live primary writes the view"
    backfill.check("model-b", None)
    assert fed() == 0, "a backfill's model reaches the view only once promoted"
    write(sink_for(db), "model-b", ["t1"], primary=False)
    promote(db, "model-b")
    with caplog.at_level("WARNING"):
        live.check("model-a", None)
    assert fed() == 0
    assert "the view shows model-b (popscore promote), so this consumer's scores of model-a " \
        "reach only its own namespace" in caplog.text  # fmt: skip
    live.check("model-a", "model-b")
    assert fed() == 1, "its shadow is the promoted version: it feeds the view"


def test_a_version_whose_scores_all_expired_is_refused_unless_forced(
    db: AnyRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """After a promotion only the promoted version's writes change the view: one nobody has
    written for longer than the scores' TTL has none left to show."""
    write(sink_for(db), "model-b", ["t1"], primary=False)
    two_hours_ago = int((datetime.now(UTC) - timedelta(hours=2)).timestamp() * 1000)
    db.hset(keys_for(db).model_info("model-b"), "last_write_ms", two_hours_ago)
    with pytest.raises(PromotionError, match=r"every score of model-b has expired \(no write"):
        promote(db, "model-b", ttl_s=3600)
    assert current_model(db) is None
    with caplog.at_level("WARNING"):
        promote(db, "model-b", ttl_s=3600, force=True)
    assert "no consumer has written a score of model-b for 2.0 h" in caplog.text
    assert current_model(db) == "model-b"


def test_the_cli_lists_models_and_promotes(
    db: AnyRedis, stack: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cli_env(db, stack, monkeypatch)
    write(sink_for(db), "model-a", ["t1", "t2"], primary=True)
    write(sink_for(db), "model-b", ["t1"], primary=False)
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "no promotion yet" in listing and "model-a" in listing and "model-b" in listing
    assert main(["promote", "model-b"]) == 0
    assert "promoted model-b" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "* model-b" in capsys.readouterr().out
    assert main(["promote", "unknown"]) == 1
    assert main(["models", "--drop", "model-b"]) == 1, "the current model is never dropped"
    assert main(["models", "--drop", "model-a"]) == 0
    assert "dropped model-a" in capsys.readouterr().out
    assert [entry.version for entry in models(db)] == ["model-b"]
    assert not list(db.scan_iter(match="popscore:model:model-a:*"))
    assert view_version(db, "t2") == "model-a", "the view keeps what it shows"
