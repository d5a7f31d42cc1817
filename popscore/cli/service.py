"""``popscore consume``, ``score`` and ``replay-dlq``: the service, one file scored offline, and
dead letters sent back to the input topic."""

import argparse
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from consumer.errors import DeadLetter, UsageError
from consumer.settings import Settings
from popscore.cli.argtypes import (
    Subparsers,
    device_name,
    existing_file,
    flags_named,
    json_object,
    kafka_topic,
    rfc3339_time,
)

if TYPE_CHECKING:
    from consumer.device import Scorer
from schemas.dead_letter import DeadLetterReason
from schemas.events import ReleaseEvent


def register(sub: Subparsers) -> None:
    """Add ``consume``, ``score`` and ``replay-dlq``."""
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

    score = sub.add_parser("score", help="score one audio file offline, print a ScoreRecord")
    score.set_defaults(handler=_score)
    score.add_argument("file", type=existing_file)
    score.add_argument(
        "--features",
        type=json_object,
        default={},
        help='ReleaseEvent groups as JSON, e.g. \'{"artist": {"followers": 1200}}\'',
    )
    score.add_argument("--model", type=existing_file, help="default: POPSCORE_MODEL")
    score.add_argument(
        "--device", type=device_name, help="auto | cpu | cuda | cuda:N (default: POPSCORE_DEVICE)"
    )
    _register_replay(sub)


def _register_replay(sub: Subparsers) -> None:
    from consumer import replay

    parser = sub.add_parser(
        "replay-dlq",
        help="re-publish dead letters (all, or by reason / time) to the input topic",
        description=replay.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_replay)
    reasons = [r.value for r in DeadLetterReason]
    parser.add_argument(
        "--reason",
        action="append",
        choices=reasons,
        metavar="REASON",
        help=f"replay only this reason; repeatable (one of: {', '.join(reasons)})",
    )
    parser.add_argument(
        "--since",
        type=rfc3339_time,
        help="only dead letters written at or after this RFC 3339 time",
    )
    parser.add_argument(
        "--until", type=rfc3339_time, help="only dead letters written before this RFC 3339 time"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; publish nothing"
    )
    parser.add_argument(
        "--from-topic", type=kafka_topic, help="dead-letter topic (default: POPSCORE_DLQ_TOPIC)"
    )
    parser.add_argument(
        "--to-topic", type=kafka_topic, help="where to publish (default: POPSCORE_INPUT_TOPIC)"
    )


def exit_on_sigterm() -> None:
    """Until the App installs its own handlers: SIGTERM ends the process at once. As PID 1 of
    a container a signal without a handler is ignored, so a pod deleted while it starts (model
    load, warm-up, connecting) would sit out its whole grace period. Nothing is consumed or
    open yet to finish; an exception raised from the handler could land in a librdkafka
    callback and be swallowed, so the process exits from the handler itself. A blocking call
    in C (init_transactions, up to 30 s) delays it until it returns."""
    signal.signal(signal.SIGTERM, _exit_now)


def _exit_now(signum: int, _frame: object) -> None:
    os.write(2, f"popscore: stopped by {signal.Signals(signum).name} while starting\n".encode())
    os._exit(128 + signum)


def _consume(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.app import REPORT_KEPT, App
    from popscore.cli.report import metrics_summary, score_table

    exit_on_sigterm()  # the App's own handlers replace it once it serves
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


def _score(args: argparse.Namespace, settings: Settings) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from consumer.audio import AudioPolicy
    from consumer.ffmpeg_sandbox import Limits
    from consumer.metrics import Metrics
    from consumer.pipeline import Pipeline

    path = args.file.resolve()
    try:
        event = _offline_event(path, args.features)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"--features: {first['loc']}: {first['msg']}") from None
    scorer = load_scorer(args.model, args.device, settings)
    print(f"model {scorer.meta.provenance()}", file=sys.stderr)  # stdout: the record alone
    policy = AudioPolicy.create(
        (path.parent,),
        max_bytes=settings.audio_max_bytes,
        max_seconds=settings.audio_max_seconds,
        ffmpeg_limits=Limits(settings.ffmpeg_memory_mb, settings.ffmpeg_timeout_s),
    )
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(scorer, policy, pool, Metrics(), resample_on=settings.resample_on)
        [outcome] = pipeline.score_events([event])
    if isinstance(outcome, DeadLetter):
        print(f"popscore: cannot score {path}: {outcome}", file=sys.stderr)
        return 1
    print(outcome.model_dump_json(indent=2))
    return 0


def load_scorer(model: Path | None, device: str | None, settings: Settings) -> "Scorer":
    """The artifact on its device, each the flag's or else the setting's, loaded as the service
    loads it; one that cannot load or a device that is not there is one line naming the flag
    or the variable (exit 2)."""
    from consumer.app import load_scorer as load

    given = {"model": model, "device": device}
    flags = {field: f"--{field}" for field, value in given.items() if value}
    with flags_named(flags):
        return load(settings.model_copy(update={f: given[f] for f in flags}))


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


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from consumer.replay import Selection, replay

    source = args.from_topic or settings.dlq_topic
    if source != settings.dlq_topic and not args.to_topic:
        # A backfill's dead letters (releases-dlq-backfill) sent to the live input by default
        # would be scored on the live path: another DLQ's input is for the user to name.
        raise UsageError(
            f"--to-topic: say where the dead letters of {source} go (the default, "
            f"POPSCORE_INPUT_TOPIC {settings.input_topic!r}, is the input of "
            f"POPSCORE_DLQ_TOPIC {settings.dlq_topic!r})"
        )
    target = args.to_topic or settings.input_topic
    selection = Selection.of(args.reason, args.since, args.until)
    count = replay(settings, source, target, selection, args.dry_run)
    print(count.report(source, target, args.dry_run))
    return 0
