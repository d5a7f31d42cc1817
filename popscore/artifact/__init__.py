"""The model artifact's one owner: the file format, its metadata, what its module does, the
feature order and extraction, and the log-Mel frontend that ships inside it.

    from popscore.artifact import ArtifactMeta, load, save
    artifact = load("models/demo.pt", "cpu")
    row = extract(event.model_dump(), artifact.meta.features)

Serving (``consumer``), training, the benchmarks and the GPU check all import it; it needs
only torch, torchaudio and numpy. The format is documented in docs/INTERFACE.md.
"""

from popscore.artifact.errors import ArtifactError
from popscore.artifact.features import DEFAULT_FEATURES, extract, extract_many
from popscore.artifact.meta import (
    DEFAULT_HIT_THRESHOLD,
    META_FILE,
    REQUIRED_KEYS,
    ArtifactMeta,
    TrainingSummary,
)
from popscore.artifact.optimize import optimize_for_cpu
from popscore.artifact.protocol import ArtifactModel, ScoringModule, StagedScoringModule
from popscore.artifact.reference import Bins, FeatureReference, Reference
from popscore.artifact.store import Artifact, load, resave, save, weights_digest

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_HIT_THRESHOLD",
    "META_FILE",
    "REQUIRED_KEYS",
    "Artifact",
    "ArtifactError",
    "ArtifactMeta",
    "ArtifactModel",
    "Bins",
    "FeatureReference",
    "Reference",
    "ScoringModule",
    "StagedScoringModule",
    "TrainingSummary",
    "extract",
    "extract_many",
    "load",
    "optimize_for_cpu",
    "resave",
    "save",
    "weights_digest",
]
