"""``popscore promote`` and ``popscore models``: which model version readers see in Redis."""

import argparse
import sys

import redis

from consumer.rollout import current_model, models, promote
from consumer.settings import Settings
from popscore.cli.argtypes import Subparsers


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
    parser.add_argument("version", help="a model_version Redis holds scores of (`popscore models`)")
    parser.set_defaults(handler=_promote)
    listing = sub.add_parser("models", help="list the model versions Redis holds scores of")
    listing.set_defaults(handler=_models)


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=30, socket_connect_timeout=5
    )


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:

        def progress(seen: int, replaced: int) -> None:
            print(f"  {seen} tracks checked, {replaced} switched", file=sys.stderr)

        print(promote(client, args.version, progress).report())
    return 0


def _models(_args: argparse.Namespace, settings: Settings) -> int:
    with _client(settings) as client:
        entries = models(client)
        if current_model(client) is None:
            print("no promotion yet: the live consumers' primary model writes the view")
    print(f"{'':2}{'model_version':<40} {'tracks':>10}  last write (UTC)")
    for entry in entries:
        mark = "* " if entry.current else "  "
        when = entry.last_write.isoformat(timespec="seconds") if entry.last_write else "-"
        print(f"{mark}{entry.version:<40} {entry.tracks:>10}  {when}")
    return 0
