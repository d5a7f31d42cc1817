"""Shadow scoring without services: which shadow artifacts can score beside a primary, and a
second model's records on the primary's decoded audio."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer.app import load_shadow
from consumer.audio import AudioPolicy
from consumer.device import Scorer
from consumer.errors import ConfigError
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.settings import load_settings
from popscore.artifact import DEFAULT_FEATURES
from popscore.training.model import FusionNet
from schemas import ReleaseEvent
from tests.unit.artifact_helpers import export
from tests.unit.conftest import CLIP, RATE


def tiny(path: Path, version: str, use_audio: bool = True, clip: float = CLIP) -> Path:
    torch.manual_seed(1)
    net = FusionNet(use_audio=use_audio, sample_rate=RATE, channels=(4, 8), audio_dim=8,
                    feature_dim=8, hidden=8)  # fmt: skip
    net.fit_normalizer(np.random.default_rng(1).random((32, len(DEFAULT_FEATURES))) * 100)
    return export(net.eval(), path, version, clip)


@pytest.mark.parametrize(
    ("use_audio", "clip", "problem"),
    [
        (True, CLIP, None),
        (False, CLIP, None),
        (True, 1.0, "its audio input"),
    ],
)
def test_a_shadow_must_score_the_primarys_decoded_audio(
    artifact: Path, tmp_path: Path, use_audio: bool, clip: float, problem: str | None
) -> None:
    shadow = tiny(tmp_path / "s.pt", "shadow-1", use_audio, clip)
    settings = load_settings(model=artifact, shadow_model=shadow, device="cpu")
    primary = Scorer(artifact, "cpu")
    if problem is None:
        loaded = load_shadow(settings, primary)
        assert loaded is not None and loaded.meta.model_version == "shadow-1"
    else:
        with pytest.raises(ConfigError, match=f"POPSCORE_SHADOW_MODEL: {problem}"):
            load_shadow(settings, primary)


def test_a_listening_shadow_beside_a_features_only_primary_is_refused(
    artifact: Path, tmp_path: Path
) -> None:
    primary = Scorer(tiny(tmp_path / "p.pt", "fo", use_audio=False), "cpu")
    settings = load_settings(shadow_model=artifact, device="cpu")
    with pytest.raises(ConfigError, match="the primary model does not"):
        load_shadow(settings, primary)


def test_the_same_version_twice_is_refused(artifact: Path) -> None:
    settings = load_settings(model=artifact, shadow_model=artifact, device="cpu")
    with pytest.raises(ConfigError, match="the same model_version"):
        load_shadow(settings, Scorer(artifact, "cpu"))


def test_the_shadow_scores_what_the_primary_decoded_and_its_failure_is_counted(
    artifact: Path, tmp_path: Path
) -> None:
    t = np.arange(3 * RATE) / RATE
    sf.write(tmp_path / "a.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
    uri = (tmp_path / "a.wav").as_uri()
    when = '"emitted_at": "2026-11-30T12:00:00Z"'
    events = [
        ReleaseEvent.from_json(
            f'{{"event_id": "e{i}", "track_id": "t{i}", {when}, "audio_uri": "{uri}"}}'
        )
        for i in range(3)
    ]
    shadow = Scorer(tiny(tmp_path / "s.pt", "shadow-1"), "cpu")
    with ThreadPoolExecutor(2) as pool:
        pipeline = Pipeline(
            Scorer(artifact, "cpu"), AudioPolicy.create((tmp_path,)), pool, Metrics()
        )
        ready = [(None, pipeline._load(e)) for e in events]  # type: ignore[misc]
        records, failed = pipeline.shadow_records(shadow, ready)  # type: ignore[arg-type]
        assert failed == 0
        assert [r.model_version for _m, r in records] == ["shadow-1"] * 3
        assert [r.event_id for _m, r in records] == ["e0", "e1", "e2"]

        def broken(*_args: object) -> None:
            raise RuntimeError("the shadow is broken")

        shadow.score = broken  # type: ignore[method-assign]
        assert pipeline.shadow_records(shadow, ready) == ([], 3)  # type: ignore[arg-type]
