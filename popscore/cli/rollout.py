"""``popscore promote``, ``models`` and ``backfill``: which model version readers see in Redis,
and a catalog re-scored under a model."""

import argparse
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from consumer.errors import UsageError
from consumer.redis_client import AnyRedis, close, connect
from consumer.rollout import current_model, drop, models, promote
from consumer.settings import Settings, check_distinct_topics
from popscore.cli import service
from popscore.cli.argtypes import (
    Parser,
    Subparsers,
    existing_file,
    flags_named,
    kafka_topic,
    model_version,
    positive_int,
    settings_with,
    tcp_port,
)


def register(sub: Subparsers) -> None:
    """Add ``promote`` and ``models``."""
    parser = sub.add_parser(
        "promote",
        help="make a model version current: readers' keys switch to its scores (also: roll back)",
        description=(
            "Copy VERSION's scores into the keys readers read (popscore:score:*, the day "
            "leaderboards) and make it current; every consumer's later scores of VERSION reach "
            "them, no other version's do. Roll back by promoting the previous version."
        ),
    )
    parser.add_argument(
        "version",
        type=model_version,
        help="a model_version Redis holds scores of (`popscore models`)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote a version whose scores have all expired (POPSCORE_REDIS_TTL_S since its "
        "last write): the view then changes only as it scores again",
    )
    parser.set_defaults(handler=_promote)
    listing = sub.add_parser("models", help="list the model versions Redis holds scores of")
    listing.set_defaults(handler=_models)
    listing.add_argument(
        "--drop",
        metavar="VERSION",
        type=model_version,
        help="delete a retired version's scores, leaderboards and claims (not the current one)",
    )
    register_backfill(sub)


@contextmanager
def _client(settings: Settings) -> Iterator[AnyRedis]:
    url = settings.redis_url.get_secret_value()
    client = connect(url, settings.redis_cluster, socket_timeout=30)
    try:
        yield client
    finally:
        close(client)


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        last = time.monotonic()

        def progress(seen: int, replaced: int) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_S:  # 10^8 tracks: not a line per batch
                last = time.monotonic()
                print(f"  {seen} tracks checked, {replaced} switched", file=sys.stderr)

        done = promote(client, args.version, progress, settings.redis_ttl_s, args.force,
                       settings.redis_min_replicas if settings.redis_cluster else 0)  # fmt: skip
        print(done.report())
    return 0


def _models(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        if args.drop:
            print(f"dropped {args.drop}: {drop(client, args.drop)} keys deleted")
            return 0
        entries = models(client)
        if current_model(client) is None:
            print("no promotion yet: the live consumers' primary model writes the view")
    print(f"{'':2}{'model_version':<40} {'tracks':>10}  last write (UTC)")
    for entry in entries:
        mark = "* " if entry.current else "  "
        when = entry.last_write.isoformat(timespec="seconds") if entry.last_write else "-"
        print(f"{mark}{entry.version:<40} {entry.tracks:>10}  {when}")
    return 0


BACKFILL_TOPIC = "releases-backfill"
PROGRESS_S = 5.0


def register_backfill(sub: Subparsers) -> None:
    """Add ``backfill publish`` and ``backfill run``."""
    parser = sub.add_parser(
        "backfill",
        help="re-score a catalog under a model: publish it to a topic, consume it there",
        description=(
            "Re-score a catalog under one model through its own topic and consumer group, "
            "like the live service (docs/OPERATIONS.md, 'Roll out a model')."
        ),
    )
    steps = parser.add_subparsers(dest="step", required=True, parser_class=Parser)
    publish = steps.add_parser(
        "publish", help="publish a catalog (Parquet or JSONL of ReleaseEvents) to the topic"
    )
    publish.set_defaults(handler=_publish)
    publish.add_argument("--catalog", type=existing_file, required=True)
    publish.add_argument("--topic", type=kafka_topic, default=BACKFILL_TOPIC)
    publish.add_argument("--partitions", type=positive_int, default=8)
    publish.add_argument(
        "--force", action="store_true", help="publish even when the topic already holds records"
    )
    run = steps.add_parser(
        "run",
        help="consume a backfill topic (or a compacted topic of the latest events) under MODEL",
    )
    run.set_defaults(handler=_run)
    run.add_argument("--model", type=existing_file, required=True)
    run.add_argument(
        "--topic", type=kafka_topic, default=BACKFILL_TOPIC, help="the topic to re-score"
    )
    run.add_argument(
        "--group", help="default: popscore-backfill-<model_version>; never POPSCORE_GROUP_ID"
    )
    run.add_argument(
        "--nice", type=int, choices=range(20), default=10, metavar="0-19", help="CPU nice value"
    )
    run.add_argument(
        "--yield-to",
        metavar="GROUP",
        help="pause while this group lags (default: POPSCORE_GROUP_ID); '' never pauses",
    )
    run.add_argument("--follow", action="store_true", help="keep consuming after the end")
    run.add_argument(
        "--http-port",
        type=tcp_port,
        default=9401,
        help="/metrics, /healthz, /readyz of the backfill (beside a live consumer's "
        "POPSCORE_HTTP_PORT); 0 = any free port",
    )


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.kafka import ensure_topics, topic_records
    from popscore.cli.produce import jsonl_records, send

    parquet = args.catalog.suffix.lower() in (".parquet", ".pq")
    # Opened before the topic is made: a file that is no Parquet is one line, not a traceback.
    records = parquet_records(args.catalog) if parquet else jsonl_records(args.catalog)
    admin = settings.kafka_config("admin")
    # Its input, and the topics its consumers write (`backfill run` and the Kubernetes backfill
    # alike): the service creates none. Replication: the brokers' default.
    written = [f"{settings.output_topic}-backfill", f"{settings.dlq_topic}-backfill"]
    ensure_topics(admin, [args.topic, *written], args.partitions, replication=-1)
    held = topic_records(admin, args.topic)
    if held and not args.force:
        raise UsageError(
            f"{args.topic} already holds {held} records (consumers resume from their offsets); "
            "--force publishes the catalog again (its events are then duplicates, and dropped)"
        )
    count = send(settings.kafka_config("producer"), args.topic, records)
    print(f"published {count} events to {args.topic}")
    return 0


def parquet_records(path: Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) per Parquet row: its ReleaseEvent fields (flat, dotted or struct columns)
    as JSON, sent whatever they hold, so an invalid row is dead-lettered with its reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        catalog = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"--catalog: {path} is no readable Parquet file: {exc}") from None
    return _rows(catalog)


def _rows(catalog: Any) -> Iterator[tuple[bytes | None, bytes]]:
    from popscore.training.catalog import row_event

    for batch in catalog.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            doc = row_event(row)
            for key in ("schema_version", "event_id", "track_id", "emitted_at", "audio_uri"):
                if row.get(key) is not None:
                    doc[key] = row[key]
            track = doc.get("track_id")
            key_bytes = track.encode() if isinstance(track, str) else None
            yield key_bytes, json.dumps(doc, default=_json_value).encode()


def _json_value(value: object) -> str:
    if isinstance(value, datetime):  # Parquet's naive timestamps are UTC (isAdjustedToUTC)
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


# Which flag of `backfill run` sets each setting: an error about one names the flag.
RUN_FLAGS = {
    "model": "--model",
    "input_topic": "--topic",
    "group_id": "--group",
    "cpu_nice": "--nice",
    "yield_to_group": "--yield-to",
    "http_port": "--http-port",
}


def backfill_settings(args: argparse.Namespace, settings: Settings, version: str) -> Settings:
    """The live settings turned into a backfill consumer's: its own topics and group, the
    backfill role, a lower CPU priority, yielding to the live group. Validated as start-up
    validates the environment; a bad value is one line naming its flag (UsageError)."""
    name = re.sub(r"[^a-zA-Z0-9._-]", "_", version)[:200]
    group = args.group or f"popscore-backfill-{name}"
    _refuse_loops(args.topic, group, settings)
    update = {
        "model": args.model,
        "input_topic": args.topic,
        "output_topic": f"{settings.output_topic}-backfill",
        "dlq_topic": f"{settings.dlq_topic}-backfill",
        "group_id": group,
        "transactional_id": None,
        "shadow_model": None,
        "role": "backfill",
        "cpu_nice": args.nice,
        "yield_to_group": settings.group_id if args.yield_to is None else args.yield_to,
        "yield_to_topic": settings.input_topic,
        "http_port": args.http_port,
    }
    backfill = settings_with(settings, update, RUN_FLAGS)
    check_distinct_topics(backfill)
    return backfill


def _refuse_loops(topic: str, group: str | None, live: Settings) -> None:
    """A backfill reading a topic it writes scores itself for ever; one in the live group
    takes live partitions and commits the live group's offsets."""
    written = {
        f"{live.output_topic}-backfill": "its output topic (POPSCORE_OUTPUT_TOPIC-backfill)",
        f"{live.dlq_topic}-backfill": "its dead-letter topic (POPSCORE_DLQ_TOPIC-backfill)",
        live.shadow_topic: "POPSCORE_SHADOW_TOPIC",
    }
    if topic in written:
        raise UsageError(f"--topic: {topic!r} is {written[topic]}; a backfill reads another")
    if group == live.group_id:
        raise UsageError(
            f"--group: {group!r} is the live group (POPSCORE_GROUP_ID); a backfill needs its "
            "own, or it joins the live consumers and commits their offsets"
        )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.app import App
    from consumer.kafka import ensure_topics
    from popscore.artifact import ArtifactError, load

    _refuse_loops(args.topic, args.group, settings)  # before the artifact loads
    try:
        version = load(args.model).meta.model_version
    except ArtifactError as exc:
        raise UsageError(f"--model: {exc}") from None
    s = backfill_settings(args, settings, version)
    ensure_topics(s.kafka_config("admin"), [s.output_topic, s.dlq_topic], 8, replication=-1)
    service.exit_on_sigterm()  # the App's own handlers replace it once it serves
    with flags_named(RUN_FLAGS), App(s, stop_at_end=not args.follow) as app:
        print(f"backfill of {args.topic} under {version}: group {s.group_id}, scores to "
              f"{s.output_topic}", file=sys.stderr)  # fmt: skip
        app.install_signal_handlers()
        app.run()
        done = app.metrics.registry.get_sample_value("popscore_events_total", {"outcome": "scored"})
        finished = app.source.caught_up()
    left = "" if finished else " (stopped before the end: run again to resume)"
    print(f"backfill: {int(done or 0)} events scored under {version}{left}")
    return 0
