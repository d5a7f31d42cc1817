"""Exporting test models the way training does: ``ArtifactMeta.for_model`` then ``save``."""

from pathlib import Path
from typing import Any

from popscore.artifact import ArtifactMeta, ArtifactModel, TrainingSummary, save


def export(
    model: ArtifactModel,
    path: Path,
    version: str = "tiny-test",
    clip_seconds: float = 2.0,
    **fields: Any,
) -> Path:
    """``model`` saved at ``path``; ``fields`` are other ArtifactMeta.for_model arguments."""
    meta = ArtifactMeta.for_model(
        model,
        model_version=version,
        clip_seconds=clip_seconds,
        training=fields.pop("training", TrainingSummary(data="test")),
        **fields,
    )
    return save(model, path, meta)
