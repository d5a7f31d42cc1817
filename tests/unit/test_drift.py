"""Drift: the artifact's training reference (its bins, its JSON) and the service's sliding
window of the latest scored events against it (consumer.drift)."""

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from consumer.audio import AudioPolicy
from consumer.device import Scorer
from consumer.drift import DriftMonitor, population_stability
from consumer.errors import ConfigError
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.settings import load_settings
from popscore.artifact import (
    DEFAULT_FEATURES,
    ArtifactError,
    ArtifactMeta,
    Bins,
    FeatureReference,
    Reference,
    load,
)
from popscore.training.model import FusionNet
from schemas import ReleaseEvent, ScoreRecord
from tests.unit.artifact_helpers import export
from tests.unit.conftest import CLIP, RATE

GAUGES = (
    "popscore_feature_missing_ratio",
    "popscore_feature_missing_ratio_reference",
    "popscore_feature_psi",
    "popscore_score_psi",
)


def samples(metrics: Metrics, name: str) -> dict[str, float]:
    """The gauge's samples by their one label's value."""
    [family] = [f for f in metrics.registry.collect() if f.name == name]
    return {next(iter(s.labels.values())): s.value for s in family.samples}


def two_bins(a: float = 0.5) -> Bins:
    return Bins((0.5,), (a, 1 - a))


def reference(missing: float = 0.0) -> Reference:
    """Two features, both 0/1 flags, and a score cut at 50."""
    features = {"x": FeatureReference(missing, two_bins()), "y": FeatureReference(0.0, None)}
    return Reference(100, features, Bins((50.0,), (0.5, 0.5)), 100)


# --- the reference ----------------------------------------------------------------------


def test_few_values_are_categories_and_many_are_deciles() -> None:
    flags = Bins.fit(np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype=np.float32))
    assert flags == Bins((0.5,), (0.25, 0.75))
    assert Bins.fit(np.full(5, 3.0)) == Bins((), (1.0,))
    assert Bins.fit(np.array([])) is None
    spread = Bins.fit(np.random.default_rng(0).normal(size=10_000))
    assert spread is not None and len(spread.shares) == 10
    np.testing.assert_allclose(spread.shares, 0.1, atol=0.002)


def test_ties_leave_no_empty_bin() -> None:
    """A mass at 0 (instrumentalness) and one at the maximum: no reference bin is empty."""
    rng = np.random.default_rng(1)
    values = np.concatenate([np.zeros(600), rng.random(300), np.ones(200)])
    bins = Bins.fit(values)
    assert bins is not None and min(bins.shares) > 0
    counts = np.bincount(bins.bin_of(values), minlength=len(bins.shares))
    np.testing.assert_allclose(counts / counts.sum(), bins.shares, atol=1e-6)


def test_build_counts_missing_rates_and_clips_the_score() -> None:
    features = np.array([[1.0, np.nan], [np.nan, np.nan], [3.0, np.nan], [4.0, np.nan]])
    built = Reference.build(("a", "b"), features, np.array([-5.0, 50.0, 120.0]))
    assert built.features["a"].missing_rate == 0.25 and built.features["a"].bins is not None
    assert built.features["b"] == FeatureReference(1.0, None)
    assert built.score.edges == (25.0, 75.0) and built.score_rows == 3
    with pytest.raises(ValueError, match="matrix"):
        Reference.build(("a",), features, np.zeros(3))


def test_the_reference_round_trips_in_the_metadata() -> None:
    built = Reference.build(
        DEFAULT_FEATURES[:3], np.random.default_rng(2).random((50, 3)), np.arange(50.0)
    )
    meta = ArtifactMeta(
        model_version="m", sample_rate=RATE, clip_seconds=CLIP, features=DEFAULT_FEATURES[:3],
        reference=built,
    )  # fmt: skip
    again = ArtifactMeta.from_json(meta.to_json())
    assert again == meta and again.reference == built
    assert meta.to_dict()["reference"]["score"]["in_sample"] is True
    assert ArtifactMeta.from_dict({**meta.to_dict(), "reference": None}).reference is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": {}}, "features are not the artifact's"),
        ({"score": {"rows": 1, "edges": [2, 1], "shares": [0.2, 0.3, 0.5]}}, "increasing"),
        ({"score": {"rows": 1, "edges": [1], "shares": [1.0]}}, "need 2 shares"),
        ({"rows": None}, "reference"),
    ],
)
def test_a_malformed_reference_is_one_artifact_error(
    change: dict[str, object], message: str
) -> None:
    built = Reference.build(("a",), np.arange(20.0)[:, None], np.arange(20.0))
    raw = {"model_version": "m", "sample_rate": RATE, "clip_seconds": CLIP, "features": ["a"],
           "hit_threshold": 70.0, "reference": {**built.to_dict(), **change}}  # fmt: skip
    with pytest.raises(ArtifactError, match=message):
        ArtifactMeta.from_dict(raw)


@pytest.mark.parametrize("name", ["demo.pt", "paper-features.pt"])
def test_the_shipped_models_carry_a_reference(name: str) -> None:
    meta = load(Path(__file__).resolve().parents[2] / "models" / name).meta
    assert meta.reference is not None and list(meta.reference.features) == list(meta.features)
    assert len(meta.to_json()) < 20_000, "the reference keeps the metadata small"


# --- the monitor ------------------------------------------------------------------------


def test_psi_is_the_textbook_sum() -> None:
    monitor = DriftMonitor(reference(), Metrics(), window=8, min_events=4)
    x = np.array([0, 0, 0, 1, 0, 0, 0, 1], dtype=np.float32)
    monitor.observe(np.column_stack([x, x]), np.array([10.0] * 4 + [90.0] * 4))
    by_hand = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert samples(monitor.metrics, "popscore_feature_psi") == pytest.approx({"x": by_hand})
    assert samples(monitor.metrics, "popscore_score_psi") == {"popularity": 0.0}


def test_an_empty_bin_counts_with_the_epsilon() -> None:
    [psi] = population_stability(np.array([[10, 0]]), np.array([[0.5, 0.5]]))
    assert psi == pytest.approx(0.5 * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))
    assert population_stability(np.array([[0, 0]]), np.array([[0.5, 0.5]]))[0] == 0.0


def test_the_window_forgets_the_oldest_events() -> None:
    monitor = DriftMonitor(reference(), Metrics(), window=4, min_events=4)
    ones, zeros = np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)
    monitor.observe(zeros, np.full(3, 10.0))
    monitor.observe(ones, np.full(3, 90.0))  # evicts two of the zeros
    assert monitor.held == 4 and monitor.counts()[0, :2].tolist() == [1, 3]
    monitor.observe(np.zeros((9, 2), np.float32), np.full(9, 10.0))  # more than the window
    assert monitor.counts()[0, :2].tolist() == [4, 0] and monitor.counts()[2, :2].tolist() == [4, 0]
    assert monitor.counts().sum() == 4 * 3, "each event once per column"


def test_missing_values_count_apart_from_the_bins() -> None:
    monitor = DriftMonitor(reference(missing=0.1), Metrics(), window=10, min_events=4)
    x = np.array([np.nan, np.nan, 0, 1, 0, 1], dtype=np.float32)
    monitor.observe(np.column_stack([x, np.full(6, np.nan)]), np.full(6, 40.0))
    assert samples(monitor.metrics, "popscore_feature_missing_ratio") == pytest.approx(
        {"x": 2 / 6, "y": 1.0}
    )
    assert samples(monitor.metrics, "popscore_feature_missing_ratio_reference") == {
        "x": 0.1, "y": 0.0
    }  # fmt: skip
    # x: 4 present values, balanced as in training; y has no bins and is never present
    assert samples(monitor.metrics, "popscore_feature_psi") == {"x": 0.0}


def test_nothing_is_exported_before_the_minimum() -> None:
    monitor = DriftMonitor(reference(), Metrics(), window=10, min_events=5)
    x = np.array([0, 1, np.nan, np.nan], dtype=np.float32)
    monitor.observe(np.column_stack([x, x]), np.full(4, 40.0))
    for name in ("popscore_feature_missing_ratio", "popscore_feature_psi", "popscore_score_psi"):
        assert samples(monitor.metrics, name) == {}, name
    monitor.observe(np.zeros((1, 2), np.float32), np.full(1, 40.0))
    assert samples(monitor.metrics, "popscore_score_psi") != {}
    assert samples(monitor.metrics, "popscore_feature_psi") == {}, "x: 3 present values < 5"
    with pytest.raises(ValueError, match="min_events"):
        DriftMonitor(reference(), Metrics(), window=10, min_events=11)


def test_no_reference_means_no_drift_gauges(caplog: pytest.LogCaptureFixture) -> None:
    meta = ArtifactMeta(model_version="old", sample_rate=RATE, clip_seconds=CLIP, features=("x",))
    metrics = Metrics()
    with caplog.at_level(logging.INFO, "consumer.drift"):
        assert DriftMonitor.create(meta, metrics, 10, 5) is None
    assert "carries no drift reference" in caplog.text
    assert all(samples(metrics, name) == {} for name in GAUGES)


def test_the_pipeline_feeds_its_scored_events_to_the_monitor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FusionNet(use_audio=False, sample_rate=RATE, feature_dim=8, hidden=8)
    rows = np.random.default_rng(0).random((32, len(DEFAULT_FEATURES))) * 100
    net.fit_normalizer(rows)
    built = Reference.build(DEFAULT_FEATURES, rows, np.linspace(0, 100, 32))
    path = export(net.eval(), tmp_path / "fo.pt", "fo", CLIP, reference=built)
    metrics = Metrics()
    scorer = Scorer(path, "cpu")
    drift = DriftMonitor.create(scorer.meta, metrics, window=10, min_events=2)
    events = [
        ReleaseEvent.model_validate({"event_id": f"e{i}", "track_id": f"t{i}", "audio_uri": "x:",
                                     "emitted_at": datetime.now(UTC),
                                     "artist": {"followers": 10 * i}}, strict=False)
        for i in range(3)
    ]  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(scorer, AudioPolicy.create(()), pool, metrics, drift=drift)
        outcomes = pipeline.score_events(events)
    assert drift is not None and drift.held == 3
    assert all(isinstance(o, ScoreRecord) for o in outcomes)
    missing = samples(metrics, "popscore_feature_missing_ratio")
    assert missing["artist.followers"] == 0.0 and missing["artist.popularity"] == 1.0
    assert set(samples(metrics, "popscore_feature_psi")) == {"artist.followers"}


def test_the_window_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (load_settings().drift_window, load_settings().drift_min_events) == (2000, 200)
    monkeypatch.setenv("POPSCORE_DRIFT_WINDOW", "100")
    with pytest.raises(ConfigError, match=r"POPSCORE_DRIFT_MIN_EVENTS: .*WINDOW \(100\)"):
        load_settings()
    monkeypatch.setenv("POPSCORE_DRIFT_WINDOW", "0")
    with pytest.raises(ConfigError, match="POPSCORE_DRIFT_WINDOW"):
        load_settings()
