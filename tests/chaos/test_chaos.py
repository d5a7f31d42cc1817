"""Chaos: kill -9, Redis outage, broker restart, a group member killed, Redis Cluster primaries
killed and failed over — and nothing lost,
nothing duplicated in the read_committed results, Redis complete, the DLQ exactly the bad ones.

``make test`` runs these with CHAOS_EVENTS=300; ``make chaos`` with 2,000 (docs/RELIABILITY.md).
"""

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import soundfile as sf
from redis.cluster import RedisCluster

from consumer.commit import EXIT_WEDGED
from consumer.kafka import ensure_topics
from consumer.redis_client import AnyRedis, close
from popscore.artifact import load, resave
from schemas import ScoreRecord
from schemas.redis_keys import CLUSTER
from tests.chaos.harness import (
    CHAOS_KAFKA,
    Corpus,
    KillingAudioServer,
    Supervisor,
    all_committed,
    audit,
    make_corpus,
    poison,
    scored_count,
    send,
    wait_until,
)
from tests.conftest import free_port
from tests.integration.conftest import ROOT, flush_cluster, read_all

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(900)]
EVENTS = int(os.environ.get("CHAOS_EVENTS", "300"))
KILLS = 5
RUN_TIMEOUT_S = 600
LOCAL_STACK = not (
    os.environ.get("POPSCORE_KAFKA_BOOTSTRAP") or os.environ.get("POPSCORE_REDIS_URL")
)


@pytest.fixture
def chaos_env(consumer_env: dict[str, str]) -> dict[str, str]:
    return {
        **consumer_env,
        "POPSCORE_KAFKA_PROPERTIES": json.dumps(CHAOS_KAFKA),
        "POPSCORE_BATCH_SIZE": "16",
        "POPSCORE_SHUTDOWN_GRACE_S": "20",
    }


def run_scenario(
    name: str,
    env: dict[str, str],
    client: AnyRedis,
    tmp_path: Path,
    consumers: int,
    fault: Callable[[Supervisor, Corpus], None],
    forbidden_exit: int | None = None,
    supervisor: Supervisor | None = None,
    spoil: Callable[[Corpus, list[tuple[bytes, bytes]]], None] | None = None,
) -> Supervisor:
    corpus, records = make_corpus(EVENTS, Path(env["POPSCORE_AUDIO_FILE_ROOTS"]))
    if spoil:
        spoil(corpus, records)
    send(env, records)
    supervisor = supervisor or Supervisor(env, tmp_path)
    for i in range(consumers):
        supervisor.start(f"c{i}", free_port())
    try:
        fault(supervisor, corpus)
        done = wait_until(
            lambda: scored_count(client, corpus) == len(corpus.good) and all_committed(env),
            RUN_TIMEOUT_S,
            supervisor.tick,
        )
    finally:
        supervisor.stop_all()
    result = audit(env, corpus, client)
    line = result.line(name) + f" restarts={supervisor.restarts} exits={supervisor.exit_codes}"
    print(line)
    if report := os.environ.get("CHAOS_REPORT"):
        with open(report, "a") as out:
            out.write(line + "\n")
    assert done, f"{name}: not every event was scored and committed in time; {line}"
    assert (result.lost, result.duplicated, result.missing_in_redis, result.dlq_wrong) == (
        0,
        0,
        0,
        0,
    ), f"{line}; duplicated (partition, offset, scored_at): {result.duplicates[:10]}"
    assert forbidden_exit not in supervisor.exit_codes, line
    return supervisor


def progress(client: AnyRedis, corpus: Corpus, fraction: float, sup: Supervisor) -> None:
    target = int(len(corpus.good) * fraction)
    assert wait_until(lambda: scored_count(client, corpus) >= target, RUN_TIMEOUT_S, sup.tick)


def test_kill_9_repeatedly(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    def fault(sup: Supervisor, corpus: Corpus) -> None:
        for k in range(1, KILLS + 1):
            progress(redis_client, corpus, k / (KILLS + 2), sup)
            sup.kill("c0")  # the supervisor restarts it, like an orchestrator
            sup.tick()

    run_scenario("kill-9", chaos_env, redis_client, tmp_path, 1, fault)


def test_kill_9_repeatedly_with_a_shadow_model(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, model_path: Path
) -> None:
    """The same kills with a shadow model beside the primary: the primary's figures stay zero,
    and the shadow topic never holds an event twice (a late or failed shadow may miss some)."""
    artifact = load(model_path)
    meta = artifact.meta.replace(model_version=f"{artifact.meta.model_version}-shadow")
    shadow = resave(artifact.module, tmp_path / "shadow.pt", meta)
    topic = chaos_env["POPSCORE_OUTPUT_TOPIC"] + "-shadow"
    bootstrap = chaos_env["POPSCORE_KAFKA_BOOTSTRAP"]
    ensure_topics({"bootstrap.servers": bootstrap}, [topic], 3)
    env = {**chaos_env, "POPSCORE_SHADOW_MODEL": str(shadow), "POPSCORE_SHADOW_TOPIC": topic}

    def fault(sup: Supervisor, corpus: Corpus) -> None:
        for k in range(1, KILLS + 1):
            progress(redis_client, corpus, k / (KILLS + 2), sup)
            sup.kill("c0")
            sup.tick()

    run_scenario("kill-9-shadow", env, redis_client, tmp_path, 1, fault)
    seen = Counter(ScoreRecord.from_json(m.value()).event_id for m in read_all(bootstrap, topic, 0))
    duplicated = sum(count - 1 for count in seen.values() if count > 1)
    line = f"chaos[kill-9-shadow] shadow topic: events={len(seen)} duplicated={duplicated}"
    print(line)
    if report := os.environ.get("CHAOS_REPORT"):
        with open(report, "a") as out:
            out.write(line + "\n")
    assert duplicated == 0, line
    assert len(seen) > 0, line


def own_stack_pid(service: str) -> int:
    """The pid of ``service`` (redis, kafka) as this checkout's stack started it; a running
    service started elsewhere (another checkout's .stack) fails the scenario at once: stopping it
    and starting ours would lose its data and wait for a recovery that cannot come."""
    stack = ROOT / ".stack"
    pidfile = stack / service / f"{service}.pid"
    try:
        pid = int(pidfile.read_text())
        proc = Path(f"/proc/{pid}")
        cwd, cmdline = proc.joinpath("cwd").resolve(), proc.joinpath("cmdline").read_bytes()
    except (OSError, ValueError):
        pytest.fail(f"the running {service} was not started by this checkout ({pidfile})")
    if not (cwd.is_relative_to(stack) or str(stack).encode() in cmdline):
        pytest.fail(f"the running {service} (pid {pid}) belongs to another checkout, not {stack}")
    return pid


@pytest.mark.skipif(not LOCAL_STACK, reason="needs the local stack to stop Redis")
def test_redis_down_for_20_seconds(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    own_stack_pid("redis")

    def fault(sup: Supervisor, corpus: Corpus) -> None:
        progress(redis_client, corpus, 0.3, sup)
        # SAVE first: the local Redis has no persistence, and an outage must not lose data.
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "save"], check=False)
        end = time.monotonic() + 20
        wait_until(lambda: time.monotonic() >= end, 25, sup.tick)
        subprocess.run([str(ROOT / "deploy/local/stack-up.sh")], check=True, timeout=120)

    run_scenario("redis-down-20s", chaos_env, redis_client, tmp_path, 1, fault)


@pytest.mark.skipif(not LOCAL_STACK, reason="needs the local stack to restart Kafka")
def test_kafka_broker_restart(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    own_stack_pid("kafka")

    def fault(sup: Supervisor, corpus: Corpus) -> None:
        progress(redis_client, corpus, 0.3, sup)
        pid = own_stack_pid("kafka")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, sup.tick)
        subprocess.run([str(ROOT / "deploy/local/stack-up.sh")], check=True, timeout=180)

    # No wedged transactional call (before metadata.recovery.strategy=none, one exit 75 per
    # broker restart: librdkafka#5511). An outage longer than the chaos transaction timeout
    # (10 s) may still end the transaction on the broker's side: that is fatal for the
    # producer (exit 1) and the restart recovers.
    run_scenario(
        "kafka-restart", chaos_env, redis_client, tmp_path, 1, fault, forbidden_exit=EXIT_WEDGED
    )


def test_two_consumers_one_killed(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    def fault(sup: Supervisor, corpus: Corpus) -> None:
        progress(redis_client, corpus, 0.3, sup)
        sup.kill("c1", for_good=True)

    run_scenario("two-consumers-one-killed", chaos_env, redis_client, tmp_path, 2, fault)


@pytest.fixture
def cluster_client(redis_cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url)
    flush_cluster(client)
    yield client
    close(client)


def cluster_node_pid(port: int) -> int:
    return int((ROOT / ".stack" / "redis-cluster" / str(port) / "redis.pid").read_text())


def serving_port(client: RedisCluster, key: str) -> int:
    """The port of the primary that serves ``key``'s slot, as the cluster says now."""
    client.nodes_manager.initialize()
    return int(client.get_node_from_key(key).port)


def fail_over(client: RedisCluster, port: int, sup: Supervisor) -> None:
    """kill -9 the primary on ``port``, wait until its replica serves its slots, then start it
    again (it rejoins as the new primary's replica), like an orchestrator would."""
    client.nodes_manager.initialize()
    keys = (f"probe-{i}" for i in range(100_000))
    probe = next(k for k in keys if int(client.get_node_from_key(k).port) == port)
    os.kill(cluster_node_pid(port), signal.SIGKILL)
    assert wait_until(lambda: _served_elsewhere(client, probe, port), 60, sup.tick), "no failover"
    subprocess.run([str(ROOT / "deploy/local/redis-cluster-up.sh")], check=True, timeout=120)


def _served_elsewhere(client: RedisCluster, key: str, port: int) -> bool:
    try:
        return serving_port(client, key) != port
    except Exception:
        return False


def test_redis_cluster_primary_killed_twice(
    chaos_env: dict[str, str], cluster_client: RedisCluster, redis_cluster_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Two primaries killed (kill -9) mid-run and failed over: the first serves the pointer
    every batch reads, the second the tracks' hashes of one third of the slots."""
    env = {**chaos_env, "POPSCORE_REDIS_URL": redis_cluster_url, "POPSCORE_REDIS_CLUSTER": "true"}
    seed = int(redis_cluster_url.rsplit(":", 1)[1])

    def fault(sup: Supervisor, corpus: Corpus) -> None:
        progress(cluster_client, corpus, 0.3, sup)
        first = serving_port(cluster_client, CLUSTER.current_model)
        primaries = {int(n.port) for n in cluster_client.get_primaries()}
        first = first if first != seed else min(primaries - {seed})
        fail_over(cluster_client, first, sup)
        progress(cluster_client, corpus, 0.6, sup)
        primaries = {int(n.port) for n in cluster_client.get_primaries()}
        fail_over(cluster_client, min(primaries - {seed, first}), sup)

    run_scenario("redis-cluster-failover-x2", env, cluster_client, tmp_path, 1, fault)


def test_records_that_kill_the_consumer(
    chaos_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Records whose audio kills the consumer that fetches it (SIGKILL, as a codec's SIGSEGV
    or the OOM killer would), two consumers restarted by the supervisor: each such record costs
    at most POPSCORE_CRASH_LIMIT + 1 (3) deaths, wherever its partition moves meanwhile, and
    is dead-lettered `process_crashed`; every other event is scored exactly once. Without the
    crash journal the first of them stops its partition for good (a crash loop)."""
    count = max(2, EVENTS // 500)
    tone = tmp_path / "tone.wav"
    sf.write(tone, np.zeros(22_050, np.float32), 22_050)
    supervisor = Supervisor({**chaos_env, "POPSCORE_AUDIO_ALLOW_PRIVATE_HOSTS": "true"}, tmp_path)
    pids = lambda: [proc.pid for proc in supervisor.procs.values()]  # noqa: E731
    with KillingAudioServer(tone.read_bytes(), pids) as server:
        run_scenario(
            "records-that-kill",
            supervisor.env,
            redis_client,
            tmp_path,
            2,
            lambda _sup, _corpus: None,
            supervisor=supervisor,
            spoil=lambda corpus, records: poison(corpus, records, server.url, count),
        )
    line = f"chaos[records-that-kill] poison={count} kills={len(server.kills)} per record=" + str(
        dict(Counter(server.kills))
    )
    print(line)
    if report := os.environ.get("CHAOS_REPORT"):
        with open(report, "a") as out:
            out.write(line + "\n")
    assert server.unattributed == 0, line
    assert len(Counter(server.kills)) == count and max(Counter(server.kills).values()) <= 3, line
    assert supervisor.exit_codes == [-signal.SIGKILL] * len(server.kills), line
