"""Gradient-boosted trees as a TorchScript module: a tree member for the features-only Ensemble.

    trees = fit_trees(feature_paths, features, popularity, hit_threshold=70.0, seed=0)
    popularity, hit_logit = trees(waveform, features, audio_mask)    # audio is ignored

On two thousand tabular rows, trees and an MLP make different mistakes, and averaging them
beats either alone (docs/MODEL.md). The trees are fitted with scikit-learn, a *training-time*
dependency only (`pip install popscore[train]`, imported lazily here); the fitted splits and
leaf values are copied into buffers, so the exported artifact runs them in plain torch ops.

Two boosted ensembles: a regressor for popularity and a classifier whose log-odds is the hit
logit (`popularity >= hit_threshold`). Both read the output of a `FeatureNormalizer` (log1p
counts, standardised, NaN -> the training mean, plus missing flags), so serving sees exactly
the inputs they were fitted on; trees do not care about the monotone rescaling.
"""

# No `from __future__ import annotations`: TorchScript resolves the buffer annotations.
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from popscore.training.model import FeatureNormalizer

# Chosen by looking at out-of-fold scores on seed 0's artist-grouped outer folds of the paper
# data (docs/MODEL.md): coarse and not nested; other fold seeds test it afresh.
REGRESSOR_PARAMS: dict[str, Any] = {
    "loss": "huber",
    "n_estimators": 300,
    "learning_rate": 0.03,
    "max_depth": 3,
    "subsample": 0.8,
    "min_samples_leaf": 20,
}
CLASSIFIER_PARAMS: dict[str, Any] = {
    "n_estimators": 200,
    "learning_rate": 0.03,
    "max_depth": 3,
    "subsample": 0.8,
    "min_samples_leaf": 20,
}


def _round_down(threshold: np.ndarray) -> np.ndarray:
    """float64 thresholds -> the largest float32 at or below each: sklearn sends x <= t left,
    and for a float32 x that holds exactly when x <= round_down(t) (plain rounding can land
    on the next float32 up and flip the split for a value just above t)."""
    low = threshold.astype(np.float32)
    up = low.astype(np.float64) > threshold
    return np.where(up, np.nextafter(low, np.float32(-np.inf)), low).astype(np.float32)


class BoostedTrees(nn.Module):
    """Sum of binary trees over x [B, D]: init + Σ leaf value, all trees walked in parallel.

    Node arrays are [T, N] (T trees, N = most nodes in any tree); a leaf points to itself, so
    walking `depth` steps from the root lands every item on its leaf in every tree.
    """

    feature: torch.Tensor
    threshold: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    value: torch.Tensor
    init: torch.Tensor

    def __init__(self, trees: Sequence[Any], init: float, scale: float) -> None:
        """`trees`: fitted sklearn `Tree` objects (`estimator.tree_`); leaf values x `scale`."""
        super().__init__()
        if not trees:
            raise ValueError("at least one tree is needed")
        n_nodes = max(int(t.node_count) for t in trees)
        shape = (len(trees), n_nodes)
        feature = np.zeros(shape, dtype=np.int64)
        threshold = np.zeros(shape, dtype=np.float32)
        left = np.tile(np.arange(n_nodes), (len(trees), 1))
        right = left.copy()
        value = np.zeros(shape, dtype=np.float32)
        depth = 0
        for i, tree in enumerate(trees):
            k = int(tree.node_count)
            split = tree.children_left[:k] >= 0
            nodes = np.arange(k)
            feature[i, :k] = np.where(split, tree.feature[:k], 0)
            threshold[i, :k] = _round_down(tree.threshold[:k])
            left[i, :k] = np.where(split, tree.children_left[:k], nodes)
            right[i, :k] = np.where(split, tree.children_right[:k], nodes)
            value[i, :k] = tree.value[:k].reshape(k, -1)[:, 0] * scale
            depth = max(depth, int(tree.max_depth))
        self.depth = depth
        self.register_buffer("feature", torch.from_numpy(feature))
        self.register_buffer("threshold", torch.from_numpy(threshold))
        self.register_buffer("left", torch.from_numpy(left))
        self.register_buffer("right", torch.from_numpy(right))
        self.register_buffer("value", torch.from_numpy(value))
        self.register_buffer("init", torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        n_trees = self.feature.size(0)
        node = torch.zeros(batch, n_trees, dtype=torch.long, device=x.device)
        for _ in range(self.depth):
            # Per item and tree: the feature, threshold and children of the current node.
            feat = self.feature.gather(1, node.t()).t()
            go_left = x.gather(1, feat) <= self.threshold.gather(1, node.t()).t()
            node = torch.where(
                go_left, self.left.gather(1, node.t()).t(), self.right.gather(1, node.t()).t()
            )
        return self.init + self.value.gather(1, node.t()).t().sum(dim=1)


class TreeModel(nn.Module):
    """forward(waveform, features, audio_mask) -> (popularity, hit_logit), features only.

    Same signature and attributes as FusionNet (`feature_paths`, `sample_rate`), so it can be
    an `Ensemble` member and exports into the same artifact.
    """

    def __init__(
        self,
        feature_paths: Sequence[str],
        normalizer: FeatureNormalizer,
        regressor: BoostedTrees,
        classifier: BoostedTrees,
        sample_rate: int = 22050,
    ) -> None:
        super().__init__()
        self.feature_paths = list(feature_paths)
        self.sample_rate = sample_rate
        self.use_audio = False
        self.normalizer = normalizer
        self.regressor = regressor
        self.classifier = classifier

    def forward(
        self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 2 or features.size(1) != self.normalizer.num_features:
            raise ValueError("features has the wrong number of columns for this model")
        x = self.normalizer(features)
        return self.regressor(x).clamp(0.0, 100.0), self.classifier(x)

    # The two-call form of forward() that FusionNet and Ensemble export (no audio here).
    @torch.jit.export
    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        return waveform.new_zeros(waveform.size(0), 0)

    @torch.jit.export
    def score_spectrogram(
        self, logmel: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(logmel, features, audio_mask)


def fit_trees(
    feature_paths: Sequence[str],
    features: np.ndarray,
    popularity: np.ndarray,
    hit_threshold: float = 70.0,
    seed: int = 0,
    sample_rate: int = 22050,
) -> TreeModel:
    """Fit both boosted ensembles on these rows (needs scikit-learn: `popscore[train]`)."""
    try:
        from sklearn.ensemble import (  # noqa: PLC0415 (optional, training-time only)
            GradientBoostingClassifier,
            GradientBoostingRegressor,
        )
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tree member needs scikit-learn at training time: pip install 'popscore[train]'"
        ) from exc
    normalizer = FeatureNormalizer(feature_paths)
    normalizer.fit(features)
    normalizer.eval()
    with torch.no_grad():
        x = normalizer(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy()
    target = np.asarray(popularity, dtype=np.float64)
    reg = GradientBoostingRegressor(**REGRESSOR_PARAMS, random_state=seed).fit(x, target)
    is_hit = target >= hit_threshold
    cls = None
    if is_hit.all() or not is_hit.any():
        # One class only: a constant log-odds, no trees to walk.
        logit = 8.0 if is_hit.all() else -8.0
        classifier = BoostedTrees([reg.estimators_[0, 0].tree_], logit, 0.0)
    else:
        cls = GradientBoostingClassifier(**CLASSIFIER_PARAMS, random_state=seed).fit(x, is_hit)
        prior = float(cls.init_.class_prior_[1])
        classifier = BoostedTrees(
            [e.tree_ for e in cls.estimators_[:, 0]],
            np.log(prior / (1.0 - prior)),
            cls.learning_rate,
        )
    regressor = BoostedTrees(
        [e.tree_ for e in reg.estimators_[:, 0]],
        float(np.ravel(reg.init_.predict(x[:1]))[0]),
        reg.learning_rate,
    )
    model = TreeModel(feature_paths, normalizer, regressor, classifier, sample_rate)
    # Check the copy against sklearn on the training rows: a mismatch is a bug, not noise.
    with torch.no_grad():
        pop, logit = model(torch.zeros(len(x), 1), torch.as_tensor(features, dtype=torch.float32),
                           torch.zeros(len(x), dtype=torch.bool))  # fmt: skip
    same = np.allclose(pop.numpy(), np.clip(reg.predict(x), 0.0, 100.0), atol=1e-3)
    if cls is not None:
        same = same and np.allclose(logit.numpy(), cls.decision_function(x), atol=1e-4)
    if not same:
        raise RuntimeError("boosted-tree copy disagrees with scikit-learn")
    return model.eval()
