"""The report's metrics (scikit-learn's), grouped folds, and the ridge baseline.

folds = group_folds(table.groups, k=5, seed=0)     # no artist in two folds
metrics(target, prediction)                        # MAE, RMSE, R², per-threshold F1 / AUC
ridge(feature_paths).fit(x, y).predict(x_test)     # the linear baseline
blend(feature_paths, seed).fit(x, y)               # ½ ridge + ½ untuned boosting
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor, VotingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import Ridge
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from popscore.artifact.features import COUNT_FEATURES

THRESHOLDS: tuple[float, ...] = (50.0, 70.0)
RIDGE_ALPHA = 1.0
Rows = np.ndarray  # int indices into a TrackTable


def group_folds(groups: np.ndarray, k: int, seed: int) -> list[Rows]:
    """k test folds of whole groups, balanced in rows: GroupKFold gives the largest groups out
    first, each to the lightest fold, and takes equal-sized groups in descending label order;
    the labels below make that order a seeded shuffle, so each seed is another assignment."""
    names, inverse = np.unique(groups, return_inverse=True)
    if k < 2 or k > len(names):
        raise ValueError(f"need 2 <= folds <= {len(names)} groups, got {k}")
    position = np.empty(len(names), dtype=np.int64)
    position[np.random.default_rng(seed).permutation(len(names))] = np.arange(len(names))
    labels = (len(names) - 1 - position)[inverse]
    return [test for _, test in GroupKFold(n_splits=k).split(groups, groups=labels)]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC (ties count half); NaN when only one class is present or a score is not finite."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any() or not np.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(labels, scores))


def _f1(truth: np.ndarray, decided: np.ndarray) -> float:
    # 1.0 when neither has a positive (nothing to find, nothing claimed), as for macro below.
    return float(f1_score(truth, decided, zero_division=1.0))


def _macro_f1(truth: np.ndarray, decided: np.ndarray) -> float:
    return float(f1_score(truth, decided, labels=[True, False], average="macro", zero_division=1.0))


def classification_metrics(
    target: np.ndarray, score: np.ndarray, decided: np.ndarray, threshold: float
) -> dict[str, float]:
    """At one popularity threshold: label = target >= threshold; `decided` is the prediction."""
    truth = target >= threshold
    return {
        "accuracy": float(accuracy_score(truth, decided)),
        "f1": _f1(truth, decided),
        "macro_f1": _macro_f1(truth, decided),
        "roc_auc": roc_auc(truth, score),
        "positive_rate": float(decided.mean()),
        "base_rate": float(truth.mean()),
    }


def metrics(
    target: np.ndarray,
    prediction: np.ndarray,
    cuts: dict[float, np.ndarray] | None = None,
    hit_score: np.ndarray | None = None,
    hit_threshold: float = 70.0,
    folds: Sequence[Rows] | None = None,
) -> dict[str, Any]:
    """MAE, RMSE, R² and per-threshold metrics. `cuts`: per-row decision cut on the predicted
    popularity for each threshold (the model's, fitted per fold); default: the threshold.

    `roc_auc` always ranks the predicted popularity (comparable with every baseline); with a
    `hit_score` (the hit head's output), `roc_auc_hit_head` at `hit_threshold` ranks that too.
    With the `folds` the predictions came from, `roc_auc_per_fold` and its mean
    `roc_auc_fold_mean` rank within each fold only (see fold_aucs)."""
    target = np.asarray(target, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    out: dict[str, Any] = {"mae": math.nan, "rmse": math.nan, "r2": math.nan, "at": {}}
    # A diverged model's NaN scores are reported (as null), not raised by scikit-learn.
    if np.isfinite(prediction).all():
        out["mae"] = float(mean_absolute_error(target, prediction))
        out["rmse"] = float(root_mean_squared_error(target, prediction))
        # NaN, not sklearn's 0 or 1, where R² is undefined (a constant target)
        if np.ptp(target) > 0:
            out["r2"] = float(r2_score(target, prediction))
    for t in THRESHOLDS:
        cut = cuts[t] if cuts else np.full(len(target), t)
        out["at"][f"{t:g}"] = classification_metrics(target, prediction, prediction >= cut, t)
        if hit_score is not None and t == hit_threshold:
            out["at"][f"{t:g}"]["roc_auc_hit_head"] = roc_auc(target >= t, hit_score)
        if folds is not None:
            per_fold = fold_aucs(target, prediction, folds, t)
            out["at"][f"{t:g}"] |= {
                "roc_auc_per_fold": per_fold,
                "roc_auc_fold_mean": float(np.mean(per_fold)),
            }
    return out


def fold_aucs(
    target: np.ndarray, prediction: np.ndarray, folds: Sequence[Rows], threshold: float
) -> list[float]:
    """ROC-AUC within each fold. The pooled AUC also ranks rows of different folds against
    each other, whose models differ: a mean predictor, 0.5 in every fold, pools to another
    value because each fold's mean moves opposite to its test rows' labels."""
    return [roc_auc(target[f] >= threshold, prediction[f]) for f in folds]


def best_cut(target: np.ndarray, prediction: np.ndarray, threshold: float) -> float:
    """The cut on predicted popularity that maximises macro-F1 at `threshold` on these rows."""
    candidates = np.unique(np.quantile(prediction, np.linspace(0.02, 0.98, 97)))
    truth = target >= threshold
    scores = [_macro_f1(truth, prediction >= c) for c in candidates]
    return float(candidates[int(np.argmax(scores))])


def ridge(feature_paths: Sequence[str]) -> Pipeline:
    """Ridge on the same features as the model: log1p counts, then mean imputation and
    standardisation fitted on the training rows."""
    is_count = np.array([path in COUNT_FEATURES for path in feature_paths])

    def log_counts(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.where(is_count, np.log1p(np.clip(x, 0, None)), x)

    return make_pipeline(
        FunctionTransformer(log_counts),
        SimpleImputer(strategy="mean", keep_empty_features=True),  # an all-missing column: 0
        StandardScaler(),
        Ridge(alpha=RIDGE_ALPHA),
    )


def blend(feature_paths: Sequence[str], seed: int = 0) -> VotingRegressor:
    """The strong cheap baseline: the mean of ridge and scikit-learn's gradient boosting with
    its default settings (nothing tuned), on the same features."""
    boosting = make_pipeline(
        SimpleImputer(strategy="mean", keep_empty_features=True),
        GradientBoostingRegressor(random_state=seed),
    )
    return VotingRegressor([("ridge", ridge(feature_paths)), ("boosting", boosting)])
