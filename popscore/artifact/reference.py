"""The artifact's drift reference (the ``reference`` key): how its training inputs and outputs
were distributed, and the one binning that training and serving both use.

    reference = Reference.build(paths, features, popularity)  # at export
    counts = reference.features[path].bin_of(values)           # serving: same bins

A feature's present values fall into at most MAX_BINS bins: one per value when it takes few
(flags, key, mode), else between its training deciles. Missing values (NaN, what ``extract``
gives) are not binned: the missing rate is kept apart, so a field that stops arriving reads
as a missing spike, not as a shift of the values that still arrive.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from popscore.artifact.errors import ArtifactError

MAX_BINS = 10
# Edges and shares are rounded so the metadata stays a few kB; the shares are counted with the
# rounded edges, so serving bins exactly as the reference was counted.
_EDGE_DIGITS = 6
_SHARE_DIGITS = 6


@dataclass(frozen=True)
class Bins:
    """Bin edges and the training share of present values in each bin (``len(edges) + 1``)."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """The bin of each (present) value: bin i holds ``edges[i-1] < v <= edges[i]``."""
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), values, side="left")

    @classmethod
    def fit(cls, values: np.ndarray) -> "Bins | None":
        """Bins of ``values`` (present ones only); None when there are none."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return None
        distinct = np.unique(values)
        if distinct.size <= MAX_BINS:  # few values: one bin each, cut half way between them
            candidates = (distinct[:-1] + distinct[1:]) / 2
        else:
            candidates = np.quantile(values, np.linspace(0, 1, MAX_BINS + 1)[1:-1])
        edges = np.unique([float(f"{x:.{_EDGE_DIGITS}g}") for x in candidates])
        edges = _without_empty_bins(edges, values)
        counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size + 1)
        shares = counts / counts.sum()
        return cls(tuple(edges.tolist()), tuple(round(float(s), _SHARE_DIGITS) for s in shares))

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "shares": list(self.shares)}

    @classmethod
    def from_dict(cls, raw: Any) -> "Bins":
        edges = tuple(float(x) for x in raw["edges"])
        shares = tuple(float(x) for x in raw["shares"])
        if len(shares) != len(edges) + 1 or len(shares) > MAX_BINS:
            raise ValueError(f"{len(edges)} edges need {len(edges) + 1} shares (at most "
                             f"{MAX_BINS}), got {len(shares)}")  # fmt: skip
        if list(edges) != sorted(set(edges)) or not all(math.isfinite(x) for x in edges):
            raise ValueError("edges must be finite and strictly increasing")
        if any(not 0 <= s <= 1 for s in shares) or not math.isclose(sum(shares), 1, abs_tol=1e-3):
            raise ValueError("shares must be fractions summing to 1")
        return cls(edges, shares)


def _without_empty_bins(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    # Ties (a mass at 0, a value at the maximum) can leave a bin between two quantile edges
    # empty; an empty reference bin would make any serving value there look like drift.
    while edges.size:
        counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size + 1)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            break
        edges = np.delete(edges, min(int(empty[0]), edges.size - 1))
    return edges


@dataclass(frozen=True)
class FeatureReference:
    """One feature column in training: its missing rate and its present values' bins."""

    missing_rate: float
    bins: Bins | None
    """None when training never saw the feature present."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"missing_rate": self.missing_rate}
        return out | (self.bins.to_dict() if self.bins else {})

    @classmethod
    def from_dict(cls, raw: Any) -> "FeatureReference":
        missing = float(raw["missing_rate"])
        if not 0 <= missing <= 1:
            raise ValueError(f"missing_rate {missing} is not a fraction")
        return cls(missing, Bins.from_dict(raw) if "edges" in raw else None)


@dataclass(frozen=True)
class Reference:
    """The training distribution of each feature column and of the predicted popularity."""

    rows: int
    """Training rows the feature references were counted on."""
    features: Mapping[str, FeatureReference]
    score: Bins
    """The model's popularity (clipped to 0-100, as served) on its own training rows."""
    score_rows: int

    @classmethod
    def build(
        cls, paths: Sequence[str], features: np.ndarray, popularity: np.ndarray
    ) -> "Reference":
        """From the training feature matrix [n, len(paths)] (NaN = missing) and the model's
        predicted popularity on (some of) those rows."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(paths) or not len(features):
            raise ValueError(f"need a non-empty [n, {len(paths)}] matrix, got {features.shape}")
        score = Bins.fit(np.clip(np.asarray(popularity, dtype=np.float64), 0.0, 100.0))
        if score is None:
            raise ValueError("no predicted popularity to take the score's bins from")
        columns = {}
        for path, column in zip(paths, features.T, strict=True):
            present = column[~np.isnan(column)]
            missing = round(1.0 - present.size / column.size, _SHARE_DIGITS)
            columns[path] = FeatureReference(missing, Bins.fit(present))
        return cls(len(features), columns, score, len(popularity))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "features": {path: ref.to_dict() for path, ref in self.features.items()},
            "score": {"rows": self.score_rows, "in_sample": True, **self.score.to_dict()},
        }

    @classmethod
    def from_dict(cls, raw: Any) -> "Reference":
        """The typed view; ArtifactError naming what is malformed."""
        try:
            features = {str(p): FeatureReference.from_dict(r) for p, r in raw["features"].items()}
            score = raw["score"]
            return cls(int(raw["rows"]), features, Bins.from_dict(score), int(score["rows"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"reference: {type(exc).__name__}: {exc}") from None
