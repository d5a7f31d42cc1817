"""Training streamed from a prepared cache (training.stream): crops read from the shards,
reproducible epochs, checkpoints and resume."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer.audio import AudioPolicy
from consumer.errors import UsageError
from popscore.artifact import load
from popscore.cli.main import main
from popscore.training import stream as stream_module
from popscore.training.cache import prepare, read_table, shard_name
from popscore.training.data import PAPER_FEATURES
from popscore.training.model import FusionNet
from popscore.training.stream import CachedClips, Stream, train_stream
from popscore.training.train import TrainConfig
from tests.conftest import free_port

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


@pytest.mark.parametrize(
    ("config", "rows", "named"),
    [
        (replace(CONFIG, lr=1e-3), np.arange(ROWS), "its lr is 0.003, this run's 0.001"),
        (replace(CONFIG, batch_size=4), np.arange(ROWS), "its batch_size is 8, this run's 4"),
        (CONFIG, np.arange(ROWS)[::-1], "its data is"),  # the same number of other rows
    ],
)
def test_a_checkpoint_of_other_settings_or_data_is_not_resumed(
    cache: Path, tmp_path: Path, config: TrainConfig, rows: np.ndarray, named: str
) -> None:
    checkpoint = tmp_path / "ck.pt"
    _train(cache, Stream(workers=0, checkpoint=checkpoint), epochs=1)
    other = CachedClips(cache, read_table(cache), rows, RATE // 2, True)
    net = FusionNet(PAPER_FEATURES, sample_rate=RATE, **SMALL)  # type: ignore[arg-type]
    resume = Stream(workers=0, checkpoint=checkpoint, resume=True)
    with pytest.raises(UsageError, match="cannot be resumed here") as info:
        train_stream(net, other, replace(config, epochs=1), resume, progress=False)
    assert named in str(info.value)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 short real files, 4 artists: what `popscore train --audio-column` reads."""
    root = tmp_path_factory.mktemp("catalog")
    rng = np.random.default_rng(1)
    with (root / "catalog.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["name", "popularity", "artist", "artist_popularity", "energy", "audio"])
        for i in range(16):
            wave = (0.1 + 0.2 * (i % 4)) * rng.uniform(-1, 1, (8000, 1))
            sf.write(root / f"t{i}.flac", wave.astype(np.float32), 8000)
            out.writerow([f"Song {i}", 40 + 10 * (i % 4), f"A{i % 4}", 60, 0.5, f"t{i}.flac"])
    return root / "catalog.csv"


def _train_command(catalog: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(catalog),
        "--audio-column",
        "audio",
        "--out",
        str(out),
        "--cache",
        str(catalog.parent / "cache"),
        "--no-evaluation",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


@pytest.fixture()
def loader_workers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The num_workers of every DataLoader training.stream builds."""
    built: list[int] = []
    real = stream_module.DataLoader

    def spy(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs.get("num_workers", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(stream_module, "DataLoader", spy)
    return built


def test_popscore_train_streams_a_catalog_and_resumes(
    catalog: Path, tmp_path: Path, loader_workers: list[int]
) -> None:
    out = tmp_path / "m.pt"
    assert main(_train_command(catalog, out)) == 0
    # --workers 0 reaches every loader: the epochs' and the drift reference's scoring.
    assert loader_workers and set(loader_workers) == {0}
    artifact = load(out)
    assert artifact.uses_audio and artifact.meta.training is not None
    assert artifact.meta.training.rows == 16
    assert (catalog.parent / "cache" / "manifest.json").exists()  # prepared once, reused
    checkpoint = out.with_name("m.pt.ckpt")
    assert len(torch.load(checkpoint, weights_only=True)["history"]) == 2
    # --resume from a finished run's checkpoint trains no further epoch: the same weights.
    again = tmp_path / "again.pt"
    checkpoint.replace(again.with_name("again.pt.ckpt"))
    assert main(_train_command(catalog, again, "--resume")) == 0
    for a, b in zip(
        load(out).module.state_dict().values(),
        load(again).module.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_two_gloo_processes_under_torchrun_train_like_one(catalog: Path, tmp_path: Path) -> None:
    """DDP: 2 CPU processes at batch 16 each against 1 at 32 (the same global batch): the same
    loss curve within noise, and only rank 0 writes the artifact."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main(_train_command(catalog, one, "--seed", "3")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "popscore",
        *_train_command(catalog, two, "--seed", "3"),
    ]
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone
    single = torch.load(one.with_name("one.pt.ckpt"), weights_only=True)["history"]
    ddp = torch.load(two.with_name("two.pt.ckpt"), weights_only=True)["history"]
    assert len(ddp) == len(single) == 2
    np.testing.assert_allclose(ddp, single, rtol=0.25)


def test_popscore_evaluate_reads_the_same_cache(tmp_path: Path, loader_workers: list[int]) -> None:
    """Out-of-core evaluation: the artist-grouped folds stream their audio from the cache."""
    rng = np.random.default_rng(2)
    with (tmp_path / "catalog.csv").open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["popularity", "artist", "artist_popularity", "energy", "audio"])
        for i in range(24):
            sf.write(
                tmp_path / f"t{i}.wav",
                (0.3 * rng.uniform(-1, 1, (4000, 1))).astype(np.float32),
                8000,
            )
            out.writerow([40 + 3 * (i % 8), f"A{i % 8}", 50 + i % 8, 0.5, f"t{i}.wav"])
    report = tmp_path / "r.json"
    args = [
        "evaluate",
        "--data",
        str(tmp_path / "catalog.csv"),
        "--audio-column",
        "audio",
        "--report",
        str(report),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(args) == 0
    data = json.loads(report.read_text())
    assert set(data["models"]) == {"fusion", "audio_only", "features_only"}
    assert data["models"]["fusion"]["uses_audio"] and data["data"]["rows"] == 24
    assert (tmp_path / "catalog.csv.cache" / "manifest.json").exists()  # the default cache
    assert loader_workers and set(loader_workers) == {0}  # --workers 0, scoring included


def test_the_audio_only_variant_never_sees_features(cache: Path) -> None:
    table = read_table(cache)
    hidden = CachedClips(cache, table, np.arange(4), RATE // 2, False, hide_features=True)
    assert torch.isnan(hidden.features).all() and torch.isnan(hidden[0][1]).all()


def test_resuming_another_runs_checkpoint_is_refused_in_one_line(
    catalog: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt"
    assert main(_train_command(catalog, out)) == 0
    args = [a if a != "2" else "3" for a in _train_command(catalog, out, "--resume")]  # 3 epochs
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "cannot be resumed" in err
