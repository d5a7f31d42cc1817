"""Integration fixtures: a real Kafka and Redis, started once per session, unique topics per test;
a local S3-protocol server (moto) for the s3:// tests, started only when one of them runs.

``deploy/local/stack-up.sh`` starts both unless ``POPSCORE_KAFKA_BOOTSTRAP`` /
``POPSCORE_REDIS_URL`` already point at running services; it waits on readiness itself.
``deploy/local/s3-up.sh`` does the same for S3 on 127.0.0.1:9000 (``S3_LOCAL_PORT``).
"""

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from redis.cluster import RedisCluster

from consumer.kafka import delete_topics, ensure_topics
from consumer.redis_client import with_database

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("POPSCORE_TEST_MODEL", ROOT / "models" / "demo.pt"))


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """Bootstrap servers and Redis URL of a running stack."""
    subprocess.run([str(ROOT / "deploy/local/stack-up.sh")], check=True, timeout=300)
    return {
        "bootstrap": os.environ.get("POPSCORE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        "redis_url": os.environ.get("POPSCORE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    }


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    """A seed node of a local Redis Cluster (3 primaries, 3 replicas), started on demand by
    ``deploy/local/redis-cluster-up.sh`` and left running (like the stack) for the next run."""
    subprocess.run([str(ROOT / "deploy/local/redis-cluster-up.sh")], check=True, timeout=180)
    return f"redis://127.0.0.1:{os.environ.get('REDIS_CLUSTER_PORT', '7000')}"


def database_url(stack: dict[str, str], db: int) -> str:
    """The stack's Redis URL with database ``db``: redis-py takes a URL's database over a
    ``db=`` argument, so ``from_url(url, db=11)`` is still database 0 (which that flushed)."""
    url = with_database(stack["redis_url"], db)
    assert redis.Redis.from_url(url).connection_pool.connection_kwargs["db"] == db
    return url


def flush_cluster(client: RedisCluster) -> None:
    """Empty every primary (replicas follow)."""
    for node in client.get_primaries():
        client.get_redis_connection(node).flushall()


# s3-up.sh's exit status when moto[server] is missing and pip cannot install it.
S3_EXIT_NO_MOTO = 3


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a local S3 server. One this session started is stopped at its end;
    one that was already answering is left running."""
    up = subprocess.run(
        [str(ROOT / "deploy/local/s3-up.sh")],
        check=False,  # exit 3 (no moto) skips; anything else fails below, with its output
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode == S3_EXIT_NO_MOTO:
        pytest.skip(f"no local S3 server: {up.stderr.strip()}")
    assert up.returncode == 0, f"s3-up.sh failed: {up.stdout}{up.stderr}"
    yield f"http://127.0.0.1:{os.environ.get('S3_LOCAL_PORT', '9000')}"
    if "s3: started" in up.stdout:
        subprocess.run([str(ROOT / "deploy/local/s3-down.sh")], check=True, timeout=60)


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not MODEL.is_file():
        pytest.fail(f"{MODEL} is missing: run `make model`")
    return MODEL


@pytest.fixture
def topics(stack: dict[str, str]) -> Iterator[dict[str, str]]:
    """Fresh input, results and DLQ topics (3 partitions each) and a fresh group for one test;
    afterwards these and every topic a test named after them (``{output}-shadow``, ...) go."""
    tag = uuid.uuid4().hex[:10]
    names = {
        "input": f"releases-{tag}",
        "output": f"scores-{tag}",
        "dlq": f"dlq-{tag}",
        "group": f"popscore-{tag}",
    }
    ensure_topics(
        {"bootstrap.servers": stack["bootstrap"]},
        [names["input"], names["output"], names["dlq"]],
        partitions=3,
    )
    yield names
    delete_topics({"bootstrap.servers": stack["bootstrap"]}, tag)


@pytest.fixture
def redis_client(stack: dict[str, str]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack["redis_url"])
    yield client
    client.close()


@pytest.fixture
def consumer_env(
    stack: dict[str, str], topics: dict[str, str], model_path: Path, tmp_path: Path
) -> dict[str, str]:
    """POPSCORE_* settings pointing a consumer at this test's topics and audio folder."""
    audio = tmp_path / "audio"
    audio.mkdir()
    return {
        "POPSCORE_KAFKA_BOOTSTRAP": stack["bootstrap"],
        "POPSCORE_REDIS_URL": stack["redis_url"],
        "POPSCORE_MODEL": str(model_path),
        "POPSCORE_DEVICE": "cpu",
        "POPSCORE_INPUT_TOPIC": topics["input"],
        "POPSCORE_OUTPUT_TOPIC": topics["output"],
        "POPSCORE_DLQ_TOPIC": topics["dlq"],
        "POPSCORE_GROUP_ID": topics["group"],
        "POPSCORE_HTTP_PORT": "0",
        "POPSCORE_BATCH_SIZE": "8",
        "POPSCORE_BATCH_WAIT_MS": "100",
        "POPSCORE_AUDIO_FILE_ROOTS": str(audio),
    }


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` from the start (read_committed), stopping once all partitions
    are at their end and at least ``expected`` records arrived, or at the timeout."""
    import time

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    consumer.subscribe([topic])
    records, at_end = [], set()
    deadline = time.monotonic() + timeout_s
    partitions = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            at_end.add(msg.partition())
            if len(at_end) == partitions and len(records) >= expected:
                break
            continue
        at_end.discard(msg.partition())
        records.append(msg)
    consumer.close()
    return records


def committed_and_end(bootstrap: str, group: str, topic: str) -> tuple[list[int], list[int]]:
    """The group's committed offset and the end offset of each partition of ``topic``."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    n = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    parts = [TopicPartition(topic, p) for p in range(n)]
    committed = [tp.offset for tp in consumer.committed(parts, timeout=10)]
    ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
    consumer.close()
    return committed, ends
