"""Input and score drift: the last N scored events against the artifact's training reference.

    drift = DriftMonitor.create(meta, metrics, window=2000, min_events=200)  # None: no reference
    drift.observe(feature_rows, popularity)  # per batch, after scoring

Each event becomes one small code per column (the bin of its value, or "missing"; the last
column is the score). A ring holds the last N events' codes and a matrix the counts per bin,
so memory is N x columns integers whatever the traffic, and a batch costs a few numpy calls.

Gauges (docs/INTERFACE.md, "Metrics"): the missing ratio and the population stability index
(PSI) of each feature, the score's PSI. None is exported before the window holds
``min_events`` events (a feature's PSI: that many present values): on few events PSI is noise,
about (bins - 1) / n even with no drift at all.
"""

import contextlib
import logging
from collections.abc import Sequence

import numpy as np

from consumer.errors import DeadLetter
from consumer.metrics import Metrics
from popscore.artifact import ArtifactMeta, Bins, Reference
from popscore.artifact.reference import MAX_BINS
from schemas.scores import ScoreRecord

log = logging.getLogger(__name__)
# Floor of a bin's share in PSI: an empty bin adds share x ln(share / EPSILON), not infinity.
EPSILON = 1e-4
MISSING = MAX_BINS  # the code of a missing value, after the value bins
WIDTH = MAX_BINS + 1
SCORE_LABEL = "popularity"


class DriftMonitor:
    """Counts of the last ``window`` events per bin, exported as gauges after each batch."""

    def __init__(
        self, reference: Reference, metrics: Metrics, window: int, min_events: int
    ) -> None:
        if not 1 <= min_events <= window:
            raise ValueError(f"need 1 <= min_events ({min_events}) <= window ({window})")
        self.window = window
        self.min_events = min_events
        self.metrics = metrics
        self.features = list(reference.features)
        self._bins: list[Bins | None] = [r.bins for r in reference.features.values()]
        self._bins.append(reference.score)
        self._expected = _shares(self._bins)
        self._ring = np.full((window, len(self._bins)), -1, dtype=np.int32)  # -1: empty slot
        self._offsets = np.arange(len(self._bins), dtype=np.int32) * WIDTH
        self._counts = np.zeros(len(self._bins) * WIDTH, dtype=np.int64)
        self._next = 0
        self.held = 0
        for name, ref in reference.features.items():
            metrics.feature_missing_ratio_reference.labels(name).set(ref.missing_rate)

    @classmethod
    def create(
        cls, meta: ArtifactMeta, metrics: Metrics, window: int, min_events: int
    ) -> "DriftMonitor | None":
        """The monitor of ``meta``'s reference; None (said once, here) for an artifact without."""
        if meta.reference is None:
            log.info("%s carries no drift reference (exported before it had one): no drift "
                     "gauges", meta.model_version)  # fmt: skip
            return None
        return cls(meta.reference, metrics, window, min_events)

    def observe_scored(
        self,
        rows: Sequence[np.ndarray | DeadLetter],
        outcomes: Sequence[ScoreRecord | DeadLetter],
    ) -> None:
        """A batch as the pipeline has it: the feature rows and outcomes of the same events;
        only the scored ones count."""
        scored = [(row, out) for row, out in zip(rows, outcomes, strict=True)
                  if isinstance(out, ScoreRecord) and isinstance(row, np.ndarray)]  # fmt: skip
        if scored:
            features = np.stack([row for row, _ in scored])
            self.observe(features, np.array([out.popularity for _, out in scored]))

    def observe(self, features: np.ndarray, popularity: np.ndarray) -> None:
        """Feature rows [n, F] (NaN = missing) and their scores [n] join the window."""
        values = np.column_stack([features, np.clip(popularity, 0.0, 100.0)])[-self.window :]
        codes = self._codes(values)
        slots = (self._next + np.arange(len(codes))) % self.window
        evicted = self._ring[slots]
        self._counts -= np.bincount(evicted[evicted >= 0], minlength=self._counts.size)
        self._counts += np.bincount(codes.ravel(), minlength=self._counts.size)
        self._ring[slots] = codes
        self._next = int(slots[-1] + 1) % self.window
        self.held = min(self.held + len(codes), self.window)
        self._export()

    def counts(self) -> np.ndarray:
        """Events per column and bin in the window, [columns, WIDTH]; the last bin: missing."""
        return self._counts.reshape(-1, WIDTH)

    def _codes(self, values: np.ndarray) -> np.ndarray:
        bins = np.zeros(values.shape, dtype=np.int32)
        for j, column in enumerate(self._bins):
            if column is not None:  # a feature never present in training: only its missing
                bins[:, j] = column.bin_of(values[:, j])
        bins[np.isnan(values)] = MISSING
        return bins + self._offsets

    def _export(self) -> None:
        if self.held < self.min_events:
            return
        counts = self.counts()
        present = counts[:, :MAX_BINS].sum(axis=1)
        psi = population_stability(counts[:, :MAX_BINS], self._expected)
        m = self.metrics
        for j, name in enumerate(self.features):
            m.feature_missing_ratio.labels(name).set(counts[j, MISSING] / self.held)
            if self._bins[j] is not None and present[j] >= self.min_events:
                m.feature_psi.labels(name).set(psi[j])
            else:
                # Old prometheus_client raises KeyError for a label set never set.
                with contextlib.suppress(KeyError):
                    m.feature_psi.remove(name)
        m.score_psi.labels(SCORE_LABEL).set(psi[-1])


def population_stability(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """PSI per row: sum over bins of (a - e) ln(a / e), shares floored at EPSILON; bins with
    no expected share (NaN: beyond a column's bins) count nothing; 0 for a row without counts."""
    totals = counts.sum(axis=1, keepdims=True)
    actual = np.maximum(counts / np.maximum(totals, 1), EPSILON)
    floored = np.maximum(np.nan_to_num(expected, nan=EPSILON), EPSILON)
    terms = np.where(np.isnan(expected), 0.0, (actual - floored) * np.log(actual / floored))
    return np.where(totals[:, 0] > 0, terms.sum(axis=1), 0.0)


def _shares(columns: Sequence[Bins | None]) -> np.ndarray:
    """The reference shares as a [columns, MAX_BINS] matrix, NaN where a column has no bin."""
    out = np.full((len(columns), MAX_BINS), np.nan)
    for j, bins in enumerate(columns):
        if bins is not None:
            out[j, : len(bins.shares)] = bins.shares
    return out
