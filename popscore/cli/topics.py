"""``popscore topics``: the Kafka topics the settings name, and ``--create`` for the missing ones.

The service creates no topic: it checks at start-up that those it writes exist (a broker with
auto-create off would otherwise abort every batch that reaches a missing one).
"""

import argparse

from confluent_kafka.admin import AdminClient

from consumer.kafka import admin_config, client, ensure_topics
from consumer.settings import Settings
from popscore.cli.argtypes import Subparsers, positive_int


def register(sub: Subparsers) -> None:
    """Add ``topics``."""
    parser = sub.add_parser(
        "topics",
        help="the topics the settings name (input, results, dead letters, shadow): partitions; "
        "--create makes the missing ones",
    )
    parser.set_defaults(handler=_topics)
    parser.add_argument("--create", action="store_true", help="create the ones that are missing")
    parser.add_argument(
        "--partitions", type=positive_int, default=3, help="of each topic --create makes"
    )


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    named = {"POPSCORE_INPUT_TOPIC": settings.input_topic, **settings.written_topics()}
    config = settings.kafka_config("admin")
    if args.create:
        # Replication: the brokers' default.replication.factor (a production cluster's, not 1).
        ensure_topics(config, sorted(set(named.values())), args.partitions, replication=-1)
    admin = client(lambda: AdminClient(admin_config(config)))
    existing = admin.list_topics(timeout=10).topics
    missing = 0
    for variable, topic in named.items():
        found = existing.get(topic)
        state = f"{len(found.partitions)} partitions" if found else "missing"
        missing += found is None
        print(f"{variable:<24} {topic:<40} {state}")
    return 1 if missing else 0
