"""The ``popscore`` command line (CONTRACT §1). Bad arguments: one line on stderr, exit 2."""

import argparse
import faulthandler
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

from bench import cli as bench_cli
from consumer import replay
from consumer.argtypes import existing_file, json_object, positive_float, positive_int
from consumer.errors import ConfigError, DeadLetter, PopscoreError, UsageError
from consumer.settings import Settings, load_settings
from schemas.events import ReleaseEvent
from training import commands as training_commands

EXIT_USAGE = 2
# A subcommand's implementation: parsed arguments and settings in, exit status out.
Handler = Callable[[argparse.Namespace, Settings], int]
log = logging.getLogger("popscore")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    """Every subcommand and its options."""
    parser = Parser(prog="popscore", description=__doc__)
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    consume = sub.add_parser("consume", help="run the scoring service (POPSCORE_* settings)")
    consume.set_defaults(handler=_consume)
    consume.add_argument(
        "--stop-at-end",
        action="store_true",
        help="exit once every assigned partition is read to its end",
    )
    consume.add_argument(
        "--report",
        action="store_true",
        help="on exit, print a table of this run's scores and a metrics summary",
    )

    produce = sub.add_parser("produce", help="publish ReleaseEvents to the input topic")
    produce.set_defaults(handler=_produce)
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--synthetic",
        type=positive_int,
        metavar="N",
        help="synthesize N releases with real audio files",
    )
    source.add_argument("--file", type=existing_file, help="a JSONL file, one event per line")
    produce.add_argument("--topic", help="default: POPSCORE_INPUT_TOPIC")
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument(
        "--out-dir",
        type=Path,
        default=Path(".demo/audio"),
        help="where synthetic audio files are written",
    )
    produce.add_argument("--min-seconds", type=positive_float, default=5.0)
    produce.add_argument("--max-seconds", type=positive_float, default=240.0)
    produce.add_argument(
        "--partitions",
        type=positive_int,
        default=3,
        help="partitions of the topic when it must be created",
    )

    score = sub.add_parser("score", help="score one audio file offline, print a ScoreRecord")
    score.set_defaults(handler=_score)
    score.add_argument("file", type=existing_file)
    score.add_argument(
        "--features",
        type=json_object,
        default={},
        help='ReleaseEvent groups as JSON, e.g. \'{"artist": {"followers": 1200}}\'',
    )
    score.add_argument("--model", type=Path, help="default: POPSCORE_MODEL")
    score.add_argument("--device", help="default: POPSCORE_DEVICE")
    replay.register(sub)
    bench_cli.register(sub)
    training_commands.register(sub)  # train, evaluate, export; torch loads in handlers
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m consumer``."""
    args = build_parser().parse_args(argv)
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
        _usage(str(exc))
    except KafkaException as exc:
        if (detail := kafka_config_problem(exc)) is None:
            log.error("%s", exc)
            return 1
        print(f"popscore: POPSCORE_KAFKA_PROPERTIES: {detail}", file=sys.stderr)
        return EXIT_USAGE
    except PopscoreError as exc:
        log.error("%s", exc)
        return 1


def kafka_config_problem(exc: KafkaException) -> str | None:
    """librdkafka's one line when a client refused its configuration (an unknown property or
    a bad value, which can only come from POPSCORE_KAFKA_PROPERTIES), else None."""
    error = exc.args[0] if exc.args else None
    if not isinstance(error, KafkaError) or error.code() != KafkaError._INVALID_ARG:
        return None
    text = str(error.str())
    return text if "configuration property" in text else None


def _consume(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.app import REPORT_KEPT, App
    from consumer.report import metrics_summary, score_table

    kept = REPORT_KEPT if args.report else 0
    with App(settings, stop_at_end=args.stop_at_end, keep_scored=kept) as app:
        app.install_signal_handlers()
        app.run()
        stats = app.stats
        if args.report:
            records = list(stats.scored)
            print(score_table(records))
            print()
            print(
                metrics_summary(
                    app.metrics,
                    records,
                    stats.dead_letters,
                    stats.first_event_at,
                    stats.last_write_at,
                )
            )
    return 0


def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from consumer import produce
    from consumer.topics import ensure_topics

    topic = args.topic or settings.input_topic
    ensure_topics(settings.kafka_config("admin"), [topic], args.partitions)
    config = settings.kafka_config("producer")
    if args.synthetic:
        if args.min_seconds > args.max_seconds:
            _usage("--min-seconds must not exceed --max-seconds")
        # Every audio file exists before the first event is sent, as on a real platform; so
        # emitted_at → scored latency measures the service, not the synthesizer.
        events = list(
            produce.synthetic_events(
                args.synthetic, args.seed, args.out_dir, args.min_seconds, args.max_seconds
            )
        )
        sent = produce.send(config, topic, produce.event_records(iter(events)), len(events))
        print(f"sent {sent} synthetic events to {topic}; audio in {args.out_dir.resolve()}")
    else:
        sent = produce.send(config, topic, produce.jsonl_records(args.file))
        print(f"sent {sent} events from {args.file} to {topic}")
    return 0


def _score(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.audio import AudioPolicy
    from consumer.device import Scorer
    from consumer.metrics import Metrics
    from consumer.pipeline import Pipeline

    path = args.file.resolve()
    try:
        event = _offline_event(path, args.features)
    except ValidationError as exc:
        _usage(f"--features: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    scorer = Scorer(args.model or settings.model, args.device or settings.device)
    policy = AudioPolicy.create(
        (path.parent,), max_bytes=settings.audio_max_bytes, max_seconds=settings.audio_max_seconds
    )
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(scorer, policy, pool, Metrics(), resample_on=settings.resample_on)
        [outcome] = pipeline.score_events([event])
    if isinstance(outcome, DeadLetter):
        print(f"popscore: cannot score {path}: {outcome}", file=sys.stderr)
        return 1
    print(outcome.model_dump_json(indent=2))
    return 0


def _offline_event(path: Path, features: dict[str, object]) -> ReleaseEvent:
    return ReleaseEvent.model_validate(
        {
            **features,
            "event_id": f"offline-{uuid.uuid4()}",
            "track_id": path.stem[:128] or "offline",
            "emitted_at": datetime.now(UTC),
            "audio_uri": path.as_uri(),
        },
        strict=False,
    )


def _usage(message: str) -> NoReturn:
    build_parser().error(message)
