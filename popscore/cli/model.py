"""``popscore evaluate``, ``compare``, ``train`` and ``export``: the model lifecycle
(``popscore.training``; docs/MODEL.md). The training modules load in the handlers, so
``popscore --help`` stays fast."""

import argparse
import importlib.util
import json
from typing import TYPE_CHECKING

from consumer.errors import UsageError
from consumer.settings import Settings
from popscore.cli.argtypes import (
    Subparsers,
    cache_dir,
    device_name,
    existing_file,
    int_at_least,
    model_version,
    popularity,
    writable_dir,
    writable_path,
)

if TYPE_CHECKING:
    from popscore.training.jobs import Data


def register(sub: Subparsers) -> None:
    """Add ``evaluate``, ``train``, ``compare`` and ``export``."""
    evaluate = sub.add_parser("evaluate", help="artist-grouped k-fold report with baselines")
    evaluate.set_defaults(handler=_evaluate)
    _data_arguments(evaluate)
    evaluate.add_argument(
        "--report", type=writable_path, required=True, help="report JSON to write"
    )
    evaluate.add_argument("--folds", type=int_at_least(2), default=5)
    evaluate.add_argument(
        "--plots",
        type=writable_dir,
        metavar="DIR",
        help="also write the pictures (predicted vs actual, ROC, calibration, error by artist "
        "size, loss curves) as PNG files into DIR",
    )

    train = sub.add_parser("train", help="train on every row and export an artifact")
    train.set_defaults(handler=_train)
    _data_arguments(train)
    train.add_argument(
        "--out", type=writable_path, required=True, help="artifact path, e.g. models/x.pt"
    )
    # An artifact carries its evaluation; leaving it out is a deliberate choice.
    evaluated = train.add_mutually_exclusive_group(required=True)
    evaluated.add_argument(
        "--evaluation",
        type=existing_file,
        help="the `evaluate` report of this data and variant, embedded (summary, cuts)",
    )
    evaluated.add_argument(
        "--no-evaluation", action="store_true", help="embed no evaluation (an experiment)"
    )
    train.add_argument(
        "--model-version", type=model_version, help="default: derived from data, seed and weights"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint beside --out (OUT.ckpt) when a run was interrupted",
    )
    train.add_argument(
        "--plots", type=writable_dir, metavar="DIR", help="write the loss curves per epoch into DIR"
    )

    prepare = sub.add_parser(
        "prepare", help="decode a catalog's audio once into a sharded on-disk cache"
    )
    prepare.set_defaults(handler=_prepare)
    prepare.add_argument(
        "--data",
        type=existing_file,
        required=True,
        help="a catalog: Parquet (.parquet) or CSV, one row per track",
    )
    prepare.add_argument(
        "--audio-column", required=True, help="the column holding each track's audio path or URI"
    )
    prepare.add_argument(
        "--cache",
        type=writable_dir,
        required=True,
        metavar="DIR",
        help="where the shards go (a rerun resumes)",
    )
    prepare.add_argument(
        "--workers", type=int_at_least(1), help="decode processes (default: cores)"
    )
    prepare.add_argument("--shard-rows", type=int_at_least(1), default=256)
    prepare.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="FEATURE",
        help="leave a feature out of the cached feature rows; repeatable",
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")

    compare = sub.add_parser(
        "compare", help="two evaluate reports of the same folds: paired artist-bootstrap intervals"
    )
    compare.set_defaults(handler=_compare)
    compare.add_argument("a", type=existing_file, help="an `evaluate` report (A)")
    compare.add_argument("b", type=existing_file, help="a report of the same data and folds (B)")
    compare.add_argument("--json", type=writable_path, help="also write the comparison here")
    compare.add_argument("--resamples", type=int_at_least(100), default=2000)

    export = sub.add_parser("export", help="re-export an artifact with updated metadata")
    export.set_defaults(handler=_export)
    export.add_argument("artifact", type=existing_file, help="an existing popscore artifact")
    export.add_argument("--out", type=writable_path, required=True)
    export.add_argument("--evaluation", type=existing_file, help="report whose summary to embed")
    export.add_argument(
        "--hit-threshold", type=popularity, help="new is_hit cut on popularity (0-100)"
    )
    export.add_argument("--model-version", type=model_version)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_file, help="a Spotify-API-shaped CSV")
    source.add_argument(
        "--synthetic", type=int_at_least(20), metavar="N", help="N SYNTHETIC tracks with audio"
    )
    parser.add_argument("--features-only", action="store_true", help="no audio branch")
    parser.add_argument("--audio-column", help="CSV column naming each row's audio file")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="FEATURE",
        help="leave a feature out (a path, or a prefix: release.title drops the title flags); "
        "repeatable",
    )
    parser.add_argument(
        "--cache",
        type=cache_dir,
        metavar="DIR",
        help="where the catalog's audio is prepared once (default: CATALOG.cache beside it)",
    )
    parser.add_argument(
        "--workers", type=int_at_least(0), help="processes decoding and loading audio"
    )
    parser.add_argument("--epochs", type=int_at_least(1), help="override the variant's epochs")
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _require_sklearn() -> None:
    """The trainer needs scikit-learn, which the runtime image leaves out: one line (exit 2)."""
    if importlib.util.find_spec("sklearn") is None:
        raise UsageError(
            "training needs scikit-learn, which this install lacks: pip install 'popscore[train]'"
        )


def _data(args: argparse.Namespace, settings: Settings) -> "Data":
    from popscore.training.jobs import Data

    if args.without and args.synthetic:
        raise UsageError("--without applies to --data, not --synthetic")
    return Data(
        args.data,
        args.synthetic,
        args.audio_column,
        args.features_only,
        args.seed,
        tuple(args.without),
        args.cache,
        args.workers,
        settings,
        not args.quiet,
    )


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    _require_sklearn()
    from popscore.training import jobs

    device = jobs.resolve_device(args.device)  # before the data: preparing it takes minutes
    table, variants = jobs.load_data(_data(args, settings), comparison=True)
    variants = [jobs.with_epochs(v, args.epochs) for v in variants]
    summary, oof_file = jobs.evaluate(
        table,
        variants,
        args.folds,
        args.seed,
        device,
        args.report,
        not args.quiet,
        args.plots,
        jobs.stream_options(args.workers),
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.report} and {oof_file}")
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    _require_sklearn()
    from popscore.training import jobs
    from popscore.training.report import read_evaluation

    with jobs.distributed(jobs.resolve_device(args.device)) as (device, rank):
        table, [variant] = jobs.load_data(_data(args, settings), comparison=False)
        variant = jobs.with_epochs(variant, args.epochs)
        jobs.check_resume(table, variant, args.resume)
        evaluation = None
        if args.evaluation:
            evaluation = read_evaluation(args.evaluation, jobs.trained(table, variant, args.seed))
        stream = jobs.train_stream_options(args.out, args.workers, args.resume)
        result = jobs.train(
            table,
            variant,
            args.out,
            args.seed,
            device,
            evaluation,
            args.model_version,
            args.plots,
            stream,
            save_artifact=rank == 0,
        )
    if result is not None:
        path, meta = result
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) as {meta.model_version}")
    return 0


def _prepare(args: argparse.Namespace, settings: Settings) -> int:
    _require_sklearn()
    from popscore.training import jobs

    result = jobs.prepare_cache(
        args.data,
        args.audio_column,
        args.cache,
        settings,
        tuple(args.without),
        args.workers,
        args.shard_rows,
        not args.quiet,
        retry_failed=True,
    )
    again = ""
    if result.retried:
        again = f"; {result.retried} failed rows tried again, {result.recovered} recovered"
    print(
        f"{args.cache}: {result.rows} tracks in {result.shards} shards "
        f"({result.skipped_shards} already prepared{again}), {result.failures} without usable "
        f"audio (listed in {args.cache / 'failures.csv'})"
    )
    return 0


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    _require_sklearn()
    from popscore.training.compare import compare

    result = compare(args.a, args.b, args.resamples)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from popscore.training.export import reexport

    meta = reexport(
        args.artifact, args.out, args.evaluation, args.hit_threshold, args.model_version
    )
    print(f"wrote {args.out} as {meta.model_version}")
    return 0
