"""Artist-grouped k-fold evaluation with baselines: `popscore evaluate` (docs/MODEL.md; the
report's JSON is described in docs/INTERFACE.md, "Evaluation report").

    folds = group_folds(table.groups, k=5, seed=0)        # metrics.py: no artist in two folds
    report, outcome = cross_validate(table, specs, folds, seed=0)  # + the baselines
    write_report(report, outcome.model.prediction, table.popularity, "x.json")  # + x.oof.csv

Everything fitted per outer fold (feature normalisation, the baselines, the model, the trees'
share, the decision cuts) sees only that fold's training rows: the share and the cuts come
from an inner grouped CV on them, and ridge and the blend get their cuts from the same inner
folds. Not nested: the fixed settings (TABULAR_CONFIG, the features-only net and its
`n_bins`, the tree settings in training.trees) were chosen by looking at out-of-fold scores
of seed 0's outer folds (docs/MODEL.md); other seeds' fold assignments test them afresh.
The report gives artist-bootstrap intervals (training.intervals) beside every headline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.dummy import DummyRegressor
from tqdm import tqdm

from popscore.training.data import TrackTable
from popscore.training.intervals import Scored, artist_bootstrap
from popscore.training.metrics import (
    THRESHOLDS,
    Rows,
    best_cut,
    blend,
    group_folds,
    metrics,
    ridge,
)
from popscore.training.model import Ensemble, FusionNet
from popscore.training.stream import CachedClips, Stream, predict_cached, train_stream
from popscore.training.train import TABULAR_CONFIG, TrainConfig, predict, train


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one model variant (an ensemble of `members` seeds)."""

    name: str = "fusion"
    use_audio: bool = True
    use_features: bool = True  # False: every feature is hidden (NaN) — the audio-only variant
    members: int = 1
    net: dict[str, Any] = field(default_factory=dict)  # FusionNet keyword arguments
    config: TrainConfig = field(default_factory=TrainConfig)
    inner_folds: int = 0  # > 1: choose each threshold's decision cut by inner grouped CV
    # > 0: add boosted trees (training.trees, needs scikit-learn) as one more member, with
    # this share of the ensemble's weight; the seeds share the rest equally.
    trees: float = 0.0
    # Non-empty (and inner_folds > 1): the trees' share is chosen per outer fold from this
    # grid by the inner CV's MAE, on the training folds only; `trees` breaks ties.
    tree_weight_grid: tuple[float, ...] = ()

    def build(self, paths: Sequence[str], sample_rate: int, seed: int) -> FusionNet:
        torch.manual_seed(seed)
        return FusionNet(paths, sample_rate=sample_rate, use_audio=self.use_audio, **self.net)


# Features-only: small nets (the audio branch is built tiny and never run) over a
# piecewise-linear encoding of every feature, 5 seeds, averaged with boosted trees whose share
# the inner CV picks (docs/MODEL.md). The net's settings and n_bins were chosen on seed 0's
# outer folds, not nested (see the module docstring).
FEATURES_ONLY = ModelSpec(
    name="features_only",
    use_audio=False,
    members=5,
    net={
        "channels": (4, 8),
        "audio_dim": 8,
        "feature_dim": 16,
        "hidden": 32,
        "dropout": 0.3,
        "n_bins": 8,
    },
    config=TABULAR_CONFIG,
    inner_folds=3,
    trees=0.5,
    tree_weight_grid=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
)


# With audio (the synthetic benchmark): the default FusionNet, one seed, the demo's schedule.
# Fusion gets the same boosted-tree half and the same inner-CV decision cut as features-only
# (trees see only the features), so the two differ only in their net: the fusion CNN vs the
# feature MLPs. Audio-only cannot use trees (it has no features): the bare CNN, cut at the
# threshold (an inner CV would quadruple its cost for a variant far behind the others).
FUSION = ModelSpec(name="fusion", config=TrainConfig(epochs=10), trees=0.5, inner_folds=3)
AUDIO_ONLY = ModelSpec(name="audio_only", use_features=False, config=TrainConfig(epochs=10))


# How cached audio is streamed by default (training.stream); the commands pass their own.
STREAM = Stream()


# --- baselines ------------------------------------------------------------------------------

# Each is fitted on the training folds and predicts the test fold, like the model.
BASELINES: dict[str, Callable[[Sequence[str], int], RegressorMixin]] = {
    "mean": lambda _paths, _seed: DummyRegressor(strategy="mean"),
    # "Every release is a hit": popularity 100, so positive at every threshold.
    "always_hit": lambda _paths, _seed: DummyRegressor(strategy="constant", constant=100.0),
    "ridge": lambda paths, _seed: ridge(paths),
    "blend": blend,
}
# Decided like the model: at a cut chosen by the same inner grouped CV (same inner folds). A
# constant predictor has no cut worth choosing, so the other two decide at the threshold.
CUT_BY_INNER_CV = ("ridge", "blend")


@dataclass
class Baseline:
    prediction: np.ndarray  # OOF popularity per row
    cuts: dict[float, np.ndarray]  # per-row decision cut per threshold


def _fit_predict(
    make: Callable[[Sequence[str], int], RegressorMixin],
    table: TrackTable,
    train_rows: Rows,
    test_rows: Rows,
    seed: int,
) -> np.ndarray:
    target = table.popularity[train_rows].astype(np.float64)
    fitted = make(table.feature_paths, seed).fit(table.features[train_rows], target)
    return np.asarray(fitted.predict(table.features[test_rows]), dtype=np.float64)


def _inner_cuts(
    make: Callable[[Sequence[str], int], RegressorMixin],
    table: TrackTable,
    rows: Rows,
    seed: int,
    inner_folds: int,
) -> dict[float, float]:
    # The model's inner folds (choose_inner): the same rows decide both cuts.
    prediction = np.empty(len(rows))
    for test in group_folds(table.groups[rows], inner_folds, seed + 1):
        train_rows = rows[np.setdiff1d(np.arange(len(rows)), test)]
        prediction[test] = _fit_predict(make, table, train_rows, rows[test], seed)
    return {t: best_cut(table.popularity[rows], prediction, t) for t in THRESHOLDS}


def baseline_predictions(
    table: TrackTable, folds: Sequence[Rows], seed: int = 0, inner_folds: int = 0
) -> dict[str, Baseline]:
    """Out-of-fold predictions of every baseline on the same folds as the model; with
    `inner_folds` > 1, the CUT_BY_INNER_CV ones get their cuts as the model does."""
    n = len(table.popularity)
    out = {}
    for name, make in BASELINES.items():
        baseline = Baseline(np.empty(n), {t: np.full(n, t) for t in THRESHOLDS})
        for test in folds:
            train_rows = np.setdiff1d(np.arange(n), test)
            baseline.prediction[test] = _fit_predict(make, table, train_rows, test, seed)
            if name in CUT_BY_INNER_CV and inner_folds > 1:
                for t, cut in _inner_cuts(make, table, train_rows, seed, inner_folds).items():
                    baseline.cuts[t][test] = cut
        out[name] = baseline
    return out


# --- the model ------------------------------------------------------------------------------


def _inputs(table: TrackTable, spec: ModelSpec, rows: Rows) -> tuple[Any, np.ndarray]:
    features = table.features[rows]
    if not spec.use_features:
        features = np.full_like(features, np.nan)
    waveforms = None
    if spec.use_audio and not streams_from_cache(table, spec):
        if table.waveforms is None:
            raise ValueError(f"{spec.name} needs audio, and this table has none loaded")
        waveforms = table.waveforms[rows]
    return waveforms, features


def fit_model(
    table: TrackTable,
    spec: ModelSpec,
    rows: Rows,
    seed: int,
    sample_rate: int,
    device: str = "cpu",
    tree_weight: float | None = None,
    histories: list[list[float]] | None = None,
    stream: Stream = STREAM,
) -> torch.nn.Module:
    """Train `spec.members` seeds (and the trees, if `spec.trees`, with `tree_weight` of the
    ensemble, default `spec.trees`) on `rows`; one member is returned bare, several as an
    Ensemble. Each net's training loss per epoch is appended to `histories` when given. A table
    whose audio is in a cache (`table.cached`) is streamed from it (`stream`: workers, crops,
    checkpoints, resume)."""
    waveforms, features = _inputs(table, spec, rows)
    members: list[torch.nn.Module] = []
    for m in range(spec.members):
        net = spec.build(table.feature_paths, sample_rate, seed + m)
        config = TrainConfig(**{**asdict(spec.config), "seed": seed + m})
        if streams_from_cache(table, spec):
            clips = _clips(table, spec, rows, round(stream.crop_seconds * sample_rate), True)
            member = replace(stream, checkpoint=_member_path(stream.checkpoint, m, spec.members))
            history = train_stream(net, clips, config, member, device, progress=False)
        else:
            history = train(net, waveforms, features, table.popularity[rows], config, False, device)
        if histories is not None:
            histories.append(history)
        members.append(net)
    weights = [1.0 / spec.members] * spec.members
    if spec.trees > 0:
        from popscore.training.trees import fit_trees  # noqa: PLC0415 (needs the optional scikit-learn)

        trees = fit_trees(table.feature_paths, features, table.popularity[rows],
                          spec.config.hit_threshold, seed, sample_rate)  # fmt: skip
        members.append(trees.to(device))
        share = spec.trees if tree_weight is None else tree_weight
        weights = [w * (1.0 - share) for w in weights] + [share]
    # The ensemble's own weights buffer and frontend are made on the CPU: move them too.
    return members[0] if len(members) == 1 else Ensemble(members, weights).to(device).eval()


def predict_rows(
    model: torch.nn.Module, table: TrackTable, spec: ModelSpec, rows: Rows, stream: Stream = STREAM
) -> np.ndarray:
    return predict_both(model, table, spec, rows, stream)[0]


def predict_both(
    model: torch.nn.Module, table: TrackTable, spec: ModelSpec, rows: Rows, stream: Stream = STREAM
) -> tuple[np.ndarray, np.ndarray]:
    """(popularity, hit probability) for `rows` (cached audio read by `stream.workers`)."""
    if streams_from_cache(table, spec):
        assert table.cached is not None
        clips = _clips(table, spec, rows, table.cached.manifest.clip_samples, False)
        return predict_cached(model, clips, stream.workers)
    waveforms, features = _inputs(table, spec, rows)
    mask = table.audio_mask[rows] if spec.use_audio and table.audio_mask is not None else None
    return predict(model, waveforms, features, mask)


def streams_from_cache(table: TrackTable, spec: ModelSpec) -> bool:
    """Audio read from a prepared cache rather than held in `table.waveforms`."""
    return spec.use_audio and table.waveforms is None and table.cached is not None


def _clips(
    table: TrackTable, spec: ModelSpec, rows: Rows, crop_samples: int, random_crop: bool
) -> CachedClips:
    assert table.cached is not None
    cached = table.cached
    hide = not spec.use_features  # the audio-only variant, as _inputs does in memory
    return CachedClips(cached.directory, cached, rows, crop_samples, random_crop, hide)


def _member_path(path: Path | None, member: int, members: int) -> Path | None:
    # One checkpoint per seed of an ensemble.
    if path is None or members == 1:
        return path
    return path.with_name(f"{path.stem}.member{member}{path.suffix}")


def choose_inner(
    table: TrackTable,
    spec: ModelSpec,
    rows: Rows,
    seed: int,
    sample_rate: int,
    device: str,
    stream: Stream = STREAM,
) -> tuple[dict[float, float], float]:
    """From an inner grouped CV on `rows` (training folds only): the decision cut per
    threshold and the trees' share of the ensemble (see ModelSpec.tree_weight_grid)."""
    if spec.inner_folds < 2:
        return {t: t for t in THRESHOLDS}, spec.trees
    inner = group_folds(table.groups[rows], spec.inner_folds, seed + 1)
    nets, trees = np.empty(len(rows)), np.zeros(len(rows))
    for test in inner:
        train_rows = rows[np.setdiff1d(np.arange(len(rows)), test)]
        model = fit_model(table, spec, train_rows, seed, sample_rate, device, stream=stream)
        nets[test], trees[test] = _split_predictions(model, table, spec, rows[test], stream)
    target = table.popularity[rows]
    weight = spec.trees
    if spec.trees > 0 and spec.tree_weight_grid:

        def inner_mae(w: float) -> tuple[float, float]:
            return float(np.abs((1 - w) * nets + w * trees - target).mean()), abs(w - spec.trees)

        weight = min(spec.tree_weight_grid, key=inner_mae)
    prediction = (1 - weight) * nets + weight * trees
    return {t: best_cut(target, prediction, t) for t in THRESHOLDS}, weight


def _split_predictions(
    model: torch.nn.Module, table: TrackTable, spec: ModelSpec, rows: Rows, stream: Stream = STREAM
) -> tuple[np.ndarray, np.ndarray]:
    """(the nets' mean popularity, the trees' popularity) of a model with trees; (all of
    it, 0) of one without, so that `(1 - w) * nets + w * trees` re-blends it at any w."""
    if spec.trees <= 0 or not isinstance(model, Ensemble):
        return predict_rows(model, table, spec, rows, stream), np.zeros(len(rows))
    *nets, trees = model.members
    net_mean = np.mean([predict_rows(net, table, spec, rows, stream) for net in nets], axis=0)
    return net_mean, predict_rows(trees, table, spec, rows, stream)


@dataclass
class FoldResult:
    prediction: np.ndarray  # OOF popularity per row of the table
    hit_probability: np.ndarray  # OOF sigmoid(hit logit) per row
    cuts: dict[float, np.ndarray]  # per-row decision cut (that row's fold's cut)
    fold_cuts: list[dict[str, float]]
    histories: list[list[float]] = field(default_factory=list)  # each outer fit's nets' losses


def oof_predictions(
    table: TrackTable,
    spec: ModelSpec,
    folds: Sequence[Rows],
    seed: int,
    sample_rate: int,
    device: str = "cpu",
    progress: bool = True,
    stream: Stream = STREAM,
) -> FoldResult:
    """Out-of-fold predictions of `spec`, plus each fold's decision cuts."""
    n = len(table.popularity)
    result = FoldResult(
        np.full(n, np.nan), np.full(n, np.nan), {t: np.full(n, t) for t in THRESHOLDS}, []
    )
    for test in tqdm(folds, desc=spec.name, unit="fold", disable=not progress):
        train_rows = np.setdiff1d(np.arange(n), test)
        cuts, tree_weight = choose_inner(table, spec, train_rows, seed, sample_rate, device, stream)
        model = fit_model(
            table,
            spec,
            train_rows,
            seed,
            sample_rate,
            device,
            tree_weight,
            result.histories,
            stream,
        )
        result.prediction[test], result.hit_probability[test] = predict_both(
            model, table, spec, test, stream
        )
        for t, cut in cuts.items():
            result.cuts[t][test] = cut
        chosen = {f"{t:g}": round(c, 3) for t, c in cuts.items()}
        if spec.trees > 0:
            chosen["tree_weight"] = tree_weight
        result.fold_cuts.append(chosen)
    return result


# --- the report -----------------------------------------------------------------------------


def _describe(
    spec: ModelSpec, result: FoldResult, target: np.ndarray, folds: Sequence[Rows]
) -> dict[str, Any]:
    return {
        "variant": spec.name,
        "uses_audio": spec.use_audio,
        "uses_features": spec.use_features,
        "members": spec.members,
        "net": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.net.items()},
        "train": asdict(spec.config),
        "decision": (
            f"predicted popularity >= a cut per threshold, chosen by {spec.inner_folds}-fold "
            "inner grouped CV on the training folds (maximising macro-F1)"
            if spec.inner_folds > 1
            else "predicted popularity >= the threshold"
        ),
        "scores": (
            "roc_auc ranks predicted popularity (as for every baseline); roc_auc_hit_head "
            f"ranks the hit head (trained on popularity >= {spec.config.hit_threshold:g})"
        ),
        "blend": (
            "no trees"
            if spec.trees <= 0
            else f"boosted trees' share chosen per fold from {list(spec.tree_weight_grid)} by "
            "the inner CV's MAE (fold_cuts.tree_weight)"
            if spec.tree_weight_grid and spec.inner_folds > 1
            else f"boosted trees' share fixed at {spec.trees:g}"
        ),
        "fold_cuts": result.fold_cuts,
        "metrics": metrics(
            target,
            result.prediction,
            result.cuts,
            result.hit_probability,
            spec.config.hit_threshold,
            folds,
        ),
    }


@dataclass
class Outcome:
    """What the report is computed from: the first spec's OOF result and every baseline's."""

    model: FoldResult
    baselines: dict[str, Baseline]


def cross_validate(
    table: TrackTable,
    specs: Sequence[ModelSpec],
    folds: Sequence[Rows],
    seed: int,
    sample_rate: int = 22050,
    device: str = "cpu",
    progress: bool = True,
    resamples: int = 2000,
    stream: Stream = STREAM,
) -> tuple[dict[str, Any], Outcome]:
    """The report dict, and the OOF predictions of the first spec (the model the report is
    about) and of the baselines."""
    started = time.perf_counter()
    target = table.popularity.astype(np.float64)
    models, results = {}, []
    for spec in specs:
        results.append(
            oof_predictions(table, spec, folds, seed, sample_rate, device, progress, stream)
        )
        models[spec.name] = _describe(spec, results[-1], target, folds)
    outcome = Outcome(results[0], baseline_predictions(table, folds, seed, specs[0].inner_folds))
    report = {
        "data": {
            "source": table.source,
            "rows": len(target),
            "groups": len(np.unique(table.groups)),
            "features": list(table.feature_paths),
            "target": "popularity (0-100)",
        },
        "split": split_description(table, folds, seed),
        "thresholds": list(THRESHOLDS),
        "model": specs[0].name,
        "models": models,
        "baselines": {
            name: {
                "decision": "predicted popularity >= a cut chosen by the model's inner CV"
                if name in CUT_BY_INNER_CV and specs[0].inner_folds > 1
                else "predicted popularity >= the threshold",
                "metrics": metrics(target, b.prediction, b.cuts, folds=folds),
            }
            for name, b in outcome.baselines.items()
        },
        "intervals": _intervals(table, outcome, resamples, seed),
        "device": device,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    return report, outcome


def _intervals(table: TrackTable, outcome: Outcome, resamples: int, seed: int) -> dict[str, Any]:
    """Artist-bootstrap intervals of the model, ridge, the blend and the mean predictor, and
    of model - ridge and model - blend."""
    scored = {"model": Scored(outcome.model.prediction, outcome.model.cuts[70.0])} | {
        name: Scored(outcome.baselines[name].prediction, outcome.baselines[name].cuts[70.0])
        for name in ("ridge", "blend", "mean")
    }
    pairs = [("model", "ridge"), ("model", "blend")]
    return artist_bootstrap(
        table.popularity, table.groups, scored, pairs, resamples=resamples, seed=seed
    )


def split_description(table: TrackTable, folds: Sequence[Rows], seed: int) -> dict[str, Any]:
    fold_groups = [set(table.groups[f]) for f in folds]
    shared = sum(len(a & b) for i, a in enumerate(fold_groups) for b in fold_groups[i + 1 :])
    return {
        "method": "k-fold grouped by artist (whole artists per fold, sizes balanced)",
        "group_key": "artist",
        "folds": len(folds),
        "seed": seed,
        "fold_rows": [len(f) for f in folds],
        "artists_in_two_folds": shared,
    }
