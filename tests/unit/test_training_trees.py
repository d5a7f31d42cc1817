"""The features-only model's parts: piecewise-linear encoding, the boosted-tree member copied
into torch (needs the optional scikit-learn, `popscore[train]`), and the weighted Ensemble."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from popscore.artifact import load
from popscore.artifact.frontend import LogMel
from popscore.training.data import PAPER_FEATURES
from popscore.training.model import Ensemble, FeatureNormalizer, FusionNet
from tests.unit.artifact_helpers import export

F = len(PAPER_FEATURES)


def _rows(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, F)).astype(np.float32)
    features[:, 1] = rng.integers(1_000, 10**8, n)  # followers: a count, log1p'd
    features[:, 3] = 4.0  # a constant column
    features[rng.random((n, F)) < 0.05] = np.nan
    popularity = np.clip(65 + 12 * np.nan_to_num(features[:, 0]) + rng.normal(0, 5, n), 0, 100)
    return features, popularity.astype(np.float32)


def test_piecewise_linear_encoding() -> None:
    features, _ = _rows()
    norm = FeatureNormalizer(PAPER_FEATURES, n_bins=4)
    norm.fit(features)
    out = norm(torch.from_numpy(features))
    assert out.shape == (len(features), 6 * F) and norm.out_features == 6 * F
    ramps = out[:, 2 * F :]
    assert torch.isfinite(out).all() and (ramps >= 0).all() and (ramps <= 1).all()
    # Per feature the ramps are monotone in the value: sorted rows give non-decreasing ramps.
    present = np.flatnonzero(np.isfinite(features[:, 0]))
    order = torch.from_numpy(present[np.argsort(features[present, 0])])
    ordered = ramps.view(len(features), F, 4)[order, 0]
    assert (ordered.diff(dim=0) >= -1e-6).all()
    with pytest.raises(ValueError, match="n_bins"):
        FeatureNormalizer(PAPER_FEATURES, n_bins=1)


def test_plain_normalizer_output_is_unchanged_without_bins() -> None:
    norm = FeatureNormalizer(PAPER_FEATURES)
    assert norm.out_features == 2 * F


@pytest.fixture(scope="module")
def trees() -> torch.nn.Module:
    pytest.importorskip("sklearn")
    from popscore.training.trees import fit_trees

    features, popularity = _rows()
    return fit_trees(PAPER_FEATURES, features, popularity, hit_threshold=70.0, seed=0)


def test_trees_artifact_matches_eager_and_scores_missing_values(
    trees: torch.nn.Module, tmp_path: Path
) -> None:
    features, _ = _rows(n=7, seed=3)
    scripted = load(export(trees, tmp_path / "t.pt", "trees-test", 1.0)).module
    inputs = (torch.zeros(7, 10), torch.from_numpy(features), torch.zeros(7, dtype=torch.bool))
    with torch.inference_mode():
        eager, saved = trees(*inputs), scripted(*inputs)
        items = [trees(*(x[i : i + 1] for x in inputs)) for i in range(7)]
        pop, logit = scripted(inputs[0], inputs[1] * math.nan, inputs[2])
    for k in range(2):
        torch.testing.assert_close(eager[k], saved[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(eager[k], torch.cat([x[k] for x in items]), atol=1e-5, rtol=0)
    assert torch.isfinite(pop).all() and torch.isfinite(logit).all()
    assert ((eager[0] >= 0) & (eager[0] <= 100)).all()


def test_trees_match_scikit_learn(trees: torch.nn.Module) -> None:
    # fit_trees checks its copy on the training rows; here on rows it never saw.
    features, popularity = _rows()
    fresh, _ = _rows(n=40, seed=5)
    from sklearn.ensemble import GradientBoostingRegressor

    from popscore.training.trees import REGRESSOR_PARAMS

    norm = FeatureNormalizer(PAPER_FEATURES)
    norm.fit(features)
    with torch.no_grad():
        x = norm(torch.from_numpy(features)).numpy()
        x_fresh = norm(torch.from_numpy(fresh)).numpy()
    reg = GradientBoostingRegressor(**REGRESSOR_PARAMS, random_state=0).fit(x, popularity)
    with torch.inference_mode():
        pop, _ = trees(torch.zeros(40, 1), torch.from_numpy(fresh), torch.zeros(40, dtype=bool))
    np.testing.assert_allclose(pop.numpy(), np.clip(reg.predict(x_fresh), 0, 100), atol=1e-3)


def test_ensemble_weights_are_a_weighted_mean(trees: torch.nn.Module) -> None:
    features, _ = _rows()
    torch.manual_seed(0)
    net = FusionNet(PAPER_FEATURES, use_audio=False, channels=(4, 8), audio_dim=8,
                    feature_dim=8, hidden=8, n_bins=4).eval()  # fmt: skip
    net.fit_normalizer(features)
    ensemble = Ensemble([net, trees], [3.0, 1.0]).eval()
    inputs = (torch.zeros(5, 10), torch.from_numpy(features[:5]), torch.zeros(5, dtype=bool))
    with torch.inference_mode():
        (p1, l1), (p2, l2), (p, logit) = net(*inputs), trees(*inputs), ensemble(*inputs)
    torch.testing.assert_close(p, 0.75 * p1 + 0.25 * p2)
    torch.testing.assert_close(logit, 0.75 * l1 + 0.25 * l2)
    with pytest.raises(ValueError, match="weight"):
        Ensemble([net, trees], [1.0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_two_call_form_equals_forward_for_every_member_kind(trees: torch.nn.Module) -> None:
    """spectrogram() then score_spectrogram() is forward(), eager and scripted, for an audio
    net, a features-only net, trees, and an ensemble of all three (one shared frontend)."""
    features, _ = _rows()
    torch.manual_seed(0)
    small = {"channels": (4, 8), "audio_dim": 8, "feature_dim": 8, "hidden": 8}
    listening = FusionNet(PAPER_FEATURES, sample_rate=8000, n_mels=16, **small).eval()
    tabular = FusionNet(PAPER_FEATURES, sample_rate=8000, n_mels=16, use_audio=False, **small)
    for net in (listening, tabular):
        net.fit_normalizer(features)
    trees.sample_rate = 8000
    ensemble = Ensemble([listening, tabular.eval(), trees], [2.0, 1.0, 1.0]).eval()
    wave = 0.2 * torch.randn(4, 8000)
    inputs = (torch.from_numpy(features[:4]), torch.tensor([True, False, True, True]))
    for model in (listening, tabular, trees, ensemble):
        for runnable in (model, torch.jit.script(model)):
            with torch.inference_mode():
                expected = runnable(wave, *inputs)
                staged = runnable.score_spectrogram(runnable.spectrogram(wave), *inputs)
            torch.testing.assert_close(staged, expected, atol=1e-5, rtol=1e-5)
    assert ensemble.spectrogram(wave).shape[:3] == (4, 1, 16)
    assert tabular.spectrogram(wave).shape == (4, 0)


def test_ensemble_rejects_members_with_different_frontends() -> None:
    small = {"channels": (4, 8), "audio_dim": 8, "feature_dim": 8, "hidden": 8}
    a = FusionNet(PAPER_FEATURES, n_mels=16, **small)
    b = FusionNet(PAPER_FEATURES, n_mels=32, **small)
    with pytest.raises(ValueError, match="frontend"):
        Ensemble([a, b])
    # Same buffers' shapes and values would not catch a setting such as the hop length.
    c = FusionNet(PAPER_FEATURES, n_mels=16, **small)
    c.frontend = LogMel(n_mels=16, hop_length=256)
    with pytest.raises(ValueError, match="frontend"):
        Ensemble([FusionNet(PAPER_FEATURES, n_mels=16, **small), c])
