"""The sink on a real local Redis Cluster (3 primaries, 3 replicas): what the cluster layout
adds to the single-node guarantees. The upsert's semantics themselves run on both in
test_rollout.py; kills and failovers are in tests/chaos (redis-cluster-failover-x2)."""

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from consumer import cluster_sink, rollout
from consumer.cluster_sink import ClusterRedisSink, board_ops_calls
from consumer.errors import ConfigError, DeadLetter, SinkError
from consumer.redis_client import NodePipelines, close, connect
from consumer.rollout import promote
from consumer.sinks import Upsert
from schemas import ScoreRecord
from schemas.dead_letter import DeadLetterReason
from schemas.redis_keys import CLUSTER
from tests.integration.conftest import flush_cluster

pytestmark = pytest.mark.integration
DAY = datetime(2026, 11, 30, 12, tzinfo=UTC)


@pytest.fixture
def cluster(redis_cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url)
    flush_cluster(client)
    yield client
    flush_cluster(client)
    close(client)


def record(version: str, track: str, event_id: str, when: datetime = DAY) -> ScoreRecord:
    return ScoreRecord(
        event_id=event_id,
        track_id=track,
        model_version=version,
        popularity=20.0 if version == "model-a" else 80.0,
        hit_probability=0.5,
        is_hit=False,
        audio_used=True,
        emitted_at=when,
        scored_at=when + timedelta(seconds=1),
        latency_ms=1.0,
    )


def test_a_reader_reads_the_view_with_the_documented_helper(cluster: RedisCluster) -> None:
    sink = ClusterRedisSink(cluster, min_replicas=1)
    events = [record("model-a", f"t{i}", f"e{i}") for i in range(40)]
    codes = sink.write(events, [f"in/0/{i}" for i in range(40)], threading.Event())
    assert codes == [Upsert.WRITTEN] * 40
    keys = CLUSTER  # what a reader builds: RedisKeys.for_cluster(True)
    for event in events:
        stored = ScoreRecord.from_redis(cluster.hgetall(keys.score(event.track_id)))
        assert (stored.event_id, stored.popularity) == (event.event_id, 20.0)
    ranked = cluster.zrange(keys.leaderboard(DAY.date()), 0, -1, withscores=True)
    assert sorted(ranked) == sorted((e.track_id.encode(), 20.0) for e in events)
    slots = {cluster.keyslot(keys.score(e.track_id)) for e in events}
    assert len(slots) > 10, "tracks spread over the cluster's slots"


def test_writes_wait_for_replicas_and_are_retried_until_they_have_them(
    cluster: RedisCluster,
) -> None:
    """Each primary has one replica: asking for two can never be met, so the write is retried
    (never reported done) until the consumer stops."""
    sink = ClusterRedisSink(cluster, min_replicas=2, replica_wait_ms=50)
    stop = threading.Event()
    stop.set()  # one attempt, then give up as a stopping consumer does
    with pytest.raises(SinkError, match="not on 2 replica"):
        sink.write([record("model-a", "t1", "e1")], ["in/0/1"], stop)
    assert sink.failing and "replica" in sink.failing


def test_a_late_leaderboard_change_never_undoes_a_newer_one(cluster: RedisCluster) -> None:
    sink = ClusterRedisSink(cluster)
    next_day = DAY + timedelta(days=1)
    sink.write([record("model-a", "t1", "e1")], ["in/0/1"], threading.Event())
    sink.write([record("model-a", "t1", "e2", next_day)], ["in/0/2"], threading.Event())
    day, later = CLUSTER.leaderboard(DAY.date()), CLUSTER.leaderboard(next_day.date())
    assert cluster.zscore(day, "t1") is None and cluster.zscore(later, "t1") == 20.0
    # The first write's "add to day 1" arrives late (a zombie consumer, a retried call): its
    # sequence is older than the move's, so the day keeps the track out.
    nodes = NodePipelines(cluster, list(cluster_sink.SCRIPTS.values()))
    nodes.run(board_ops_calls([[day, "t1", "1", "20.0"]], ttl_s=0))
    assert cluster.zscore(day, "t1") is None
    assert cluster.zscore(later, "t1") == 20.0


def test_a_view_write_from_before_a_promotion_is_retried_with_the_new_pointer(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer read the pointer (none: its primary model-a writes the view) just before
    ``promote model-b`` switched the track: its view write is refused by the track's newer
    epoch and redone under the new pointer, so the view keeps model-b."""
    sink = ClusterRedisSink(cluster)
    sink.write([record("model-a", "t1", "e1")], ["in/0/1"], threading.Event())
    sink.write([record("model-b", "t1", "e1")], ["bf/0/1"], threading.Event(), primary=False)
    promote(cluster, "model-b")
    reads = iter([("", 0)])  # the stale read, once; then the real one
    real = cluster_sink._pointer
    monkeypatch.setattr(cluster_sink, "_pointer", lambda reply: next(reads, None) or real(reply))
    later = record("model-a", "t1", "e9", DAY + timedelta(hours=1))
    assert sink.write([later], ["in/0/9"], threading.Event()) == [Upsert.WRITTEN]
    view = ScoreRecord.from_redis(cluster.hgetall(CLUSTER.score("t1")))
    assert view.model_version == "model-b", "model-a is no longer current"
    mine = ScoreRecord.from_redis(cluster.hgetall(CLUSTER.model_score("model-a", "t1")))
    assert mine.event_id == "e9", "its own namespace has it"


def test_a_track_id_the_layout_cannot_place_costs_that_record_alone(cluster: RedisCluster) -> None:
    sink = ClusterRedisSink(cluster)
    batch = [record("model-a", "}odd", "e1"), record("model-a", "fine", "e2")]
    bad, good = sink.write(batch, ["in/0/1", "in/0/2"], threading.Event())
    assert isinstance(bad, DeadLetter) and bad.reason is DeadLetterReason.INVALID_EVENT
    assert "hash tag" in bad.detail
    assert good is Upsert.WRITTEN and cluster.exists(CLUSTER.score("fine"))


def test_a_key_of_the_wrong_type_costs_its_record_alone(cluster: RedisCluster) -> None:
    sink = ClusterRedisSink(cluster)
    cluster.set(CLUSTER.model_score("model-a", "bad"), "not a hash")
    batch = [record("model-a", track, f"e-{track}") for track in ("a", "bad", "b")]
    good, bad, also = sink.write(batch, ["in/0/1", "in/0/2", "in/0/3"], threading.Event())
    assert good is Upsert.WRITTEN and also is Upsert.WRITTEN
    assert isinstance(bad, DeadLetter) and bad.reason is DeadLetterReason.INTERNAL_ERROR
    assert CLUSTER.model_score("model-a", "bad") in bad.detail and "not a hash" in bad.detail
    assert cluster.exists(CLUSTER.score("a")) and cluster.exists(CLUSTER.score("b"))


def test_a_record_whose_view_key_is_wrong_leaves_nothing_behind(cluster: RedisCluster) -> None:
    """The track's hashes are read before the record writes anything, so its dead letter is
    the whole story: no score in its model's namespace either."""
    sink = ClusterRedisSink(cluster)
    cluster.set(CLUSTER.score("bad"), "not a hash")
    batch = [record("model-a", track, f"e-{track}") for track in ("a", "bad")]
    good, bad = sink.write(batch, ["in/0/1", "in/0/2"], threading.Event())
    assert good is Upsert.WRITTEN and isinstance(bad, DeadLetter)
    assert CLUSTER.score("bad") in bad.detail
    assert not cluster.exists(CLUSTER.model_score("model-a", "bad"))


def test_a_key_many_records_write_of_the_wrong_type_stops_the_process_naming_it(
    cluster: RedisCluster,
) -> None:
    cluster.set(CLUSTER.models, "not a set")
    sink, batch = ClusterRedisSink(cluster), [record("model-a", "a", "e1")]
    with pytest.raises(SinkError, match="holds a string, not a set"):
        sink.write(batch, ["in/0/1"], threading.Event())


def test_the_day_a_track_leaves_of_the_wrong_type_stops_the_process_naming_it(
    cluster: RedisCluster,
) -> None:
    """A day leaderboard is written by every record of the day: not one record's fault."""
    sink, stop = ClusterRedisSink(cluster), threading.Event()
    assert sink.write([record("model-a", "a", "e1")], ["in/0/1"], stop) == [Upsert.WRITTEN]
    left = CLUSTER.model_leaderboard("model-a", DAY.date())
    cluster.delete(left)
    cluster.set(left, "not a zset")
    later = [record("model-a", "a", "e2", DAY + timedelta(days=1)), record("model-a", "b", "e3")]
    with pytest.raises(SinkError, match=f"'{re.escape(left)}' holds a string, not a zset"):
        sink.write(later, ["in/0/2", "in/0/3"], stop)


def test_a_split_batch_counts_each_new_track_at_most_once(cluster: RedisCluster) -> None:
    """A failed round trip may already have counted its tracks: a retry never counts again."""
    sink = ClusterRedisSink(cluster)
    cluster.set(CLUSTER.model_score("model-a", "bad"), "not a hash")
    batch = [record("model-a", track, f"e-{track}") for track in ("a", "b", "c", "bad")]
    codes = sink.write(batch, [f"in/0/{i}" for i in range(4)], threading.Event())
    assert codes[:3] == [Upsert.WRITTEN] * 3 and isinstance(codes[3], DeadLetter)
    assert int(cluster.hget(CLUSTER.model_info("model-a"), "tracks") or 0) <= 3


def test_a_retried_batch_still_takes_the_track_off_its_old_day(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4 fails once after step 3 moved the track to a new day (a failover, a crash and
    replay): the retry finds the hash already moved and repeats the removal it recorded."""
    sink = ClusterRedisSink(cluster)
    sink.write([record("model-a", "t1", "e1")], ["in/0/1"], threading.Event())
    real, failures = cluster_sink.board_ops_calls, iter([True])

    def flaky(ops: list[list[str]], ttl_s: int) -> list[Any]:
        if next(failures, False):
            raise redis.exceptions.ConnectionError("the day's primary went away")
        return real(ops, ttl_s)

    monkeypatch.setattr(cluster_sink, "board_ops_calls", flaky)
    next_day = DAY + timedelta(days=1)
    codes = sink.write([record("model-a", "t1", "e2", next_day)], ["in/0/2"], threading.Event())
    assert codes == [Upsert.WRITTEN]
    assert cluster.zscore(CLUSTER.leaderboard(DAY.date()), "t1") is None, "off the old day"
    assert cluster.zscore(CLUSTER.leaderboard(next_day.date()), "t1") == 20.0


def test_a_promotion_stopped_before_its_leaderboard_changes_is_finished_by_running_it_again(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = ClusterRedisSink(cluster)
    next_day = DAY + timedelta(days=1)
    sink.write([record("model-a", "t1", "e1")], ["in/0/1"], threading.Event())
    sink.write(
        [record("model-b", "t1", "e2", next_day)], ["bf/0/1"], threading.Event(), primary=False
    )
    real = rollout.board_ops_calls

    def broken(ops: list[list[str]], ttl_s: int) -> list[Any]:
        raise redis.exceptions.ConnectionError("the promoting process lost Redis")

    monkeypatch.setattr(rollout, "board_ops_calls", broken)
    with pytest.raises(redis.exceptions.ConnectionError):
        promote(cluster, "model-b")
    assert ScoreRecord.from_redis(cluster.hgetall(CLUSTER.score("t1"))).model_version == "model-b"
    assert cluster.zscore(CLUSTER.leaderboard(next_day.date()), "t1") is None, "not yet"
    monkeypatch.setattr(rollout, "board_ops_calls", real)
    promote(cluster, "model-b")
    assert cluster.zscore(CLUSTER.leaderboard(DAY.date()), "t1") is None
    assert cluster.zscore(CLUSTER.leaderboard(next_day.date()), "t1") == 80.0


def test_a_new_track_written_under_a_pointer_a_promotion_replaced_is_redone(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shadow for model-b read the pointer (model-a) before ``promote model-b`` began, and
    created a new track's hash after the promotion's scan had passed it: the pointer read again
    with the leaderboard changes shows the promotion, and the write is redone into the view."""
    sink = ClusterRedisSink(cluster)
    sink.write([record("model-a", "t0", "e0")], ["in/0/0"], threading.Event())
    sink.write([record("model-b", "t0", "e0")], ["sh/0/0"], threading.Event(), primary=False)
    promote(cluster, "model-a")
    stale = ("model-a", int(cluster.get(CLUSTER.promotion_epoch) or 0))
    promote(cluster, "model-b")
    reads = iter([stale])  # step 1's read, from before the promotion; then the real ones
    real = cluster_sink._pointer
    monkeypatch.setattr(cluster_sink, "_pointer", lambda reply: next(reads, None) or real(reply))
    new = record("model-b", "t7", "e7")
    assert sink.write([new], ["sh/0/7"], threading.Event(), primary=False) == [Upsert.WRITTEN]
    view = ScoreRecord.from_redis(cluster.hgetall(CLUSTER.score("t7")))
    assert view.model_version == "model-b"
    assert cluster.zscore(CLUSTER.leaderboard(DAY.date()), "t7") == 80.0


def test_cluster_mode_against_a_plain_redis_is_a_bad_setting(stack: dict[str, str]) -> None:
    """One line naming the setting, where a 70-line traceback was."""
    with pytest.raises(ConfigError, match=r"^POPSCORE_REDIS_CLUSTER: .* not in cluster mode$"):
        connect(stack["redis_url"], cluster=True)


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def test_a_write_into_a_slot_being_migrated_goes_through_once_the_migration_ends(
    cluster: RedisCluster,
) -> None:
    """A slot half-migrated (``redis-cli --cluster reshard`` moving it) answers ASK for a key it
    does not hold, and the importing node TRYAGAIN for a multi-key call on keys it does not
    all hold: a new track's two hashes cannot be written until the migration ends. The sink
    follows the ASK and retries TRYAGAIN every 0.5 s at most (it backed off to 5 s, and a
    batch took 11 s over a 7 s reshard: here it would resume at 11.3 s). The migration ends
    after 7 s."""
    source = cluster.get_node_from_key(CLUSTER.score("ask-0"))

    def fits(track: str) -> bool:
        key = CLUSTER.score(track)
        empty = cluster.cluster_countkeysinslot(slot_of(key)) == 0
        return bool(cluster.get_node_from_key(key) == source and empty)

    track = next(t for t in (f"ask-{i}" for i in range(10_000)) if fits(t))
    slot = slot_of(CLUSTER.score(track))
    target = next(n for n in cluster.get_primaries() if n != source)
    ids = {node.name: cluster.cluster_myid(node) for node in (source, target)}
    setslot = "CLUSTER SETSLOT"

    def finish() -> None:  # the source holds no key of the slot: nothing to MIGRATE
        for node in cluster.get_primaries():
            cluster.execute_command(setslot, slot, "NODE", ids[target.name], target_nodes=node)

    ends = threading.Timer(7.0, finish)
    try:
        cluster.execute_command(setslot, slot, "IMPORTING", ids[source.name], target_nodes=target)
        cluster.execute_command(setslot, slot, "MIGRATING", ids[target.name], target_nodes=source)
        ends.start()
        started = time.monotonic()
        codes = ClusterRedisSink(cluster).write(
            [record("model-a", track, f"e-{track}")], ["in/0/1"], threading.Event()
        )
        took = time.monotonic() - started
    finally:
        ends.cancel()
        if ends.is_alive():
            ends.join()
        finish()  # again, whatever happened: no later test may meet an open slot
    assert codes == [Upsert.WRITTEN] and took < 7.0 + 1.5, f"took {took:.1f} s"
    cluster.nodes_manager.initialize()
    stored = ScoreRecord.from_redis(cluster.hgetall(CLUSTER.score(track)))
    assert stored.event_id == f"e-{track}", "on the node that owns the slot now"


def test_promote_is_refused_while_a_slot_is_being_moved(cluster: RedisCluster) -> None:
    """promote and drop scan node by node: a key moving meanwhile was missed, and the
    promotion still said done."""
    sink = ClusterRedisSink(cluster)
    sink.write([record("model-b", "t1", "e1")], ["bf/0/1"], threading.Event(), primary=False)
    source, target = cluster.get_primaries()[:2]
    slot = next(s for s in range(16384) if cluster.nodes_manager.slots_cache[s][0] == source
                and cluster.cluster_countkeysinslot(s) == 0)  # fmt: skip
    ids = {node.name: cluster.cluster_myid(node) for node in (source, target)}
    setslot = "CLUSTER SETSLOT"
    cluster.execute_command(setslot, slot, "IMPORTING", ids[source.name], target_nodes=target)
    cluster.execute_command(setslot, slot, "MIGRATING", ids[target.name], target_nodes=source)
    try:
        with pytest.raises(rollout.PromotionError, match=f"slots are being moved .*{slot} "):
            promote(cluster, "model-b")
        assert rollout.current_model(cluster) is None
    finally:
        for node in (source, target):
            cluster.execute_command(setslot, slot, "STABLE", target_nodes=node)
    # each step's writes wait for a replica, as the sink's do (the local cluster has one each)
    assert promote(cluster, "model-b", min_replicas=1).tracks_replaced == 1


def test_an_epoch_that_went_back_is_named_with_what_to_do(cluster: RedisCluster) -> None:
    """After a promotion, the {meta} primary fails over before its epoch write replicated: the
    switched view hashes carry an epoch the key never reaches again, and every view write of
    those tracks is refused. It used to retry for ever saying the epoch "kept moving"."""
    sink = ClusterRedisSink(cluster)
    sink.write([record("model-b", "t1", "e1")], ["bf/0/1"], threading.Event(), primary=False)
    promote(cluster, "model-b")
    cluster.delete(CLUSTER.promotion_epoch)  # what the lost write leaves
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    later = record("model-b", "t1", "e2", DAY + timedelta(hours=1))
    with pytest.raises(SinkError) as info:
        sink.write([later], ["in/0/2"], stop)
    assert "carries a promotion epoch above popscore:{meta}:promotion:epoch (0)" in str(info.value)
    assert "run `popscore promote model-b` again" in str(info.value)
    # and that works, however far back the key went: an epoch is at least the clock in ms
    cluster.set(CLUSTER.promotion_epoch, 1)
    promote(cluster, "model-b")
    assert sink.write([later], ["in/0/2"], threading.Event()) == [Upsert.WRITTEN]
