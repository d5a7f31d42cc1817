"""What ``popscore export`` does: an artifact written again with new metadata, its weights
untouched, once it has scored a test batch. Needs only the artifact package."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from consumer.errors import PopscoreError, UsageError
from popscore.artifact import ArtifactError, ArtifactMeta, TrainingSummary, load, resave
from popscore.training.report import Trained, read_evaluation


def reexport(
    artifact: Path,
    out: Path,
    evaluation: Path | None = None,
    hit_threshold: float | None = None,
    model_version: str | None = None,
) -> ArtifactMeta:
    """Write ``artifact`` again with new metadata, after checking it scores a test batch; an
    ``evaluation`` report must be of the artifact's model (report.read_evaluation)."""
    try:
        loaded = load(artifact)
    except ArtifactError as exc:
        raise UsageError(f"{artifact}: {exc}") from None
    meta = loaded.meta
    changes: dict[str, Any] = {}
    if evaluation is not None:
        training = meta.training or TrainingSummary()
        summary = read_evaluation(evaluation, trained_artifact(meta))
        changes["training"] = replace(training, evaluation=summary)
    if hit_threshold is not None:
        changes["hit_threshold"] = hit_threshold
    if model_version:
        changes["model_version"] = model_version
    meta = meta.replace(**changes)
    with torch.inference_mode():
        pop, _ = loaded.module(
            torch.zeros(2, meta.clip_samples),
            torch.full((2, len(meta.features)), 1.0),
            torch.tensor([True, False]),
        )
    if not torch.isfinite(pop).all():  # an artifact that cannot run is not written anywhere
        raise PopscoreError(f"{artifact} scores a test batch as non-finite")
    resave(loaded.module, out, meta)
    return meta


def trained_artifact(meta: ArtifactMeta) -> Trained:
    """What an artifact's metadata tells of its model, for checking a report against it (older
    artifacts record less, and less is checked)."""
    training = meta.training
    if training is None:
        return Trained(features=meta.features)
    train = training.details.get("train")
    sha256 = training.details.get("data_sha256")
    return Trained(
        features=meta.features,
        variant=training.variant,
        rows=training.rows,
        seed=training.seed,
        train=train if isinstance(train, dict) else None,
        source=training.data,
        synthetic=bool(training.synthetic),
        sha256=sha256 if isinstance(sha256, str) else None,
    )
