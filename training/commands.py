"""`popscore train | evaluate | export` (CONTRACT §1, §9, §10).

Registration is cheap on purpose: torch and the training modules are imported inside the
handlers, so `popscore --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumer.argtypes import existing_file, int_at_least
from consumer.errors import UsageError

if TYPE_CHECKING:
    from consumer.settings import Settings
    from training.data import TrackTable
    from training.evaluate import ModelSpec

SAMPLE_RATE = 22050
SYNTHETIC_SECONDS = 6.0  # crops of synthetic audio: the CNN pools over time, any length serves


def register(sub: Any) -> None:
    """Add `train`, `evaluate` and `export` to the popscore subparsers."""
    evaluate = sub.add_parser("evaluate", help="artist-grouped k-fold report with baselines")
    evaluate.set_defaults(handler=_evaluate)
    _data_arguments(evaluate)
    evaluate.add_argument("--report", type=Path, required=True, help="report JSON to write")
    evaluate.add_argument("--folds", type=int_at_least(2), default=5)

    train = sub.add_parser("train", help="train on every row and export an artifact")
    train.set_defaults(handler=_train)
    _data_arguments(train)
    train.add_argument("--out", type=Path, required=True, help="artifact path, e.g. models/x.pt")
    # CONTRACT §9: an artifact carries its evaluation; leaving it out is a deliberate choice.
    evaluated = train.add_mutually_exclusive_group(required=True)
    evaluated.add_argument(
        "--evaluation",
        type=existing_file,
        help="the `evaluate` report of this data and variant, embedded (summary, cuts)",
    )
    evaluated.add_argument(
        "--no-evaluation", action="store_true", help="embed no evaluation (an experiment)"
    )
    train.add_argument("--model-version", help="default: derived from data, seed and weights")

    export = sub.add_parser("export", help="re-export an artifact with updated metadata")
    export.set_defaults(handler=_export)
    export.add_argument("artifact", type=existing_file, help="an existing popscore artifact")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--evaluation", type=existing_file, help="report whose summary to embed")
    export.add_argument("--hit-threshold", type=float, help="new is_hit cut on popularity")
    export.add_argument("--model-version")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=existing_file, help="a Spotify-API-shaped CSV")
    source.add_argument(
        "--synthetic", type=int_at_least(20), metavar="N", help="N SYNTHETIC tracks with audio"
    )
    parser.add_argument("--features-only", action="store_true", help="no audio branch")
    parser.add_argument("--audio-column", help="CSV column naming each row's audio file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# --- handlers -------------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from training.evaluate import cross_validate, group_folds, summary, write_report

    table, specs = _table_and_specs(args, comparison=True)
    folds = group_folds(table.groups, args.folds, args.seed)
    report, oof = cross_validate(
        table, specs, folds, args.seed, SAMPLE_RATE, _device(args.device), not args.quiet
    )
    oof_file = write_report(report, oof, table.popularity, args.report)
    print(json.dumps(summary(report), indent=2))
    print(f"wrote {args.report} and {oof_file}")
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from training.evaluate import fit_model
    from training.export import export_artifact, weights_digest

    table, [spec] = _table_and_specs(args, comparison=False)
    rows = np.arange(len(table.popularity))
    evaluation = _evaluation(args.evaluation, spec.name, len(rows))
    cut, tree_weight = _hit_cut(evaluation), _tree_weight(evaluation)
    model = fit_model(table, spec, rows, args.seed, SAMPLE_RATE, _device(args.device), tree_weight)
    version = args.model_version or f"{spec.name}-{args.seed}-{weights_digest(model)}"
    meta = {
        "model_version": version,
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": 30.0,
        "features": list(table.feature_paths),
        "hit_threshold": cut,
        "hit_label_threshold": spec.config.hit_threshold,
        "training": {"data": table.source, "rows": len(rows), "variant": spec.name,
                     "seed": args.seed, "evaluation": evaluation},
    }  # fmt: skip
    path = export_artifact(model, args.out, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) as {version}")
    return 0


def _export(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from training.export import ArtifactError, load_artifact, resave_artifact

    try:
        module, meta = load_artifact(args.artifact)
    except ArtifactError as exc:
        raise UsageError(f"{args.artifact}: {str(exc).splitlines()[0]}") from None
    if args.evaluation:
        meta.setdefault("training", {})["evaluation"] = _evaluation(args.evaluation)
    if args.hit_threshold is not None:
        meta["hit_threshold"] = args.hit_threshold
    if args.model_version:
        meta["model_version"] = args.model_version
    # Score a tiny batch first: an artifact that cannot run is not written anywhere.
    samples = round(meta["sample_rate"] * meta["clip_seconds"])
    with torch.inference_mode():
        pop, _ = module(torch.zeros(2, samples), torch.full((2, len(meta["features"])), 1.0),
                        torch.tensor([True, False]))  # fmt: skip
    if not torch.isfinite(pop).all():
        print(f"popscore: {args.artifact} scores a test batch as non-finite")
        return 1
    resave_artifact(module, args.out, meta)
    print(f"wrote {args.out} as {meta['model_version']}")
    return 0


# --- helpers --------------------------------------------------------------------------------


def _table_and_specs(
    args: argparse.Namespace, comparison: bool
) -> tuple[TrackTable, list[ModelSpec]]:
    """The data, and the variants to run: for synthetic data, with audio, `comparison`
    adds the audio-only and features-only variants on the same folds."""
    from training import data
    from training.evaluate import AUDIO_ONLY, FEATURES_ONLY, FUSION

    if args.synthetic:
        table = data.synthetic_table(args.synthetic, args.seed, SYNTHETIC_SECONDS, SAMPLE_RATE)
    else:
        try:
            table = data.load_csv(args.data, audio_column=args.audio_column)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise UsageError(f"--data {args.data}: {exc}") from None
        if args.audio_column and not args.features_only:
            table = data.with_audio(table, SAMPLE_RATE, 30.0)
    with_audio = table.waveforms is not None and not args.features_only
    if not with_audio:
        return table, [FEATURES_ONLY]
    return table, [FUSION, AUDIO_ONLY, FEATURES_ONLY] if comparison else [FUSION]


def _evaluation(
    path: Path | None, variant: str | None = None, rows: int | None = None
) -> dict[str, Any] | None:
    """The report's summary and per-fold cuts; it must be an `evaluate` report, and of the
    variant and row count being trained when those are given."""
    if path is None:
        return None
    from training.evaluate import summary

    try:
        report = json.loads(path.read_text())
        evaluation = {
            **summary(report),
            "fold_cuts": report["models"][report["model"]]["fold_cuts"],
        }
        evaluated, evaluated_rows = report["model"], report["data"]["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--evaluation {path}: not a `popscore evaluate` report ({exc!r})"
        ) from None
    if (variant, rows) != (None, None) and (evaluated, evaluated_rows) != (variant, rows):
        raise UsageError(
            f"--evaluation {path}: it evaluated {evaluated} on {evaluated_rows} rows; "
            f"this run trains {variant} on {rows}"
        )
    return evaluation


def _hit_cut(evaluation: dict[str, Any] | None) -> float:
    # The decision cut at 70 from the evaluation's inner CV (median over folds), else 70.
    if not evaluation:
        return 70.0
    cuts = sorted(float(f["70"]) for f in evaluation["fold_cuts"])
    return cuts[len(cuts) // 2]


def _tree_weight(evaluation: dict[str, Any] | None) -> float | None:
    # The trees' share the evaluation's inner CVs chose (median over folds), else the spec's.
    weights = sorted(float(f["tree_weight"]) for f in (evaluation or {}).get("fold_cuts", [])
                     if "tree_weight" in f)  # fmt: skip
    return weights[len(weights) // 2] if weights else None


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("popscore: --device cuda, but no CUDA device is available")
    return choice
