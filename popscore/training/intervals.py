"""Artist-level bootstrap intervals for the headline metrics and for differences between models.

    scored = {"model": Scored(prediction, cut_at_70), "ridge": Scored(...)}
    artist_bootstrap(target, groups, scored, [("model", "ridge")])
    # {"model": {"mae": {"estimate": 8.28, "low": 7.9, "high": 8.7}, ...}, "model - ridge": ...}

Tracks of one artist are not independent (the artist's popularity and followers are shared,
and the folds hold whole artists out), so the resampling unit is the artist: each resample
draws artists with replacement and keeps all their out-of-fold rows. Differences are paired
(both models scored on the same resampled rows), which is what makes a small but consistent
gap visible. Percentile intervals, drawn here rather than with scipy.stats.bootstrap: a
resample of few artists can hold one class only, where ROC-AUC is undefined, and scipy's
quantiles turn one such NaN into a NaN interval; here those resamples are left out of that
metric's quantiles and counted (`undefined_auc_resamples`).
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

HEADLINE: tuple[str, ...] = ("mae", "roc_auc@70", "macro_f1@70")
HIT_LABEL = 70.0


@dataclass(frozen=True)
class Scored:
    """Out-of-fold predicted popularity and the per-row decision cut at the hit threshold."""

    prediction: np.ndarray
    cut: np.ndarray


def headline(target: np.ndarray, scored: Scored, rows: np.ndarray) -> np.ndarray:
    """MAE, ROC-AUC@70 (ranking predicted popularity) and macro-F1@70 (prediction >= cut).

    The same definitions as scikit-learn's roc_auc_score and f1_score(average="macro") (a
    unit test holds them equal), computed from ranks and counts: the bootstrap calls this
    thousands of times, and scikit-learn's input checks would cost more than the metrics."""
    y, p = target[rows], scored.prediction[rows]
    truth = y >= HIT_LABEL
    return np.array(
        [np.abs(p - y).mean(), rank_auc(truth, p), macro_f1(truth, p >= scored.cut[rows])]
    )


def rank_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney statistic (ties count half); NaN with one class only."""
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def macro_f1(truth: np.ndarray, decided: np.ndarray) -> float:
    """Mean of the F1 of both classes; a class nobody has nor claims scores 1."""

    def f1(t: np.ndarray, d: np.ndarray) -> float:
        hits, claimed, real = int((t & d).sum()), int(d.sum()), int(t.sum())
        return 1.0 if claimed + real == 0 else 2 * hits / (claimed + real)

    return (f1(truth, decided) + f1(~truth, ~decided)) / 2


def artist_bootstrap(
    target: np.ndarray,
    groups: np.ndarray,
    scored: Mapping[str, Scored],
    pairs: Sequence[tuple[str, str]] = (),
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Estimate and `level` interval of each HEADLINE metric per model and per `a - b` pair."""
    target = np.asarray(target, dtype=np.float64)
    names = list(scored)
    _, artist = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(artist == a) for a in range(artist.max() + 1)]

    def statistic(artists: np.ndarray) -> np.ndarray:
        rows = np.concatenate([rows_of[a] for a in artists])
        per_model = {name: headline(target, scored[name], rows) for name in names}
        diffs = [per_model[a] - per_model[b] for a, b in pairs]
        return np.concatenate([*per_model.values(), *diffs])

    everyone = np.arange(len(rows_of))
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [statistic(rng.integers(0, len(rows_of), len(rows_of))) for _ in range(resamples)]
    )
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        # A metric undefined on every resample (one class in all the data) gets a NaN interval.
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    estimate = statistic(everyone)
    labels = [*names, *(f"{a} - {b}" for a, b in pairs)]
    out: dict[str, Any] = {
        "method": f"artist-level bootstrap, {resamples} resamples of {len(rows_of)} artists, "
        f"percentile {level:.0%} intervals; differences paired on the same resampled rows",
        "undefined_auc_resamples": int(np.isnan(draws[:, 1]).sum()),
    }
    for i, label in enumerate(labels):
        out[label] = {
            metric: {
                "estimate": float(estimate[3 * i + j]),
                "low": float(low[3 * i + j]),
                "high": float(high[3 * i + j]),
            }
            for j, metric in enumerate(HEADLINE)
        }
    return out
