"""The artifact's one owner: the typed metadata, its JSON, and what load() makes of a file,
old artifacts (written before ``exports`` and ``uses_audio``) included."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from popscore.artifact import (
    DEFAULT_FEATURES,
    REQUIRED_KEYS,
    ArtifactError,
    ArtifactMeta,
    StagedScoringModule,
    TrainingSummary,
    load,
    resave,
)
from popscore.artifact.features import extract
from popscore.training.model import FusionNet
from tests.unit.artifact_helpers import export

RATE = 8_000
JIT_DEPRECATED = "ignore:`torch.jit.\\w+` is deprecated"  # scripted here, not through save()


def _meta(**changes: object) -> ArtifactMeta:
    training = TrainingSummary(
        data="d.csv", rows=10, seed=0, variant="fusion", details={"epochs": 3}
    )
    meta = ArtifactMeta(
        model_version="m-1",
        sample_rate=RATE,
        clip_seconds=2.0,
        features=("artist.followers", "release.year"),
        hit_label_threshold=70.0,
        uses_audio=True,
        exports=("forward", "spectrogram", "score_spectrogram"),
        training=training,
        extra={"torch_version": "2.11.0"},
    )
    return meta.replace(**changes)


def _net(use_audio: bool = True) -> FusionNet:
    torch.manual_seed(0)
    net = FusionNet(sample_rate=RATE, channels=(4, 8), audio_dim=8, feature_dim=8, hidden=8,
                    use_audio=use_audio)  # fmt: skip
    net.fit_normalizer(np.random.default_rng(0).random((16, len(DEFAULT_FEATURES))))
    return net.eval()


def test_meta_round_trips_through_json_keeping_unknown_keys() -> None:
    meta = _meta()
    text = meta.to_json()
    assert ArtifactMeta.from_json(text) == meta
    raw = json.loads(text)
    assert raw["torch_version"] == "2.11.0" and raw["training"]["epochs"] == 3
    assert set(REQUIRED_KEYS) <= set(raw)
    assert meta.clip_samples == 16_000


def test_meta_of_an_older_artifact_is_read_leniently() -> None:
    """The keys the demo artifact carried before the typed metadata existed."""
    old = {
        "model_version": "demo-synth-0-abc",
        "sample_rate": 22050,
        "clip_seconds": 30.0,
        "features": list(DEFAULT_FEATURES),
        "hit_threshold": 70.0,
        "hit_definition": "trained label",
        "training": {"data": "synthetic", "seed": 0, "n": 1280, "train_loss": [0.5]},
    }
    meta = ArtifactMeta.from_dict(old)
    assert meta.uses_audio is None and meta.exports is None and meta.hit_label_threshold is None
    assert meta.training == TrainingSummary(
        data="synthetic", seed=0, details={"n": 1280, "train_loss": [0.5]}
    )
    assert meta.to_dict() == old, "written back as it was"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "not a JSON object"),
        ({"model_version": "x"}, "lacks sample_rate, clip_seconds, features, hit_threshold"),
        ({**_meta().to_dict(), "features": "artist.followers"}, "list of dotted paths"),
        ({**_meta().to_dict(), "sample_rate": "fast"}, "popscore.json"),
        ({**_meta().to_dict(), "clip_seconds": 0}, "holds no sample"),
        ({**_meta().to_dict(), "uses_audio": "yes"}, "true or false"),
        ({**_meta().to_dict(), "model_version": " "}, "model_version"),
        ({**_meta().to_dict(), "model_version": "a:b"}, "no ':' and no braces"),
        ({**_meta().to_dict(), "model_version": "fusion-{1}"}, "no ':' and no braces"),
    ],
)
def test_bad_meta_is_one_artifact_error(raw: object, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        ArtifactMeta.from_dict(raw)


def test_for_model_reads_rate_features_and_audio_off_the_model() -> None:
    meta = ArtifactMeta.for_model(
        _net(use_audio=False), model_version="v", clip_seconds=1.0,
        training=TrainingSummary(data="x"), note="kept",
    )  # fmt: skip
    assert (meta.sample_rate, meta.features, meta.uses_audio) == (RATE, DEFAULT_FEATURES, False)
    assert meta.exports == ("forward", "spectrogram", "score_spectrogram")
    assert meta.extra == {"note": "kept"}


@pytest.mark.parametrize("use_audio", [True, False])
def test_load_gives_the_declared_interface(use_audio: bool, tmp_path: Path) -> None:
    artifact = load(export(_net(use_audio), tmp_path / "m.pt"))
    assert artifact.uses_audio is use_audio
    assert artifact.staged is artifact.module
    assert isinstance(artifact.staged, torch.jit.ScriptModule)


@pytest.mark.parametrize("use_audio", [True, False])
def test_older_artifacts_are_probed_once_on_load(use_audio: bool, tmp_path: Path) -> None:
    """Without ``exports`` and ``uses_audio`` the loader asks the module: an empty spectrogram
    means no audio branch."""
    artifact = load(export(_net(use_audio), tmp_path / "m.pt"))
    old = artifact.meta.replace(exports=None, uses_audio=None)
    again = load(resave(artifact.module, tmp_path / "old.pt", old))
    assert again.meta == old
    assert again.uses_audio is use_audio and again.staged is not None


@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_an_artifact_declaring_methods_it_lacks_is_refused(tmp_path: Path) -> None:
    class ForwardOnly(torch.nn.Module):
        def forward(
            self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return features.sum(1), features.sum(1)

    scripted = torch.jit.script(ForwardOnly())
    resave(scripted, tmp_path / "fo.pt", _meta(exports=None, uses_audio=None))
    plain = load(tmp_path / "fo.pt")
    assert plain.staged is None and plain.uses_audio, "forward only: taken to listen"
    resave(scripted, tmp_path / "liar.pt", _meta())
    with pytest.raises(ArtifactError, match="declares spectrogram, score_spectrogram"):
        load(tmp_path / "liar.pt")


@pytest.mark.filterwarnings(JIT_DEPRECATED)
def test_a_torchscript_file_without_metadata_is_not_an_artifact(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(_net()), str(path))
    with pytest.raises(ArtifactError, match="not a popscore artifact"):
        load(path)


def test_the_staged_protocol_matches_the_models() -> None:
    """What serving calls on a staged artifact is what the model classes export."""
    for name in ("spectrogram", "score_spectrogram"):
        assert hasattr(StagedScoringModule, name) and hasattr(FusionNet, name)


def test_training_values_of_another_type_are_kept_as_they_were() -> None:
    raw = {"data": "d.csv", "rows": "many", "seed": True, "evaluation": None, "lr": 0.1}
    summary = TrainingSummary.from_dict(raw)
    assert summary is not None and (summary.rows, summary.seed) == (None, None)
    assert summary.to_dict() == raw


def test_extra_keys_cannot_overwrite_the_metadata_own() -> None:
    with pytest.raises(ArtifactError, match="features"):
        ArtifactMeta.for_model(
            _net(), model_version="v", clip_seconds=1.0, training=TrainingSummary(),
            features=["artist.followers"],
        )  # fmt: skip


def test_provenance_says_what_the_model_learnt_from() -> None:
    evaluation = {"model": {"mae": 8.28}, "baselines": {"mean": {"mae": 9.48}}}
    real = _meta(training=TrainingSummary(data="tracks.csv", synthetic=False, rows=1967,
                                          evaluation=evaluation))  # fmt: skip
    assert real.synthetic is False
    assert real.provenance() == (
        "m-1: trained on real data (tracks.csv, 1967 rows); "
        "grouped evaluation MAE 8.28 vs mean 9.48"
    )
    evaluation |= {"intervals_95": {"model": {"mae": [7.734, 8.692]}}}
    evaluation["baselines"] |= {"ridge": {"mae": 8.4}, "blend": {"mae": 8.27}}
    assert (
        _meta(training=replace(real.training, evaluation=evaluation))
        .provenance()
        .endswith("MAE 8.28 (95 % 7.73-8.69) vs mean 9.48, ridge 8.4, blend 8.27")
    )
    assert ArtifactMeta.from_json(real.to_json()) == real
    # artifacts written before the key: the synthetic generators name themselves so
    old_demo = _meta(training=TrainingSummary(data="synthetic"))
    assert old_demo.synthetic is True and "SYNTHETIC" in old_demo.provenance()
    assert _meta(training=TrainingSummary(data="synthetic(n=300, seed=0)")).synthetic is True
    assert _meta(training=None).synthetic is None


MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_demo_model_says_it_is_synthetic() -> None:
    meta = load(MODELS / "demo.pt").meta
    assert meta.synthetic is True and meta.training is not None
    assert meta.training.synthetic is True


def test_the_shipped_real_data_model_carries_its_grouped_evaluation() -> None:
    """models/paper-features.pt: the paper's 1,967 real tracks, features only, its artist-grouped
    evaluation embedded (the starting point for events with Spotify-style features)."""
    artifact = load(MODELS / "paper-features.pt")
    meta = artifact.meta
    assert meta.synthetic is False and not artifact.uses_audio
    assert meta.training is not None and meta.training.rows == 1967
    assert meta.training.variant == "features_only" and meta.training.evaluation is not None
    evaluation = meta.training.evaluation
    assert evaluation["split"]["method"].startswith("k-fold grouped by artist")
    assert evaluation["model"]["mae"] < evaluation["baselines"]["mean"]["mae"]
    assert evaluation["model"]["mae"] < evaluation["baselines"]["ridge"]["mae"]
    low, high = evaluation["intervals_95"]["model - ridge"]["mae"]
    assert low < high < 0  # better than ridge, beyond the artist-bootstrap noise


def test_the_shipped_model_reads_title_flags_and_scores_an_untitled_event_sensibly() -> None:
    artifact = load(MODELS / "paper-features.pt")
    paths = artifact.meta.features
    assert "release.title.remix" in paths and "release.title.live" in paths
    base = {"artist": {"popularity": 80, "followers": 5_000_000}, "release": {"date": "2021-05-01"},
            "audio_features": {"danceability": 0.7, "energy": 0.6, "loudness": -5.0}}  # fmt: skip
    events = [
        base,
        {**base, "release": {**base["release"], "title": "Song"}},
        {**base, "release": {**base["release"], "title": "Song - Live at Wembley"}},
    ]
    features = torch.from_numpy(np.stack([extract(e, paths) for e in events]))
    with torch.inference_mode():
        popularity, _ = artifact.module(
            torch.zeros(3, 1), features, torch.zeros(3, dtype=torch.bool)
        )
    untitled, plain, live = popularity.tolist()
    assert abs(untitled - plain) < 0.5  # a missing title is imputed as no version flag
    assert live < plain - 1.0  # live versions are less popular in the training data
