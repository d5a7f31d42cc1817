"""The evaluation's pictures (`popscore evaluate --plots DIR`, `popscore train --plots DIR`).

    write_plots(Path("docs/img/paper"), table, outcome)
    # predicted_vs_actual.png  roc_70.png  calibration.png  error_by_artist_size.png
    # loss_curves.png
    write_loss_curves(Path("out"), histories)

matplotlib (a training-time extra, like scikit-learn) with the Agg backend: files only, no
display. Every picture is drawn from the out-of-fold predictions the report's numbers come
from, so the two can never disagree.
"""

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib as mpl

mpl.use("Agg")  # files only: no display, and no GUI toolkit needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

if TYPE_CHECKING:
    from popscore.training.data import TrackTable
    from popscore.training.evaluate import Outcome

HIT = 70.0


def write_plots(directory: Path, table: "TrackTable", outcome: "Outcome") -> list[Path]:
    """Every evaluation picture into `directory` (created); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    target = table.popularity.astype(np.float64)
    model = outcome.model
    others = {name: outcome.baselines[name].prediction for name in ("ridge", "blend")}
    figures = {
        "predicted_vs_actual.png": _predicted_vs_actual(target, model.prediction),
        "roc_70.png": _roc(target, {"model": model.prediction, **others}),
        "calibration.png": _calibration(target, model.hit_probability),
        "error_by_artist_size.png": _by_artist_size(
            target, table.groups, {"model": model.prediction, "ridge": others["ridge"]}
        ),
    }
    if model.histories:
        figures["loss_curves.png"] = _loss_curves(model.histories, "per outer fold and member")
    return [_save(figure, directory / name) for name, figure in figures.items()]


def write_loss_curves(directory: Path, histories: Sequence[Sequence[float]]) -> Path:
    """The training loss per epoch of each member of a trained model."""
    directory.mkdir(parents=True, exist_ok=True)
    return _save(_loss_curves(histories, "per member"), directory / "loss_curves.png")


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _predicted_vs_actual(target: np.ndarray, prediction: np.ndarray) -> Figure:
    figure, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(target, prediction, s=6, alpha=0.35, linewidths=0)
    ax.plot([0, 100], [0, 100], color="grey", lw=1, label="predicted = actual")
    ax.axvline(HIT, color="tab:red", lw=0.8, ls="--", label=f"hit label ({HIT:g})")
    mae = np.abs(prediction - target).mean()
    ax.set(
        xlabel="actual popularity",
        ylabel="predicted popularity (out of fold)",
        title=f"Predicted vs actual (MAE {mae:.2f})",
        xlim=(0, 100),
        ylim=(0, 100),
    )
    ax.legend(loc="upper left", fontsize=8)
    return figure


def _roc(target: np.ndarray, scores: dict[str, np.ndarray]) -> Figure:
    figure, ax = plt.subplots(figsize=(5, 5))
    truth = target >= HIT
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC at popularity >= {HIT:g} (out of fold)",
    )
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _calibration(target: np.ndarray, hit_probability: np.ndarray) -> Figure:
    figure, ax = plt.subplots(figsize=(5, 5))
    truth = target >= HIT
    observed, predicted = calibration_curve(truth, hit_probability, n_bins=10, strategy="quantile")
    ax.plot(predicted, observed, marker="o", lw=1.5, label="model (deciles of the probability)")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfectly calibrated")
    ax.set(
        xlabel="mean hit_probability",
        ylabel=f"share with popularity >= {HIT:g}",
        title="Calibration of hit_probability (out of fold)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    return figure


def _by_artist_size(
    target: np.ndarray, groups: np.ndarray, predictions: dict[str, np.ndarray]
) -> Figure:
    # Artists by their number of tracks, in quartiles of the artists: an artist's error
    # depends on how much of them the data holds (and the folds hold whole artists out).
    _, artist, counts = np.unique(groups, return_inverse=True, return_counts=True)
    size = counts[artist]
    edges = [int(e) for e in np.unique(np.quantile(counts, [0, 0.25, 0.5, 0.75, 1]).round())]
    if len(edges) == 1:  # every artist has as many tracks
        edges = edges * 2
    buckets = [(edges[0], edges[1])] + [(a + 1, b) for a, b in pairwise(edges[1:])]
    figure, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(predictions)
    inside = [(size >= lo) & (size <= hi) for lo, hi in buckets]
    for i, (name, prediction) in enumerate(predictions.items()):
        error = np.abs(prediction - target)
        ax.bar(np.arange(len(buckets)) + i * width, [error[m].mean() for m in inside], width,
               label=name)  # fmt: skip
    ticks = [
        f"{_span(lo, hi)}\n{len(np.unique(artist[m]))} artists\n{m.sum()} tracks"
        for (lo, hi), m in zip(buckets, inside, strict=True)
    ]
    ax.set_xticks(np.arange(len(buckets)) + width * (len(predictions) - 1) / 2, ticks, fontsize=8)
    ax.set(
        xlabel="tracks per artist in the data (quartiles of the artists)",
        ylabel="MAE (out of fold)",
        title="Error by artist size",
    )
    ax.legend(fontsize=8)
    return figure


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _loss_curves(histories: Sequence[Sequence[float]], what: str) -> Figure:
    figure, ax = plt.subplots(figsize=(6, 4))
    for history in histories:
        ax.plot(np.arange(1, len(history) + 1), history, lw=1, alpha=0.7)
    ax.set(
        xlabel="epoch",
        ylabel="training loss (Huber + weighted BCE)",
        title=f"Training loss per epoch, {what} ({len(histories)} curves)",
    )
    return figure
