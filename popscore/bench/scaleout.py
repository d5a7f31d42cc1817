"""The scale-out curve (``make bench-scaleout``): 1, 2 and 4 ``popscore consume`` processes in
one group on an 8-partition topic, then one process with the batch size and then the decode
workers swept; throughput and latency of each, and how busy the machine's cores were.

Each configuration gets fresh topics and a fresh group. Its processes start, join, and score a
warm-up round (TorchScript's profiling runs, page cache) before the measured events are sent,
all at once. Latency is ``emitted_at`` (the send) to the score's arrival on the results topic
read ``read_committed`` — the moment a downstream reader can see it, one step after the Redis
write. Throughput is events / (first send → last arrival).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from consumer.kafka import client, delete_topics, ensure_topics
from popscore.bench import corpus
from popscore.bench.e2e import send, warmed_producer
from popscore.bench.stats import busy_share, cpu_times, machine, percentile
from schemas.scores import ScoreRecord

PARTITIONS = 8
JOIN_TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Config:
    consumers: int
    batch_size: int
    decode_workers: int


@dataclass
class Point:
    config: Config
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_busy: float
    """Share of the machine's cores busy during the measured run (/proc/stat), 0..1."""


def plan(
    consumers: list[int], batches: list[int], workers: list[int], base: Config
) -> list[Config]:
    """The curve (consumers at the base batch and workers), then the two sweeps on one
    process; each configuration once."""
    configs = [Config(n, base.batch_size, base.decode_workers) for n in consumers]
    configs += [Config(1, b, base.decode_workers) for b in batches]
    configs += [Config(1, base.batch_size, w) for w in workers]
    return list(dict.fromkeys(configs))


def run_point(cfg: Config, args: argparse.Namespace, paths: list[Path], log_dir: Path) -> Point:
    tag = f"scaleout-{uuid.uuid4().hex[:8]}"
    topics = {name: f"{tag}-{name}" for name in ("in", "out", "dlq")}
    kafka = {"bootstrap.servers": args.bootstrap}
    ensure_topics(kafka, list(topics.values()), args.partitions)
    env = _env(cfg, args, topics, tag, paths)
    procs = [
        _start(env, i, args.port + i, log_dir / f"{tag}-{i}.log") for i in range(cfg.consumers)
    ]
    try:
        _wait_joined(args.bootstrap, tag, cfg.consumers, args.partitions)
        reader = _reader(args.bootstrap, topics["out"], tag)
        warm = corpus.events(paths, args.partitions * 2 * cfg.consumers, args.seed, f"{tag}-warm")
        producer = warmed_producer(kafka, kafka, topics["in"])
        send(producer, topics["in"], warm, None)
        _collect(reader, {e.event_id for e in warm}, args.timeout)
        events = corpus.events(paths, args.events, args.seed, f"{tag}-run")
        busy_before = cpu_times()
        first = send(producer, topics["in"], events, None)
        latencies, last = _collect(reader, {e.event_id for e in events}, args.timeout)
        busy = busy_share(busy_before, cpu_times())
        reader.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()  # gone before its topics are: it could recreate one (auto-create)
        delete_topics(kafka, tag)
    seconds = last - first
    p50, p95, p99 = (round(percentile(latencies, q) * 1e3, 1) for q in (50, 95, 99))
    rate = round(len(events) / seconds, 3)
    return Point(cfg, len(events), round(seconds, 3), rate, p50, p95, p99, round(busy, 3))


def _env(
    cfg: Config, args: argparse.Namespace, topics: dict[str, str], tag: str, paths: list[Path]
) -> dict[str, str]:
    return {
        **os.environ,
        "POPSCORE_KAFKA_BOOTSTRAP": args.bootstrap,
        "POPSCORE_REDIS_URL": args.redis,
        "POPSCORE_MODEL": str(args.model),
        "POPSCORE_INPUT_TOPIC": topics["in"],
        "POPSCORE_OUTPUT_TOPIC": topics["out"],
        "POPSCORE_DLQ_TOPIC": topics["dlq"],
        "POPSCORE_GROUP_ID": tag,
        "POPSCORE_BATCH_SIZE": str(cfg.batch_size),
        "POPSCORE_DECODE_WORKERS": str(cfg.decode_workers),
        "POPSCORE_AUDIO_FILE_ROOTS": str(paths[0].parent),
        "MALLOC_ARENA_MAX": "2",  # as the image runs it
    }


def _start(env: dict[str, str], i: int, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = env | {
        "POPSCORE_HTTP_PORT": str(port),
        "POPSCORE_TRANSACTIONAL_ID": f"{env['POPSCORE_GROUP_ID']}-{i}",
    }
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "popscore", "--log-level", "WARNING", "consume"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_joined(bootstrap: str, group: str, members: int, partitions: int) -> None:
    """Until the group has ``members`` members holding all partitions between them."""
    admin = client(lambda: AdminClient({"bootstrap.servers": bootstrap}))
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            described = admin.describe_consumer_groups([group])[group].result(timeout=10)
            held = sum(len(m.assignment.topic_partitions) for m in described.members)
            if len(described.members) == members and held == partitions:
                return
        except Exception:  # the group does not exist until the first member joins
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{group}: {members} members did not join in {JOIN_TIMEOUT_S:.0f} s")


def _reader(bootstrap: str, topic: str, tag: str) -> Consumer:
    reader = client(lambda: Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"{tag}-reader",
        "isolation.level": "read_committed", "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    }))  # fmt: skip
    reader.subscribe([topic])
    return reader


def _collect(reader: Consumer, wanted: set[str], timeout: float) -> tuple[list[float], float]:
    """Latency of each wanted event's score as it arrives, and when the last one did."""
    latencies, last = [], 0.0
    pending = set(wanted)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(wanted)} scores did not arrive")
        msg = reader.poll(0.5)
        value = None if msg is None or msg.error() else msg.value()
        if value is None:
            continue
        record = ScoreRecord.model_validate_json(value)
        if record.event_id in pending:
            pending.discard(record.event_id)
            latencies.append((datetime.now(UTC) - record.emitted_at).total_seconds())
            last = time.perf_counter()
    return latencies, last


def _plot(points: list[Point], out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    base = points[0].config
    series = [
        ("consumer processes", "consumers", ("batch_size", "decode_workers")),
        ("batch size (1 process)", "batch_size", ("consumers", "decode_workers")),
        ("decode workers (1 process)", "decode_workers", ("consumers", "batch_size")),
    ]
    for ax, (label, axis, fixed) in zip(axes, series, strict=True):
        same = [p for p in points if all(getattr(p.config, f) == getattr(base, f) for f in fixed)]
        chosen = sorted(same, key=lambda p: getattr(p.config, axis))
        xs = [getattr(p.config, axis) for p in chosen]
        ax.plot(xs, [p.events_per_s for p in chosen], "o-", color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("events/s", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        twin = ax.twinx()
        twin.plot(xs, [p.p99_ms / 1e3 for p in chosen], "s--", color="tab:red")
        twin.set_ylabel("p99 s (emitted → results topic)", color="tab:red")
    cores = os.cpu_count()
    fig.suptitle(f"popscore scale-out on {cores} cores (Kafka, Redis on them too), full-length MP3")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers, comma-separated: {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m popscore.bench.scaleout")
    p.add_argument("--consumers", type=_ints, default=[1, 2, 4])
    p.add_argument("--partitions", type=int, default=PARTITIONS, help="of the input topic")
    p.add_argument("--batch-sizes", type=_ints, default=[8, 16, 32, 64])
    p.add_argument("--decode-workers", type=_ints, default=[1, 2, 4, 8])
    p.add_argument("--base-batch-size", type=int, default=32)
    p.add_argument("--base-decode-workers", type=int, default=4)
    p.add_argument("--events", type=int, default=192, help="measured events per configuration")
    p.add_argument("--model", type=Path, default=Path("models/demo.pt"))
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--port", type=int, default=9400, help="first consumer's HTTP port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--corpus-dir", type=Path, default=corpus.DEFAULT_ROOT)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    paths = corpus.build(args.corpus_dir, "MP3", 44_100, 2, 180.0, 240.0, 8, args.seed)
    base = Config(1, args.base_batch_size, args.base_decode_workers)
    points = []
    with tempfile.TemporaryDirectory(prefix="popscore-scaleout-") as logs:
        for cfg in plan(args.consumers, args.batch_sizes, args.decode_workers, base):
            point = run_point(cfg, args, paths, Path(logs))
            print(json.dumps(asdict(point)), file=sys.stderr)
            points.append(point)
    report = {
        "machine": machine(),
        "workload": {
            "audio": "synthetic full-length MP3 (180-240 s, 44.1 kHz stereo), 8 files",
            "partitions": args.partitions,
            "events_per_point": args.events,
            "model": str(args.model),
        },
        "points": [asdict(p) for p in points],
    }
    one = next((p for p in points if p.config == base), None)
    if one:
        curve = [p for p in points if p.config.consumers > 1 or p.config == base]
        report["speedup_over_one_process"] = {
            str(p.config.consumers): round(p.events_per_s / one.events_per_s, 3) for p in curve
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        _plot(points, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
