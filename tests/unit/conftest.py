"""Unit fixtures: a small, untrained but real exported artifact (built in seconds)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from popscore.artifact import DEFAULT_FEATURES
from popscore.training.model import FusionNet
from tests.unit.artifact_helpers import export

RATE, CLIP = 8_000, 2.0


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FusionNet, normaliser fitted on random rows, exported like the real one."""
    torch.manual_seed(0)
    model = FusionNet(sample_rate=RATE, channels=(4, 8), audio_dim=8, feature_dim=8, hidden=8)
    model.fit_normalizer(np.random.default_rng(0).random((32, len(DEFAULT_FEATURES))) * 100)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return export(model, path, "tiny-test", CLIP)
