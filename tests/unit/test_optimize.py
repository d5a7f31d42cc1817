"""Unit tests of serving an artifact optimised for CPU inference (``optimize_for_cpu``,
``Scorer(optimize=...)``, POPSCORE_CPU_OPTIMIZE): it scores like the original, and when torch
cannot rewrite a module or the rewrite scores differently, the original is served."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from consumer.app import load_scorer
from consumer.device import Scorer
from consumer.settings import Settings
from popscore.artifact import Artifact, load, optimize_for_cpu
from popscore.artifact import optimize as optimize_module
from popscore.artifact.features import DEFAULT_FEATURES
from popscore.artifact.optimize import compare
from popscore.training.model import Ensemble, FusionNet
from tests.unit.artifact_helpers import export
from tests.unit.conftest import CLIP, RATE
from tests.unit.test_device import inputs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.*


def test_the_optimised_module_scores_like_the_original(artifact: Path) -> None:
    fast, plain = Scorer(artifact, "cpu"), Scorer(artifact, "cpu", optimize=False)
    assert fast.optimized and not plain.optimized
    graph = str(fast.module.score_spectrogram.graph)  # type: ignore[attr-defined]
    assert "fused_bn" in graph and "mkldnn" in graph  # folded, and run by oneDNN
    waves, feats, mask = inputs(5)
    mask[1] = False  # a row without audio
    feats[2] = np.nan  # a row with every feature missing
    a, b = fast.score(waves, feats, mask), plain.score(waves, feats, mask)
    tol = optimize_module.TOLERANCES
    np.testing.assert_allclose(a.popularity, b.popularity, atol=tol["popularity"])
    np.testing.assert_allclose(a.hit_probability, b.hit_probability, atol=tol["hit_probability"])
    assert a.frontend_s is not None  # still timed apart: both methods were kept


def test_forward_and_the_two_calls_are_kept_and_agree(artifact: Path) -> None:
    fast = optimize_for_cpu(load(artifact))
    assert fast is not None and fast.staged is not None
    waves, feats, mask = (torch.from_numpy(a) for a in inputs(3))
    with torch.inference_mode():
        whole, _ = fast.module(waves, feats, mask)
        staged, _ = fast.staged.score_spectrogram(fast.staged.spectrogram(waves), feats, mask)
    torch.testing.assert_close(whole, staged, atol=1e-4, rtol=0)


def test_a_features_only_artifact_is_optimised_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FusionNet(use_audio=False, sample_rate=RATE, feature_dim=8, hidden=8)
    net.fit_normalizer(np.random.default_rng(0).random((32, len(DEFAULT_FEATURES))) * 100)
    path = export(net.eval(), tmp_path / "fo.pt", "fo", CLIP)
    fast, plain = Scorer(path, "cpu"), Scorer(path, "cpu", optimize=False)
    assert fast.optimized
    _, feats, _ = inputs(3)
    rows = (np.zeros((3, 1), np.float32), feats, np.zeros(3, dtype=bool))
    np.testing.assert_allclose(
        fast.score(*rows).popularity, plain.score(*rows).popularity, atol=1e-4
    )


def test_an_ensemble_is_optimised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    members = []
    for _ in range(2):
        net = FusionNet(sample_rate=RATE, channels=(4, 8), audio_dim=8, feature_dim=8, hidden=8)
        net.fit_normalizer(np.random.default_rng(0).random((32, len(DEFAULT_FEATURES))) * 100)
        members.append(net.eval())
    path = export(Ensemble(members).eval(), tmp_path / "ens.pt", "ens", CLIP)
    fast, plain = Scorer(path, "cpu"), Scorer(path, "cpu", optimize=False)
    assert fast.optimized
    batch = inputs(3)
    np.testing.assert_allclose(
        fast.score(*batch).popularity, plain.score(*batch).popularity, atol=1e-3
    )


def test_a_module_torch_cannot_rewrite_is_served_as_saved(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unsupported node kind\nmore detail")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", refuse)
    with caplog.at_level(logging.WARNING):
        scorer = Scorer(artifact, "cpu")
    assert not scorer.optimized
    assert "kept unoptimised: torch could not optimise it (unsupported node kind)" in caplog.text
    assert np.isfinite(scorer.score(*inputs(2)).popularity).all()


def test_a_rewrite_that_scores_differently_is_refused(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tolerances no real difference can meet: the gate, not torch, decides.
    monkeypatch.setitem(optimize_module.TOLERANCES, "popularity", -1.0)
    with caplog.at_level(logging.WARNING):
        assert optimize_for_cpu(load(artifact)) is None
    assert "scores differently" in caplog.text


def test_the_setting_turns_it_off(artifact: Path) -> None:
    on = load_scorer(Settings(model=artifact, device="cpu"))
    off = load_scorer(Settings(model=artifact, device="cpu", cpu_optimize=False))
    assert on.optimized and on.optimize
    assert not off.optimized and not off.optimize


class WrongWithoutAudio:
    """A candidate that scores like the original except on rows without audio: what a rewrite
    breaking only the feature path would do."""

    def __init__(self, original: Artifact) -> None:
        self.original = original

    def __call__(self, waves: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> Any:
        return self._skew(*self.original.module(waves, feats, mask), mask)

    def spectrogram(self, waves: torch.Tensor) -> torch.Tensor:
        assert self.original.staged is not None
        return self.original.staged.spectrogram(waves)

    def score_spectrogram(
        self, logmel: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor
    ) -> Any:
        assert self.original.staged is not None
        return self._skew(*self.original.staged.score_spectrogram(logmel, feats, mask), mask)

    @staticmethod
    def _skew(pop: torch.Tensor, logit: torch.Tensor, mask: torch.Tensor) -> Any:
        off = (~mask).float()
        return (pop - 30 * off).clamp(0, 100), logit + 4 * off


def test_the_probe_catches_a_rewrite_wrong_only_without_audio(artifact: Path) -> None:
    original = load(artifact)
    assert compare(original, original.module).holds
    parity = compare(original, WrongWithoutAudio(original))  # type: ignore[arg-type]
    assert not parity.holds
    assert parity.hit_logit == pytest.approx(4, abs=1e-3)
    assert parity.popularity > 1  # a row without audio scores mid-range, not at the clamp


def test_a_probe_the_saved_module_fails_is_named(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("the artifact's own forward failed")

    monkeypatch.setattr(optimize_module, "compare", broken)
    with caplog.at_level(logging.WARNING):
        assert optimize_for_cpu(load(artifact)) is None
    assert "scoring the probe failed (the artifact's own forward failed)" in caplog.text


def test_the_model_info_says_whether_the_model_is_optimised(artifact: Path) -> None:
    from consumer.app import model_labels

    assert model_labels(Scorer(artifact, "cpu"))[-1] == "true"
    assert model_labels(Scorer(artifact, "cpu", optimize=False))[-1] == "false"
