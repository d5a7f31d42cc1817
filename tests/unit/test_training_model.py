"""Unit tests of the model side: features, frontend, FusionNet, its export, synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from popscore.artifact import ArtifactError, ArtifactMeta, TrainingSummary, load, save
from popscore.artifact.features import COUNT_FEATURES, DEFAULT_FEATURES, extract, extract_many
from popscore.artifact.frontend import LogMel
from popscore.training import demo_model
from popscore.training.metrics import roc_auc
from popscore.training.model import FusionNet
from popscore.training.synthetic import (
    AUDIO_FORMATS,
    FILE_SUFFIXES,
    make_dataset,
    sample_params,
    sample_track,
    synth_audio,
    write_audio,
)
from popscore.training.train import TrainConfig, train

SR = 22050
F = len(DEFAULT_FEATURES)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_dataset(seed=7, n=6, seconds=3.0, sample_rate=SR)


@pytest.fixture(scope="module")
def model(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> FusionNet:
    torch.manual_seed(0)
    net = FusionNet(sample_rate=SR)
    net.fit_normalizer(data[1])
    return net.eval()


def _inputs(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    waveforms, features, _ = data
    mask = torch.tensor([True, False, True, True, False, True])
    return torch.from_numpy(waveforms), torch.from_numpy(features), mask


def _meta(model: FusionNet) -> ArtifactMeta:
    training = TrainingSummary(data="synthetic")
    return ArtifactMeta.for_model(
        model, model_version="test-0", clip_seconds=3.0, training=training
    )


# --- features -------------------------------------------------------------------------------


def test_default_features_order_and_counts() -> None:
    assert DEFAULT_FEATURES[:2] == ("artist.popularity", "artist.followers")
    assert len(DEFAULT_FEATURES) == len(set(DEFAULT_FEATURES)) == 21
    assert set(DEFAULT_FEATURES) >= COUNT_FEATURES
    assert "engagement.streams" in COUNT_FEATURES
    assert "artist.popularity" not in COUNT_FEATURES


def test_extract_missing_bool_and_bad_values() -> None:
    event = {
        "artist": {"popularity": 55, "followers": 1200},
        "release": {"explicit": True, "duration_ms": None},
        "audio_features": {"tempo": "fast", "energy": float("inf")},
        "engagement": "not a group",
    }
    row = extract(event)
    assert row.dtype == np.float32 and row.shape == (F,)
    col = {path: row[i] for i, path in enumerate(DEFAULT_FEATURES)}
    assert col["artist.popularity"] == 55 and col["artist.followers"] == 1200
    assert col["release.explicit"] == 1.0
    for missing in ("release.duration_ms", "audio_features.tempo", "audio_features.energy"):
        assert math.isnan(col[missing])
    assert math.isnan(col["engagement.streams"])
    assert extract({"release": {"explicit": False}}, ["release.explicit"])[0] == 0.0
    assert extract_many([], DEFAULT_FEATURES).shape == (0, F)


# --- frontend -------------------------------------------------------------------------------


def test_logmel_shape_and_finite_even_on_silence() -> None:
    frontend = LogMel(sample_rate=SR)
    wave = torch.zeros(2, SR)
    wave[0] = torch.randn(SR) * 0.1
    out = frontend(wave)
    assert out.shape == (2, 1, 64, frontend.num_frames(SR))
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
def test_logmel_computes_what_torchaudio_melspectrogram_does() -> None:
    """forward() skips MelSpectrogram's abs().pow(2) and transposes: same numbers, eager and
    scripted, with the buffers every artifact and checkpoint names."""
    frontend = LogMel(sample_rate=SR, n_fft=512, hop_length=128, n_mels=40, f_min=30.0)
    wave = torch.randn(3, SR) * 0.1
    wave[1] = torch.sin(torch.arange(SR) * 0.3)  # one loud tone: a wide dynamic range
    expected = torch.log(frontend.mel(wave) + frontend.eps).unsqueeze(1)
    torch.testing.assert_close(frontend(wave), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(frontend)(wave), expected, rtol=0, atol=1e-5)
    assert set(frontend.state_dict()) == {"eps", "mel.spectrogram.window", "mel.mel_scale.fb"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 0},
        {"n_mels": 0},
        {"n_fft": 512, "hop_length": 1024},
        {"f_max": 20000.0},
        {"f_min": 5000.0, "f_max": 4000.0},
        {"eps": 0.0},
    ],
)
def test_logmel_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LogMel(**kwargs)  # type: ignore[arg-type]


# --- model ----------------------------------------------------------------------------------


def test_forward_shapes_and_range(model: FusionNet, data: tuple) -> None:
    with torch.inference_mode():
        popularity, hit_logit = model(*_inputs(data))
    assert popularity.shape == hit_logit.shape == (6,)
    assert ((popularity >= 0) & (popularity <= 100)).all()
    assert torch.isfinite(hit_logit).all()


def test_missing_features_and_audio_give_finite_scores(model: FusionNet, data: tuple) -> None:
    waveforms, features, _ = _inputs(data)
    nan_features = torch.full_like(features, math.nan)
    # An absent clip may arrive as anything, even NaN: the mask must keep it out entirely.
    bad_audio = torch.full_like(waveforms, math.nan)
    no_audio = torch.zeros(6, dtype=torch.bool)
    with torch.inference_mode():
        for wave, feats, mask in [
            (waveforms, nan_features, torch.ones(6, dtype=torch.bool)),
            (bad_audio, features, no_audio),
            (bad_audio, nan_features, no_audio),
        ]:
            popularity, hit_logit = model(wave, feats, mask)
            assert torch.isfinite(popularity).all() and torch.isfinite(hit_logit).all()


def test_batched_equals_item_by_item(model: FusionNet, data: tuple) -> None:
    waveforms, features, mask = _inputs(data)
    with torch.inference_mode():
        batched = model(waveforms, features, mask)
        single = [
            model(waveforms[i : i + 1], features[i : i + 1], mask[i : i + 1]) for i in range(6)
        ]
    for k in range(2):
        torch.testing.assert_close(batched[k], torch.cat([s[k] for s in single]), atol=1e-4, rtol=0)


def test_cpu_chunking_does_not_change_scores(model: FusionNet, data: tuple) -> None:
    inputs = _inputs(data)
    with torch.inference_mode():
        whole = model(*inputs)
        original, model.cpu_chunk_samples = model.cpu_chunk_samples, 1  # one item per slice
        try:
            sliced = model(*inputs)
        finally:
            model.cpu_chunk_samples = original
    torch.testing.assert_close(whole, sliced, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seconds", [3.0, 30.0])
def test_any_clip_length(model: FusionNet, seconds: float) -> None:
    wave = torch.randn(1, int(seconds * SR)) * 0.1
    with torch.inference_mode():
        popularity, _ = model(wave, torch.zeros(1, F), torch.ones(1, dtype=torch.bool))
    assert popularity.shape == (1,) and torch.isfinite(popularity).all()


def test_forward_rejects_wrong_shapes(model: FusionNet) -> None:
    with pytest.raises(ValueError, match="columns"):
        model(torch.zeros(1, SR), torch.zeros(1, F + 1), torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, SR), torch.zeros(1, F), torch.ones(1, dtype=torch.bool))


def test_fit_normalizer_logs_counts_and_survives_empty_columns() -> None:
    net = FusionNet()
    rows = np.full((4, F), np.nan, dtype=np.float32)
    streams = DEFAULT_FEATURES.index("engagement.streams")
    rows[:, streams] = [0, 9, 99, 999]
    net.fit_normalizer(rows)
    assert net.normalizer.mean[streams].item() == pytest.approx(np.log1p([0, 9, 99, 999]).mean())
    assert net.normalizer.mean[0].item() == 0.0 and net.normalizer.std[0].item() == 1.0


def test_train_smoke(data: tuple) -> None:
    torch.manual_seed(0)
    net = FusionNet(sample_rate=SR)
    waveforms, features, popularity = data
    net.fit_normalizer(features)
    history = train(
        net, waveforms, features, popularity, TrainConfig(epochs=1, batch_size=3), progress=False
    )
    assert len(history) == 1 and math.isfinite(history[0])
    assert not net.training


def test_roc_auc() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


# --- artifact -------------------------------------------------------------------------------


def test_export_matches_eager_and_keeps_meta(model: FusionNet, data: tuple, tmp_path: Path) -> None:
    path = save(model, tmp_path / "m.pt", _meta(model))
    artifact = load(path)
    scripted, meta = artifact.module, artifact.meta
    assert meta == _meta(model)
    assert meta.model_version == "test-0" and meta.hit_threshold == 70.0
    assert meta.features == DEFAULT_FEATURES and meta.uses_audio and artifact.staged is not None
    inputs = _inputs(data)
    with torch.inference_mode():
        eager, exported = model(*inputs), scripted(*inputs)
        long_clip = torch.randn(2, 30 * SR) * 0.1
        long_args = (long_clip, torch.from_numpy(data[1][:2]), torch.ones(2, dtype=torch.bool))
        long_eager, long_exported = model(*long_args), scripted(*long_args)
    torch.testing.assert_close(eager, exported, atol=1e-4, rtol=0)
    torch.testing.assert_close(long_eager, long_exported, atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".m.pt.*")), "temporary file left behind"
    assert path.stat().st_mode & 0o777 == 0o644


def test_export_rejects_mismatched_meta(model: FusionNet, tmp_path: Path) -> None:
    meta = _meta(model)
    with pytest.raises(ArtifactError, match="clip_seconds"):
        save(model, tmp_path / "a.pt", meta.replace(clip_seconds=0.0))
    reordered = tuple(reversed(DEFAULT_FEATURES))
    with pytest.raises(ArtifactError, match="feature order"):
        save(model, tmp_path / "b.pt", meta.replace(features=reordered))
    with pytest.raises(ArtifactError, match="sample_rate"):
        save(model, tmp_path / "c.pt", meta.replace(sample_rate=16000))
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        load(tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError):
        load(junk)


def test_demo_model_builds_a_loadable_artifact(tmp_path: Path) -> None:
    out = tmp_path / "demo.pt"
    argv = ["--out", str(out), "--seed", "1", "--minutes", "0.05", "--epochs", "1"]
    assert demo_model.main([*argv, "--crop-seconds", "1.5", "--quiet"]) == 0
    meta = load(out).meta
    assert meta.model_version.startswith("demo-synth-1-")
    assert meta.sample_rate == 22050 and meta.clip_seconds == 30.0
    assert meta.training is not None and meta.training.data == "synthetic"
    assert {"mae", "mean_predictor_mae"} <= set(meta.training.details["metrics"])
    assert meta.extra["hit_definition"].startswith("trained label")
    json.dumps(meta.to_dict())  # plain JSON all the way down
    assert out.stat().st_size < 5_000_000


def test_demo_model_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit) as exc:
        demo_model.main(["--minutes", "0"])
    assert exc.value.code == 2


# --- synthetic data -------------------------------------------------------------------------


def test_synthetic_is_reproducible_from_seed() -> None:
    first = sample_track(np.random.default_rng(3))
    again = sample_track(np.random.default_rng(3))
    assert first == again
    assert 0.0 <= first.popularity <= 100.0
    assert set(first.features) <= {"artist", "release", "audio_features", "engagement"}
    a = make_dataset(seed=5, n=3, seconds=1.0, sample_rate=8000)
    b = make_dataset(seed=5, n=3, seconds=1.0, sample_rate=8000)
    c = make_dataset(seed=6, n=3, seconds=1.0, sample_rate=8000)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (3, 8000) and a[1].shape == (3, F) and a[2].shape == (3,)


def test_synth_audio_shape_range_and_dtype() -> None:
    rng = np.random.default_rng(0)
    audio = synth_audio(rng, 2.0, 44100, 2, sample_params(rng))
    assert audio.shape == (88200, 2) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.01
    with pytest.raises(ValueError):
        synth_audio(rng, 0.0, 44100, 2, sample_params(rng))


@pytest.mark.parametrize("fmt", sorted(AUDIO_FORMATS))
def test_write_audio_round_trips(fmt: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    audio = synth_audio(rng, 2.5, SR, 2, sample_params(rng))
    path = write_audio(tmp_path / f"clip{FILE_SUFFIXES[fmt]}", audio, SR, fmt)
    decoded, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == SR and decoded.shape[1] == 2
    assert decoded.shape[0] == audio.shape[0]


def test_write_audio_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        write_audio(tmp_path / "x.aac", np.zeros((10, 1), np.float32), SR, "AAC")


def _leaf_types(annotation: object) -> list[object]:
    """The types an annotation allows, through Optional, unions and Annotated."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaf_types(arg)]
    return [annotation]


def _numeric_paths(model: type, prefix: str = "") -> set[str]:
    """Every dotted path of a ReleaseEvent field a feature can read: numbers and booleans,
    optional or not, through nested models."""
    from pydantic import BaseModel

    found: set[str] = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        for kind in _leaf_types(field.annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= _numeric_paths(kind, f"{prefix}{name}.")
            elif kind in (int, float, bool):
                found.add(prefix + name)
    return found


def test_every_feature_path_reads_a_number_the_event_can_carry() -> None:
    """A mistyped path ("engagement.window_hour") or a text field ("release.market") is NaN
    for every event, for ever: the model would train and serve on a constant, silently."""
    from popscore.artifact.features import DERIVED
    from popscore.training.data import PAPER_FEATURES
    from schemas.events import ReleaseEvent

    readable = _numeric_paths(ReleaseEvent) | set(DERIVED)
    assert "artist.followers" in readable and "release.market" not in readable
    for paths in (DEFAULT_FEATURES, PAPER_FEATURES):
        assert not set(paths) - readable, sorted(set(paths) - readable)
