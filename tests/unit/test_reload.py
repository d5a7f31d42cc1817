"""Hot reload: the self-test, the compatibility rule, refusals, and the swap between batches."""

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from consumer.device import Scorer, Scores
from consumer.metrics import Metrics
from consumer.reload import FileWatch, Reloader, incompatibility, self_test, vet
from popscore.artifact import DEFAULT_FEATURES, load, optimize, resave
from popscore.training.model import FusionNet
from tests.unit.artifact_helpers import export
from tests.unit.conftest import CLIP, RATE


def net(rate: int = RATE, use_audio: bool = True) -> FusionNet:
    torch.manual_seed(1)
    model = FusionNet(sample_rate=rate, channels=(4, 8), audio_dim=8, feature_dim=8, hidden=8,
                      use_audio=use_audio)  # fmt: skip
    model.fit_normalizer(np.random.default_rng(1).random((16, len(DEFAULT_FEATURES))) * 100)
    return model.eval()


def new_version(artifact: Path, target: Path, version: str = "tiny-test-2") -> Path:
    """The same weights under another model_version, as `popscore export` writes it."""
    old = load(artifact)
    return resave(old.module, target, old.meta.replace(model_version=version))


@pytest.fixture
def serving(artifact: Path) -> Scorer:
    return Scorer(artifact, "cpu")


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_audio", [True, False])
def test_a_sound_artifact_passes_the_self_test(
    use_audio: bool, device: str, tmp_path: Path
) -> None:
    path = export(net(use_audio=use_audio), tmp_path / "m.pt", clip_seconds=CLIP)
    assert self_test(Scorer(path, device)) is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_candidate_is_loaded_on_the_serving_device(
    artifact: Path, device: str, tmp_path: Path
) -> None:
    verdict = vet(new_version(artifact, tmp_path / "new.pt"), device, Scorer(artifact, device))
    assert verdict.outcome == "loaded" and verdict.scorer is not None
    assert verdict.scorer.device == Scorer(artifact, device).device


def test_a_candidate_of_the_shadows_version_is_refused(artifact: Path, tmp_path: Path) -> None:
    candidate = new_version(artifact, tmp_path / "new.pt")
    version = Scorer(candidate, "cpu").meta.model_version
    verdict = vet(candidate, "cpu", Scorer(artifact, "cpu"), frozenset({version}))
    assert verdict.outcome == "refused" and "shadow" in verdict.detail


def broken_scores(**changes: np.ndarray) -> Scores:
    good = Scores(np.full(3, 50.0, np.float32), np.full(3, 0.5, np.float32))
    return replace(good, **changes)


@pytest.mark.parametrize(
    ("scores", "why"),
    [
        (broken_scores(popularity=np.array([1.0, np.nan, 2.0])), "non-finite"),
        (broken_scores(hit_probability=np.array([0.1, np.inf, 0.2])), "non-finite"),
        (broken_scores(popularity=np.array([1.0, 2.0])), "shapes"),
        (broken_scores(popularity=np.array([1.0, 250.0, 2.0])), "outside 0..100"),
        (broken_scores(hit_probability=np.array([0.1, -0.5, 0.2])), "outside 0..1"),
    ],
)
def test_bad_outputs_fail_the_self_test(
    serving: Scorer, monkeypatch: pytest.MonkeyPatch, scores: Scores, why: str
) -> None:
    monkeypatch.setattr(serving, "score", lambda *_args: scores)
    assert why in (self_test(serving) or "")


def test_an_artifact_that_raises_fails_the_self_test(
    serving: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raises(*_args: object) -> Scores:
        raise RuntimeError("The following operation failed in the TorchScript interpreter.")

    monkeypatch.setattr(serving, "score", raises)
    assert self_test(serving) == (
        "self-test raised RuntimeError: The following operation failed in the TorchScript "
        "interpreter."
    )


def test_the_built_in_batch_has_silence_noise_and_missing_features(
    serving: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    real = serving.score
    monkeypatch.setattr(serving, "score", lambda *a: seen.append(a) or real(*a))
    assert self_test(serving) is None
    waves, feats, mask = seen[0]
    assert waves.shape == (3, serving.meta.clip_samples) and mask.all()
    assert not waves[0].any() and waves[1].std() > 0.1
    assert feats.shape == (3, len(serving.meta.features))
    assert not np.isnan(feats[0]).any() and np.isnan(feats[1]).all() and np.isnan(feats[2]).any()


@pytest.mark.parametrize(
    ("model", "clip", "differs"),
    [
        ({"rate": RATE * 2}, CLIP, "sample_rate 8000 -> 16000"),
        ({}, CLIP / 2, "clip_seconds 2.0 -> 1.0"),
        ({"use_audio": False}, CLIP, "listens True -> False"),
    ],
)
def test_other_audio_input_is_incompatible(
    serving: Scorer, tmp_path: Path, model: dict[str, Any], clip: float, differs: str
) -> None:
    path = export(net(**model), tmp_path / "m.pt", "tiny-test-2", clip)
    candidate = Scorer(path, "cpu")
    assert differs in (incompatibility(serving, candidate) or "")
    verdict = vet(path, "cpu", serving)
    assert verdict.outcome == "refused" and verdict.scorer is None
    assert differs in verdict.detail and "restart" in verdict.detail


def test_other_features_and_weights_are_compatible(serving: Scorer, tmp_path: Path) -> None:
    path = export(net(), tmp_path / "m.pt", "tiny-test-2", CLIP)
    verdict = vet(path, "cpu", serving)
    assert verdict.outcome == "loaded" and verdict.detail == "tiny-test -> tiny-test-2"
    assert verdict.scorer is not None and verdict.scorer.meta.model_version == "tiny-test-2"


def test_a_loaded_model_is_warmed_up_at_the_serving_batch_before_the_swap(
    serving: Scorer, tmp_path: Path
) -> None:
    """On CUDA the app asks for it: the new model's first batches then do not pay for
    TorchScript's profiling runs and the fuser (its staging buffer holds the serving shape)."""
    path = export(net(), tmp_path / "m.pt", "tiny-test-2", CLIP)
    verdict = vet(path, "cpu", serving, warm_batch=5)
    assert verdict.outcome == "loaded" and "warmed up at batch 5" in verdict.detail
    assert verdict.scorer is not None and len(verdict.scorer._staging._host["wave"]) == 5
    cold = vet(path, "cpu", serving)
    assert cold.scorer is not None and "warmed" not in cold.detail


def test_a_candidate_is_optimised_as_the_serving_model_was_asked_to_be(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export(net(), tmp_path / "m.pt", "tiny-test-2", CLIP)
    on, off = Scorer(artifact, "cpu"), Scorer(artifact, "cpu", optimize=False)
    assert vet(path, "cpu", on).scorer.optimized  # type: ignore[union-attr]
    plain = vet(path, "cpu", off)
    assert plain.scorer is not None and not plain.scorer.optimize and not plain.scorer.optimized
    assert "optimised" not in plain.detail
    # Asked for but refused by the probe: the reload says so.
    monkeypatch.setitem(optimize.TOLERANCES, "popularity", -1.0)
    refused = vet(path, "cpu", on)
    assert refused.outcome == "loaded" and "not optimised for CPU" in refused.detail


@pytest.mark.parametrize(
    ("content", "why"),
    [(os.urandom(4096), "cannot load model artifact"), (None, "does not exist")],
)
def test_a_broken_or_missing_file_is_refused(
    serving: Scorer, tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    verdict = vet(path, "cpu", serving)
    assert verdict.outcome == "refused" and verdict.scorer is None
    assert verdict.detail.startswith("cannot load: ") and why in verdict.detail


def test_the_same_version_is_kept(serving: Scorer, artifact: Path) -> None:
    verdict = vet(artifact, "cpu", serving)
    assert verdict.outcome == "unchanged" and verdict.scorer is None


# --- the reloader on the main loop ------------------------------------------------------------


Pools = tuple[ThreadPoolExecutor, ThreadPoolExecutor]  # the loader thread, the device stage


@pytest.fixture
def pools() -> Iterator[Pools]:
    loader, stage = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    yield loader, stage
    loader.shutdown()
    stage.shutdown()


def reloader_for(
    path: Path, serving: Scorer, pools: Pools
) -> tuple[Reloader, list[Scorer], Metrics]:
    swapped: list[Scorer] = []
    metrics = Metrics()
    loader, stage = pools
    reloader = Reloader(path, "cpu", serving, loader=loader, stage=stage, swap=swapped.append,
                        metrics=metrics)  # fmt: skip
    return reloader, swapped, metrics


def settle(reloader: Reloader, timeout_s: float = 60.0) -> None:
    """Poll as the main loop does until the reload in hand is done (and its swap ran)."""
    deadline = time.monotonic() + timeout_s
    while reloader._job is not None or reloader._requested:
        assert time.monotonic() < deadline, "reload did not finish"
        swap = reloader.poll()
        if swap is not None:
            swap.result(timeout=10)
        time.sleep(0.01)


def reloads(metrics: Metrics, outcome: str) -> float | None:
    return metrics.registry.get_sample_value("popscore_model_reloads_total", {"outcome": outcome})


def test_nothing_happens_unasked(serving: Scorer, artifact: Path, pools: Pools) -> None:
    reloader, swapped, metrics = reloader_for(artifact, serving, pools)
    assert reloader.poll() is None and reloader._job is None
    assert swapped == [] and reloads(metrics, "loaded") == reloads(metrics, "refused") == 0


def test_a_new_version_is_swapped_in_behind_the_batches_submitted_before(
    serving: Scorer, artifact: Path, tmp_path: Path, pools: Pools
) -> None:
    path = tmp_path / "model.pt"
    os.link(artifact, path)
    loader, stage = pools
    order: list[str] = []
    metrics = Metrics()
    swap = lambda new: order.append(f"swap to {new.meta.model_version}")  # noqa: E731
    reloader = Reloader(path, "cpu", serving, loader=loader, stage=stage, swap=swap,
                        metrics=metrics)  # fmt: skip
    os.replace(new_version(artifact, tmp_path / "new.pt"), path)
    gate = threading.Event()
    stage.submit(lambda: gate.wait(30) and order.append("batch 1"))  # still on the device
    reloader.request()
    swapped = None
    while swapped is None:
        swapped = reloader.poll()
        time.sleep(0.01)
    stage.submit(lambda: order.append("batch 2"))
    gate.set()
    swapped.result(timeout=10)
    stage.submit(lambda: None).result(timeout=10)
    assert order == ["batch 1", "swap to tiny-test-2", "batch 2"]
    assert reloader.serving.meta.model_version == "tiny-test-2"
    assert (reloads(metrics, "loaded"), reloads(metrics, "refused")) == (1, 0)


def test_a_refused_artifact_leaves_the_old_one_serving(
    serving: Scorer, tmp_path: Path, pools: Pools, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a zip archive")
    reloader, swapped, metrics = reloader_for(path, serving, pools)
    reloader.request()
    settle(reloader)
    assert swapped == [] and reloader.serving is serving
    assert (reloads(metrics, "loaded"), reloads(metrics, "refused")) == (0, 1)
    [line] = [r for r in caplog.records if r.name == "consumer.reload"]
    assert line.levelname == "ERROR"
    assert line.getMessage().startswith("model reload refused, tiny-test serves on: cannot load")


def test_a_request_during_a_load_reloads_again_after_it(
    serving: Scorer, artifact: Path, pools: Pools
) -> None:
    reloader, _swapped, metrics = reloader_for(artifact, serving, pools)
    reloader.request()
    reloader.poll()  # the first load starts
    reloader.request()
    settle(reloader)
    assert reloads(metrics, "unchanged") == 2


# --- watching the file ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_fires_once_per_settled_change(artifact: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    os.link(artifact, path)
    clock = Clock()
    watch = FileWatch(path, 5.0, clock)
    clock.now = 5.0
    assert not watch.changed()
    os.replace(new_version(artifact, tmp_path / "new.pt"), path)
    clock.now = 6.0
    assert not watch.changed(), "not before the interval"
    clock.now = 10.0
    assert not watch.changed(), "changed, but maybe still being written"
    clock.now = 15.0
    assert watch.changed(), "the same for one interval"
    clock.now = 20.0
    assert not watch.changed(), "once"


def test_the_watch_waits_for_a_missing_file_to_come_back(artifact: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    os.link(artifact, path)
    clock = Clock()
    watch = FileWatch(path, 1.0, clock)
    path.unlink()
    for clock.now in (1.0, 2.0, 3.0):
        assert not watch.changed()
    new_version(artifact, path)
    clock.now = 4.0
    assert not watch.changed()
    clock.now = 5.0
    assert watch.changed()
