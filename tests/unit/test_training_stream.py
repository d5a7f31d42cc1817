"""Training streamed from a prepared cache (training.stream): crops read from the shards,
reproducible epochs, checkpoints and resume."""

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer.audio import AudioPolicy
from popscore.training import stream as stream_module
from popscore.training.cache import prepare, read_table, shard_name
from popscore.training.data import PAPER_FEATURES
from popscore.training.model import FusionNet
from popscore.training.stream import CachedClips, Stream, train_stream
from popscore.training.train import TrainConfig

RATE, SECONDS, ROWS = 8000, 1.0, 24
CONFIG = TrainConfig(epochs=4, batch_size=8, lr=3e-3)
SMALL = {"channels": (4, 8), "audio_dim": 8, "feature_dim": 8, "hidden": 16, "n_mels": 16}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    with (root / "catalog.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["popularity", "artist", "artist_popularity", "tempo", "audio"])
        for i in range(ROWS):
            loud = 0.05 + 0.9 * (i % 4) / 3  # louder tracks are more popular: signal to learn
            wave = (loud * rng.uniform(-1, 1, (RATE + 400, 1))).astype(np.float32)
            sf.write(root / f"t{i}.wav", wave, RATE)
            out.writerow(
                [30 + 15 * (i % 4) + rng.integers(0, 5), f"A{i % 6}", 50, 120, f"t{i}.wav"]
            )
    prepare(
        root / "catalog.csv",
        "audio",
        root / "cache",
        AudioPolicy.create((root,)),
        PAPER_FEATURES,
        RATE,
        SECONDS,
        shard_rows=10,
        workers=1,
        progress=False,
    )
    return root / "cache"


def _clips(cache: Path, random_crop: bool = True) -> CachedClips:
    table = read_table(cache)
    return CachedClips(cache, table, np.arange(len(table.rows)), RATE // 2, random_crop)


def test_a_crop_is_the_stored_clips_slice(cache: Path) -> None:
    clips = _clips(cache, random_crop=False)
    assert len(clips) == ROWS
    for i in (0, 9, 10, 23):  # rows in the first, second and last shard
        wave, features, ok, popularity = clips[i]
        stored = np.load(cache / shard_name(i // 10, ".npy"))[i % 10].astype(np.float32)
        start = (RATE - RATE // 2) // 2  # the centred crop
        np.testing.assert_array_equal(wave.numpy(), stored[start : start + RATE // 2])
        assert bool(ok) and features.shape == (len(PAPER_FEATURES),)
        assert float(popularity) == read_table(cache).popularity[i]
    random = _clips(cache)[3][0].numpy()
    stored = np.load(cache / shard_name(0, ".npy"))[3].astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(stored, RATE // 2)
    assert (windows == random).all(axis=1).any()  # some window of the clip, read alone


def _train(
    cache: Path, stream: Stream, epochs: int = CONFIG.epochs
) -> tuple[list[float], FusionNet]:
    torch.manual_seed(0)
    net = FusionNet(PAPER_FEATURES, sample_rate=RATE, **SMALL)  # type: ignore[arg-type]
    history = train_stream(
        net, _clips(cache), replace(CONFIG, epochs=epochs), stream, progress=False
    )
    return history, net


def test_streamed_training_learns_and_is_reproducible(cache: Path) -> None:
    history, net = _train(cache, Stream(workers=2))
    assert len(history) == CONFIG.epochs and all(np.isfinite(history))
    assert history[-1] < history[0]
    again, net2 = _train(cache, Stream(workers=2))
    assert again == history
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, net = _train(cache, Stream(workers=0))
    checkpoint = tmp_path / "ck.pt"
    saves = []
    real_save = stream_module._save

    def killed_after_two_epochs(*args: object) -> None:
        real_save(*args)  # type: ignore[arg-type]
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies right after epoch 2's checkpoint

    monkeypatch.setattr(stream_module, "_save", killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        _train(cache, Stream(workers=0, checkpoint=checkpoint))
    monkeypatch.setattr(stream_module, "_save", real_save)
    resumed, resumed_net = _train(cache, Stream(workers=0, checkpoint=checkpoint, resume=True))
    assert resumed == whole
    for a, b in zip(net.state_dict().values(), resumed_net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
