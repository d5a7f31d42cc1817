"""What ``popscore evaluate`` and ``train`` do, without argparse.

    table, variants = load_data(Data(csv=Path("tracks.csv")), comparison=True)
    summary, oof_file = evaluate(table, variants, 5, seed=0, device="cpu", report_path=path)
    evaluation = read_evaluation(path, trained(table, variant, seed=0))
    path, meta = train(table, variant, out, 0, "cpu", evaluation)

Bad input raises ``consumer.errors.UsageError`` naming the argument (the CLI exits 2).
"""

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from consumer.app import audio_policy
from consumer.errors import UsageError
from consumer.settings import Settings
from popscore.artifact import (
    ArtifactMeta,
    Reference,
    TrainingSummary,
    save,
    weights_digest,
)
from popscore.training import data as datasets
from popscore.training.cache import Prepared, prepare
from popscore.training.data import TrackTable
from popscore.training.evaluate import (
    AUDIO_ONLY,
    FEATURES_ONLY,
    FUSION,
    STREAM,
    ModelSpec,
    cross_validate,
    fit_model,
    predict_rows,
    streams_from_cache,
)
from popscore.training.metrics import group_folds
from popscore.training.report import Trained, catalog_identity, file_digest, summary, write_report
from popscore.training.stream import Stream

SAMPLE_RATE = 22050
CLIP_SECONDS = 30.0
SYNTHETIC_SECONDS = 6.0  # crops of synthetic audio: the CNN pools over time, any length serves
# Deciles need few rows; scoring every row of a catalog again would cost another pass over
# its audio.
REFERENCE_SCORED_ROWS = 5000
# How long the other ranks wait for rank 0 to prepare the cache under torchrun: 20,000 tracks
# took 846 s on 2 cores (docs/MODEL.md); a day leaves room for millions on a larger machine.
PREPARE_WAIT = timedelta(hours=24)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Data:
    """Where the rows come from: a CSV (``csv``) or ``synthetic`` generated tracks."""

    csv: Path | None = None
    synthetic: int | None = None
    audio_column: str | None = None
    features_only: bool = False
    seed: int = 0
    without: tuple[str, ...] = ()  # feature paths (or prefixes) left out of a CSV's features
    cache: Path | None = None  # where a catalog's audio is prepared (default: default_cache)
    workers: int | None = None  # processes decoding audio into the cache (default: cores)
    settings: Settings | None = None  # the service's audio policy applies to catalog URIs
    progress: bool = True


def _prepare_on_rank_0(*args: Any, wait: timedelta = PREPARE_WAIT, **kwargs: Any) -> None:
    """prepare_cache, by one process: under torchrun the other ranks wait, then read it."""
    if not dist.is_initialized():
        prepare_cache(*args, **kwargs)
        return
    # Its own gloo group: NCCL cannot carry a CPU tensor, and the default group's timeout
    # (10 min NCCL, 30 min gloo) is shorter than decoding a large catalog.
    group = dist.new_group(backend="gloo", timeout=wait)
    try:
        _prepare_and_tell(group, *args, **kwargs)
    finally:
        dist.destroy_process_group(group)


def _prepare_and_tell(group: Any, *args: Any, **kwargs: Any) -> None:
    failed: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            prepare_cache(*args, **kwargs)
        except BaseException as exc:  # re-raised below, after telling the others
            failed = exc
    # A barrier that also carries rank 0's outcome: the others must not wait for ever.
    outcome = torch.tensor([0 if failed else 1])
    dist.broadcast(outcome, src=0, group=group)
    if failed is not None:
        raise failed
    if int(outcome) == 0:
        raise UsageError("rank 0 could not prepare the cache (its error is in its output)")


def default_cache(catalog: Path) -> Path:
    """Beside the catalog: tracks.parquet -> tracks.parquet.cache/."""
    return catalog.with_name(catalog.name + ".cache")


def load_data(spec: Data, comparison: bool) -> tuple[TrackTable, list[ModelSpec]]:
    """The table, and the variants to run: with audio, ``comparison`` adds the audio-only and
    features-only variants on the same folds."""
    if spec.synthetic:
        table = datasets.synthetic_table(spec.synthetic, spec.seed, SYNTHETIC_SECONDS, SAMPLE_RATE)
    else:
        assert spec.csv is not None
        try:
            paths = datasets.without(datasets.PAPER_FEATURES, spec.without)
        except ValueError as exc:
            raise UsageError(f"--without: {exc}") from None
        if spec.audio_column and not spec.features_only:
            cache = spec.cache or default_cache(spec.csv)
            _prepare_on_rank_0(
                spec.csv,
                spec.audio_column,
                cache,
                spec.settings or Settings(),
                spec.without,
                spec.workers,
                progress=spec.progress,
            )
            table = datasets.cached_table(cache, str(spec.csv))
        else:
            try:
                table = datasets.load_catalog(spec.csv, paths)
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                raise UsageError(f"--data {spec.csv}: {exc}") from None
    if (table.waveforms is None and table.cached is None) or spec.features_only:
        return table, [FEATURES_ONLY]
    return table, [FUSION, AUDIO_ONLY, FEATURES_ONLY] if comparison else [FUSION]


def evaluate(
    table: TrackTable,
    variants: list[ModelSpec],
    folds: int,
    seed: int,
    device: str,
    report_path: Path,
    progress: bool = True,
    plots: Path | None = None,
    stream: Stream = STREAM,
) -> tuple[dict[str, Any], Path]:
    """Write the artist-grouped k-fold report (docs/MODEL.md) at ``report_path`` and the first
    variant's out-of-fold predictions beside it, and its plots into ``plots`` when given;
    returns the report's summary and the OOF file."""
    try:
        split = group_folds(table.groups, folds, seed)
    except ValueError as exc:  # more folds than artists
        raise UsageError(f"--folds {folds}: {exc}") from None
    _check_inner_folds(table, split, variants, folds)
    _check_plots(plots)
    report, outcome = cross_validate(
        table, variants, split, seed, SAMPLE_RATE, device, progress, stream=stream
    )
    if not table.synthetic:  # found and matched wherever the report is read from
        report["data"] |= catalog_identity(Path(table.source))
    oof = write_report(report, outcome.model.prediction, table.popularity, report_path)
    if plots is not None:
        from popscore.training.plots import write_plots  # noqa: PLC0415 (matplotlib: training only)

        write_plots(plots, table, outcome)
    return summary(report), oof


def train(
    table: TrackTable,
    spec: ModelSpec,
    out: Path,
    seed: int,
    device: str,
    evaluation: dict[str, Any] | None,
    model_version: str | None = None,
    plots: Path | None = None,
    stream: Stream = STREAM,
    save_artifact: bool = True,
) -> tuple[Path, ArtifactMeta] | None:
    """Train ``spec`` on every row and export the artifact, its evaluation embedded: the decision
    cut and the trees' share are the medians of what the evaluation's inner CVs chose. The
    training loss per epoch of each net goes to ``plots``/loss_curves.png when given. Under
    torchrun every rank trains and only the one with ``save_artifact`` writes (None elsewhere)."""
    _check_plots(plots)
    rows = np.arange(len(table.popularity))
    histories: list[list[float]] = []
    weight = _tree_weight(evaluation)
    model = fit_model(table, spec, rows, seed, SAMPLE_RATE, device, weight, histories, stream)
    if not save_artifact:
        return None
    for member, history in enumerate(histories):
        print(
            f"member {member}: loss per epoch {history[0]:.4f} -> {history[-1]:.4f} "
            f"over {len(history)} epochs"
        )
    if plots is not None:
        from popscore.training.plots import write_loss_curves  # noqa: PLC0415 (training only)

        write_loss_curves(plots, histories)
    meta = ArtifactMeta.for_model(
        model,
        model_version=model_version or f"{spec.name}-{seed}-{weights_digest(model)}",
        clip_seconds=CLIP_SECONDS,
        hit_threshold=_hit_cut(evaluation),
        hit_label_threshold=spec.config.hit_threshold,
        training=TrainingSummary(
            data=table.source,
            synthetic=table.synthetic,
            rows=len(rows),
            seed=seed,
            variant=spec.name,
            evaluation=evaluation,
            details=_recipe(table, spec),
        ),
        reference=reference(model, table, spec, seed, stream),
    )
    return save(model, out, meta), meta


def trained(table: TrackTable, spec: ModelSpec, seed: int) -> Trained:
    """What `train --evaluation` requires the report to describe: this run's model and data."""
    recipe = _recipe(table, spec)
    return Trained(
        features=table.feature_paths,
        variant=spec.name,
        rows=len(table.popularity),
        seed=seed,
        train=recipe["train"],
        source=table.source,
        synthetic=table.synthetic,
        sha256=recipe.get("data_sha256"),
    )


def _recipe(table: TrackTable, spec: ModelSpec) -> dict[str, Any]:
    # Recorded in the artifact, so that `export --evaluation` can check a report against it.
    recipe: dict[str, Any] = {"train": dataclasses.asdict(spec.config)}
    if not table.synthetic:
        recipe["data_sha256"] = file_digest(Path(table.source))
    return recipe


def reference(
    model: torch.nn.Module, table: TrackTable, spec: ModelSpec, seed: int, stream: Stream = STREAM
) -> Reference:
    """The drift reference: every training row's features, and the model's popularity on at
    most REFERENCE_SCORED_ROWS of them (in-sample: the rows it was fitted on)."""
    n = len(table.popularity)
    rows = np.arange(n)
    if n > REFERENCE_SCORED_ROWS:
        chosen = np.random.default_rng(seed).choice(n, REFERENCE_SCORED_ROWS, replace=False)
        rows = np.sort(chosen)
    return Reference.build(
        table.feature_paths, table.features, predict_rows(model, table, spec, rows, stream)
    )


def prepare_cache(
    catalog: Path,
    audio_column: str,
    directory: Path,
    settings: Settings,
    without: tuple[str, ...] = (),
    workers: int | None = None,
    shard_rows: int = 256,
    progress: bool = True,
    retry_failed: bool = False,
) -> Prepared:
    """Decode the catalog's audio into ``directory`` (training.cache) under the service's audio
    policy; local files may also lie under the catalog's own folder."""
    policy = audio_policy(settings)
    roots = (*policy.file_roots, catalog.resolve().parent)
    try:
        paths = datasets.without(datasets.PAPER_FEATURES, without)
    except ValueError as exc:
        raise UsageError(f"--without: {exc}") from None
    try:
        return prepare(
            catalog,
            audio_column,
            directory,
            replace(policy, file_roots=roots),
            paths,
            SAMPLE_RATE,
            CLIP_SECONDS,
            shard_rows,
            workers,
            progress,
            retry_failed,
        )
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise UsageError(f"--data {catalog}: {exc}") from None


def _check_inner_folds(
    table: TrackTable, split: list[np.ndarray], variants: list[ModelSpec], folds: int
) -> None:
    # Before any fitting: each outer fold's training rows are split again by artist to choose
    # its decision cut, and too few artists there would stop the run hours in.
    inner = max(v.inner_folds for v in variants)
    if inner < 2:
        return
    fewest = min(len(np.unique(np.delete(table.groups, test))) for test in split)
    if fewest < inner:
        raise UsageError(
            f"--folds {folds}: an outer fold's training rows hold only {fewest} artists, "
            f"fewer than the {inner} inner folds that choose its cuts; use fewer folds or more "
            f"artists ({len(np.unique(table.groups))} in all)"
        )


def _check_plots(plots: Path | None) -> None:
    # Before hours of training, not after: the pictures need a folder.
    if plots is not None and plots.exists() and not plots.is_dir():
        raise UsageError(f"--plots {plots}: not a folder")


def with_epochs(spec: ModelSpec, epochs: int | None) -> ModelSpec:
    """``spec`` trained for ``epochs`` epochs (None: as it is)."""
    if epochs is None:
        return spec
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, epochs=epochs))


def check_resume(table: TrackTable, spec: ModelSpec, resume: bool) -> None:
    """Say so when --resume can do nothing: only streamed training writes checkpoints. Not
    refused: a job that always passes --resume (restarted by its scheduler) trains from the
    start, in memory, as it would without it."""
    if resume and not streams_from_cache(table, spec):
        log.warning(
            "--resume: this run keeps no checkpoint (only training that streams audio from a "
            "cache does; features-only and synthetic runs train in memory): it starts afresh"
        )


def stream_options(workers: int | None) -> Stream:
    """How cached audio is streamed: ``workers`` DataLoader processes (None: the default)."""
    return Stream(workers=STREAM.workers if workers is None else workers)


def train_stream_options(out: Path, workers: int | None, resume: bool) -> Stream:
    """How `popscore train` streams cached audio: a checkpoint beside the artifact (OUT.ckpt)
    after every epoch, resumed from with ``resume``."""
    return replace(
        stream_options(workers),
        checkpoint=out.with_name(out.name + ".ckpt"),
        resume=resume,
    )


@contextmanager
def distributed(device: str) -> Iterator[tuple[str, int]]:
    """Under torchrun (WORLD_SIZE > 1): one process group for the run — NCCL with one GPU per
    rank on CUDA, gloo on CPU — and this rank's device; otherwise (device, 0) as they are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield device, 0
        return
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device, dist.get_rank()
    finally:
        dist.destroy_process_group()


def resolve_device(choice: str) -> str:
    """``auto``: CUDA when present; an explicit ``cuda`` or ``cuda:N`` without that device is a
    usage error (under torchrun each rank takes its LOCAL_RANK's device instead)."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {choice}, but no CUDA device is available")
        index = int(choice.partition(":")[2] or 0)
        if index >= (count := torch.cuda.device_count()):
            raise UsageError(f"--device {choice}, but this machine has {count} CUDA devices")
    return choice


def _hit_cut(evaluation: dict[str, Any] | None) -> float:
    # The decision cut at 70 from the evaluation's inner CV (median over folds), else 70.
    if not evaluation:
        return 70.0
    cuts = sorted(float(f["70"]) for f in evaluation["fold_cuts"])
    return cuts[len(cuts) // 2]


def _tree_weight(evaluation: dict[str, Any] | None) -> float | None:
    # The trees' share the evaluation's inner CVs chose (median over folds), else the spec's.
    weights = sorted(
        float(f["tree_weight"])
        for f in (evaluation or {}).get("fold_cuts", [])
        if "tree_weight" in f
    )
    return weights[len(weights) // 2] if weights else None
