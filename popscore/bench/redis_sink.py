"""The Redis sink on one node against Redis Cluster, side by side in one run
(``make bench-redis``): batch write latency at the same offered load, the most records per
second one writer reaches, and Redis memory per 10⁶ tracks by kind of key.

It needs an empty Redis database and an empty cluster (it refuses others) and empties them
again at the end; memory is the growth of ``used_memory`` (summed over a cluster's primaries;
replicas hold as much again) while it writes.
"""

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from redis.cluster import RedisCluster

from consumer.cluster_sink import ClusterRedisSink
from consumer.redis_client import AnyRedis, close, connect, node_clients, scan_prefix
from consumer.sinks import RedisSink
from popscore.bench.stats import machine, percentile
from schemas.redis_keys import model_prefix
from schemas.scores import ScoreRecord

DAYS = 30  # the memory fill spreads its tracks over a month of day leaderboards
FILL_BATCH = 256


@dataclass
class Latency:
    batches: int
    batch_size: int
    offered_batches_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Memory:
    tracks: int
    bytes_per_million: dict[str, float]
    """Per 10⁶ tracks: ``hashes`` (view + model hash of each track), ``leaderboards`` (view +
    model day ZSETs; on a cluster with their sequence companions), ``markers`` (one event
    marker per track), ``total``."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = {"single": (args.single, False), "cluster": (args.cluster, True)}
    report: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)}}
    for name, (url, cluster) in targets.items():
        client = connect(url, cluster, socket_timeout=60)
        try:
            report[name] = _measure(client, cluster, args)
        finally:
            close(client)
        print(f"{name}: {json.dumps(report[name])}", file=sys.stderr)
    report["ratios"] = _ratios(report)
    print(json.dumps(report["ratios"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m popscore.bench.redis_sink")
    parser.add_argument("--single", default="redis://127.0.0.1:6379/7", help="one node's URL")
    parser.add_argument("--cluster", default="redis://127.0.0.1:7000", help="a cluster node")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="records per write (service default)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="offered batches per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load run")
    parser.add_argument("--min-replicas", type=int, default=1, help="the cluster sink's WAIT")
    parser.add_argument("--tracks", type=int, default=1_000_000, help="tracks in the memory fill")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser


def _measure(client: AnyRedis, cluster: bool, args: argparse.Namespace) -> dict[str, Any]:
    if keys := sum(int(node.dbsize()) for node in node_clients(client)):
        raise SystemExit(
            f"popscore bench-redis: the target holds {keys} keys; give it an empty one"
        )
    sink = (
        ClusterRedisSink(client, min_replicas=args.min_replicas)
        if isinstance(client, RedisCluster)
        else RedisSink(client)
    )
    version = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        at_rate = _load(sink, version, "r", args.batch_size, args.rate, args.seconds)
        flat_out = _throughput(sink, version, "t", args.batch_size, args.seconds)
        _flush(client)
        memory = _memory(client, sink, version, "m", args.tracks)
    finally:
        _flush(client)
    return {"at_rate": asdict(at_rate), "max_records_per_s": flat_out, "memory": asdict(memory)}


def _records(version: str, prefix: str, start: int, n: int, days: int = 1) -> list[ScoreRecord]:
    base = datetime(2026, 11, 1, 12, tzinfo=UTC)
    return [
        ScoreRecord(
            event_id=f"{prefix}-e{i}",
            track_id=f"{prefix}-t{i}",
            model_version=version,
            popularity=(i * 37) % 1000 / 10,
            hit_probability=0.5,
            is_hit=False,
            audio_used=True,
            emitted_at=base + timedelta(days=i % days),
            scored_at=base + timedelta(days=i % days, seconds=1),
            latency_ms=900.0,
        )
        for i in range(start, start + n)
    ]


def _write(sink: RedisSink, records: list[ScoreRecord], offset: int) -> None:
    sources = [f"bench/0/{offset + i}" for i in range(len(records))]
    sink.write(records, sources, threading.Event())


def _load(
    sink: RedisSink, version: str, prefix: str, size: int, rate: float, seconds: float
) -> Latency:
    """Batches offered at ``rate`` per second (open loop: a late batch does not delay the
    schedule of the next), each batch's write timed."""
    n = max(1, int(rate * seconds))
    batches = [_records(version, prefix, i * size, size) for i in range(n)]
    start, took = time.perf_counter(), []
    for i, batch in enumerate(batches):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        _write(sink, batch, i * size)
        took.append((time.perf_counter() - t0) * 1000)
    p50, p95, p99 = (percentile(took, q) for q in (50, 95, 99))
    return Latency(n, size, rate, p50, p95, p99, max(took))


def _throughput(sink: RedisSink, version: str, prefix: str, size: int, seconds: float) -> float:
    """Records per second one writer reaches, back to back."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _write(sink, _records(version, prefix, done, size), done)
        done += size
    return done / (time.perf_counter() - start)


def _memory(client: AnyRedis, sink: RedisSink, version: str, prefix: str, tracks: int) -> Memory:
    """Fill ``tracks`` tracks, then delete each kind of key and see what the memory drops by."""
    before = _used(client)
    for start in range(0, tracks, FILL_BATCH):
        _write(sink, _records(version, prefix, start, min(FILL_BATCH, tracks - start), DAYS), start)
    total = _used(client) - before
    markers = _delete(client, f"{model_prefix(version)}event:")
    boards = _delete(client, "popscore:leaderboard:", f"{model_prefix(version)}leaderboard:")
    hashes = _used(client) - before
    scale = 1_000_000 / tracks
    per_million = {
        "hashes": hashes * scale,
        "leaderboards": boards * scale,
        "markers": markers * scale,
        "total": total * scale,
    }
    return Memory(tracks, per_million)


def _delete(client: AnyRedis, *prefixes: str) -> int:
    """Delete every key under ``prefixes``; returns how far ``used_memory`` fell."""
    before = _used(client)
    for prefix in prefixes:
        batch = []
        for key in scan_prefix(client, prefix):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    _settle(client)
    return before - _used(client)


def _flush(client: AnyRedis) -> None:
    for node in node_clients(client):
        node.flushdb()
    _settle(client)


def _used(client: AnyRedis) -> int:
    _settle(client)
    return sum(int(node.info("memory")["used_memory"]) for node in node_clients(client))


def _settle(client: AnyRedis, wait: Callable[[float], None] = time.sleep) -> None:
    """UNLINK frees in the background: wait until no node has frees pending."""
    for _ in range(200):
        pending = sum(
            int(n.info("memory").get("lazyfree_pending_objects", 0)) for n in node_clients(client)
        )
        if not pending:
            return
        wait(0.05)


def _ratios(report: dict[str, Any]) -> dict[str, Any]:
    single, cluster = report["single"], report["cluster"]
    rate = {q: cluster["at_rate"][q] / single["at_rate"][q] for q in ("p50_ms", "p95_ms", "p99_ms")}
    return {
        "cluster_over_single_latency_at_same_rate": rate,
        "cluster_over_single_max_throughput": cluster["max_records_per_s"]
        / single["max_records_per_s"],
        "bytes_per_million_tracks": {
            "single": single["memory"]["bytes_per_million"],
            "cluster": cluster["memory"]["bytes_per_million"],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
