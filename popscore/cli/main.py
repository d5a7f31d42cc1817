"""The ``popscore`` command line (README, "Commands"). Bad arguments: one line on stderr, exit 2."""

import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence

import redis
from confluent_kafka import KafkaException
from redis.exceptions import RedisClusterException

from consumer.errors import ConfigError, PopscoreError, UsageError
from consumer.settings import load_settings
from popscore.artifact import ArtifactError
from popscore.cli import bench, model, produce, rollout, service, topics
from popscore.cli.argtypes import EXIT_USAGE, Handler, Parser

log = logging.getLogger("popscore")
# A run that failed for a reason one log line says (RedisClusterException is no RedisError).
RUN_FAILURES = (
    KafkaException,
    PopscoreError,
    ArtifactError,
    redis.RedisError,
    RedisClusterException,
)


def build_parser() -> Parser:
    """Every subcommand and its options."""
    parser = Parser(prog="popscore", description=__doc__)
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    service.register(sub)  # consume, score, replay-dlq
    produce.register(sub)
    topics.register(sub)
    bench.register(sub)
    model.register(sub)  # train, evaluate, export
    rollout.register(sub)  # promote, models
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m popscore``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack: the first question about a stuck pod.
    # (the process's own stderr, not a replaced sys.stderr, which may have no file descriptor)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__ or 2, all_threads=True)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
        handler: Handler = args.handler
        return handler(args, settings)
    except ConfigError as exc:
        print(f"popscore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        parser.error(str(exc))  # one line, exit 2
    except RUN_FAILURES as exc:
        log.error("%s", exc)
        return 1
