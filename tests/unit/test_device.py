"""The device stage and the pipeline over a real (untrained, small) exported artifact."""

import json
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer.audio import AudioPolicy
from consumer.device import Scorer, Scores, pick_device
from consumer.errors import DeadLetter, DeviceFailure, DeviceUnavailable
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from popscore.artifact import ArtifactError
from popscore.artifact.features import DEFAULT_FEATURES, extract
from popscore.training.model import FusionNet
from schemas import ReleaseEvent, ScoreRecord
from schemas.dead_letter import DeadLetterReason as Reason
from tests.unit.artifact_helpers import export
from tests.unit.conftest import CLIP, RATE

LATER_KEYS = ("exports", "uses_audio")  # metadata keys artifacts written before them lack

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


def inputs(batch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    waves = (0.3 * rng.standard_normal((batch, int(RATE * CLIP)))).astype(np.float32)
    feats = (rng.random((batch, len(DEFAULT_FEATURES))) * 50).astype(np.float32)
    feats[0, 3] = np.nan  # a missing feature is imputed inside the artifact
    return waves, feats, np.ones(batch, dtype=bool)


@pytest.mark.parametrize("device", DEVICES)
class TestScorer:
    def test_scores_are_in_range_and_finite(self, artifact: Path, device: str) -> None:
        scores = Scorer(artifact, device).score(*inputs(5))
        assert scores.popularity.shape == (5,) and scores.hit_probability.shape == (5,)
        assert np.isfinite(scores.popularity).all()
        assert ((scores.popularity >= 0) & (scores.popularity <= 100)).all()
        assert ((scores.hit_probability >= 0) & (scores.hit_probability <= 1)).all()

    def test_batched_equals_item_by_item(self, artifact: Path, device: str) -> None:
        scorer = Scorer(artifact, device)
        waves, feats, mask = inputs(6)
        batched = scorer.score(waves, feats, mask)
        for i in range(6):
            one = scorer.score(waves[i : i + 1], feats[i : i + 1], mask[i : i + 1])
            assert one.popularity[0] == pytest.approx(batched.popularity[i], abs=1e-4)
            assert one.hit_probability[0] == pytest.approx(batched.hit_probability[i], abs=1e-5)

    def test_features_only_scoring_is_finite(self, artifact: Path, device: str) -> None:
        waves, feats, _ = inputs(3)
        scores = Scorer(artifact, device).score(waves, feats, np.zeros(3, dtype=bool))
        assert np.isfinite(scores.popularity).all()

    def test_frontend_is_timed_apart_and_changes_nothing(self, artifact: Path, device: str) -> None:
        scorer = Scorer(artifact, device)
        waves, feats, mask = inputs(4)
        scores = scorer.score(waves, feats, mask)
        assert scorer.staged and scores.frontend_s is not None
        assert 0 < scores.frontend_s < scores.total_s
        with torch.inference_mode():
            tensors = [torch.from_numpy(a).to(scorer.device) for a in (waves, feats, mask)]
            whole, _ = scorer.module(*tensors)
        np.testing.assert_allclose(scores.popularity, whole.cpu().numpy(), atol=1e-4)

    def test_rows_scored_through_the_staging_buffer_equal_the_stacked_batch(
        self, artifact: Path, device: str
    ) -> None:
        scorer = Scorer(artifact, device)
        waves, feats, mask = inputs(4)
        stacked = scorer.score(waves, feats, mask)
        rows = scorer.score(list(waves), list(feats), list(mask))
        np.testing.assert_array_equal(rows.popularity, stacked.popularity)
        np.testing.assert_array_equal(rows.hit_probability, stacked.hit_probability)

    def test_the_staging_buffer_is_reused_and_a_batch_never_sees_the_last_ones(
        self, artifact: Path, device: str
    ) -> None:
        """One host buffer for every batch (pinned on CUDA): no fresh 85 MB per batch, and a
        smaller batch after a larger one scores its own rows only."""
        scorer = Scorer(artifact, device)
        big, small = inputs(6, seed=2), inputs(3, seed=3)
        scorer.score(*big)
        held = scorer._staging.nbytes
        pointer = scorer._staging._host["wave"].data_ptr()
        again = scorer.score(*small)
        assert scorer._staging._host["wave"].data_ptr() == pointer
        assert scorer._staging.nbytes == held
        alone = Scorer(artifact, device).score(*small)  # a fresh scorer, fresh buffers
        np.testing.assert_array_equal(again.popularity, alone.popularity)
        if device == "cuda":
            assert scorer._staging._host["wave"].is_pinned()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save
def test_artifact_without_the_two_call_form_still_scores(artifact: Path, tmp_path: Path) -> None:
    """Artifacts built before spectrogram()/score_spectrogram() run as one forward()."""

    class ForwardOnly(torch.nn.Module):
        def __init__(self, inner: torch.jit.ScriptModule) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(waveform, features, audio_mask)

    scorer = Scorer(artifact, "cpu", optimize=False)  # a frozen module cannot be wrapped
    old = tmp_path / "old.pt"
    # metadata as written before `exports` and `uses_audio` existed
    legacy_meta = {k: v for k, v in scorer.meta.to_dict().items() if k not in LATER_KEYS}
    extra = {"popscore.json": json.dumps(legacy_meta)}
    torch.jit.save(torch.jit.script(ForwardOnly(scorer.module)), str(old), _extra_files=extra)
    legacy = Scorer(old, "cpu")
    assert not legacy.staged and legacy.optimized  # forward() alone is optimised too
    waves, feats, mask = inputs(3)
    scores = legacy.score(waves, feats, mask)
    assert scores.frontend_s is None
    np.testing.assert_allclose(scores.popularity, scorer.score(waves, feats, mask).popularity,
                               atol=1e-4)  # fmt: skip


def test_metadata_is_read(artifact: Path) -> None:
    meta = Scorer(artifact, "cpu").meta
    assert (meta.model_version, meta.sample_rate, meta.clip_seconds) == ("tiny-test", RATE, CLIP)
    assert meta.features == DEFAULT_FEATURES and meta.hit_threshold == 70.0


def test_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="make model"):
        Scorer(tmp_path / "none.pt", "cpu")


def test_not_an_artifact(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a torchscript zip")
    with pytest.raises(ArtifactError):
        Scorer(bogus, "cpu")


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_explicit_cuda_without_cuda_fails() -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA"):
        pick_device("cuda")


@pytest.fixture
def pipeline(artifact: Path, tmp_path: Path) -> Iterator[Pipeline]:
    with ThreadPoolExecutor(2) as pool:
        yield Pipeline(Scorer(artifact, "cpu"), AudioPolicy.create((tmp_path,)), pool, Metrics())


def event(i: int, uri: str) -> ReleaseEvent:
    return ReleaseEvent.model_validate(
        {
            "event_id": f"e{i}",
            "track_id": f"t{i}",
            "emitted_at": datetime.now(UTC),
            "audio_uri": uri,
            "artist": {"followers": 10 * i},
        },
        strict=False,
    )


def test_pipeline_scores_in_order_and_rejects_in_place(pipeline: Pipeline, tmp_path: Path) -> None:
    t = np.arange(3 * 44_100) / 44_100
    sf.write(tmp_path / "a.flac", (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44_100)
    good = (tmp_path / "a.flac").as_uri()
    events = [event(0, good), event(1, "file:///etc/passwd"), event(2, good)]
    outcomes = pipeline.score_events(events)
    assert isinstance(outcomes[0], ScoreRecord) and outcomes[0].event_id == "e0"
    assert isinstance(outcomes[1], DeadLetter) and outcomes[1].reason is Reason.URI_FORBIDDEN
    assert isinstance(outcomes[2], ScoreRecord) and outcomes[2].event_id == "e2"
    assert outcomes[0].model_version == "tiny-test" and outcomes[0].audio_used
    assert outcomes[0].is_hit == (outcomes[0].popularity >= 70.0)
    assert outcomes[0].latency_ms >= 0


def test_a_model_error_dead_letters_the_event_but_a_device_failure_fails_the_batch(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = np.arange(3 * 44_100) / 44_100
    sf.write(tmp_path / "a.flac", (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44_100)
    events = [event(i, (tmp_path / "a.flac").as_uri()) for i in range(2)]

    def broken(error: Exception):  # type: ignore[no-untyped-def]
        def score(*_args: object) -> None:
            raise error

        return score

    monkeypatch.setattr(pipeline.scorer, "score", broken(RuntimeError("shape mismatch")))
    outcomes = pipeline.score_events(events)
    assert all(isinstance(o, DeadLetter) and o.reason is Reason.INFERENCE_FAILED for o in outcomes)
    # A broken device is not the events' fault: no dead letters, the batch fails (and is
    # scored again after the restart, as nothing of it was committed).
    failure = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(pipeline.scorer, "score", broken(failure))
    with pytest.raises(DeviceFailure, match="illegal memory access"):
        pipeline.score_events(events)


class Faulty(torch.nn.Module):
    """Raises inside TorchScript, as a failing cuBLAS/cuFFT/NVRTC call or an OOM would: the
    interpreter re-raises it as a plain RuntimeError (torch.jit.Error)."""

    def __init__(self, message: str, from_rows: int) -> None:
        super().__init__()
        self.message = message
        self.from_rows = from_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) >= self.from_rows:
            raise RuntimeError(self.message)
        return x


def faulty_scorer(
    message: str, from_rows: int, real: Callable[..., Scores]
) -> Callable[..., Scores]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script
        scripted = torch.jit.script(Faulty(message, from_rows))

    def score(waves: np.ndarray, feats: np.ndarray, mask: np.ndarray) -> Scores:
        scripted(torch.from_numpy(np.ascontiguousarray(feats)))
        return real(waves, feats, mask)

    return score


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`",
        "cuFFT error: CUFFT_INTERNAL_ERROR",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
        "nvrtc: error: failed to open libnvrtc-builtins.so.13.0",
        "CUDA error: device-side assert triggered",
    ],
)
def test_a_sick_device_fails_the_batch_not_the_events(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    """Every event would be dead-lettered as inference_failed while the device stays broken;
    the batch fails instead (nothing committed), and the restart scores it again."""
    events = [event(i, tone_uri(tmp_path)) for i in range(3)]
    monkeypatch.setattr(pipeline.scorer, "score", faulty_scorer(message, 1, pipeline.scorer.score))
    with pytest.raises(DeviceFailure, match=message.split(":", maxsplit=1)[0]):
        pipeline.score_events(events)


def test_out_of_memory_splits_the_batch_and_fails_it_only_for_a_single_event(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oom = "CUDA out of memory. Tried to allocate 2.00 GiB"
    events = [event(i, tone_uri(tmp_path)) for i in range(4)]
    real = pipeline.scorer.score
    monkeypatch.setattr(pipeline.scorer, "score", faulty_scorer(oom, 3, real))  # 3+ rows fail
    outcomes = pipeline.score_events(events)
    assert all(isinstance(o, ScoreRecord) for o in outcomes), "halves of 2 fit"
    monkeypatch.setattr(pipeline.scorer, "score", faulty_scorer(oom, 1, real))  # nothing fits
    with pytest.raises(DeviceFailure, match="out of memory"):
        pipeline.score_events(events)


def tone_uri(folder: Path) -> str:
    t = np.arange(3 * 44_100) / 44_100
    sf.write(folder / "a.flac", (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44_100)
    return (folder / "a.flac").as_uri()


def test_a_features_only_artifact_never_reads_the_audio(tmp_path: Path) -> None:
    """No audio branch: the URI is not fetched (not even checked), audio_used is false, and
    the score is the artifact's own for those features."""
    torch.manual_seed(0)
    net = FusionNet(use_audio=False, sample_rate=RATE, feature_dim=8, hidden=8)
    net.fit_normalizer(np.random.default_rng(0).random((32, len(DEFAULT_FEATURES))) * 100)
    path = export(net.eval(), tmp_path / "fo.pt", "fo", CLIP)
    metrics = Metrics()
    with ThreadPoolExecutor(2) as pool:
        scorer = Scorer(path, "cpu")
        pipeline = Pipeline(scorer, AudioPolicy.create(()), pool, metrics)
        outcomes = pipeline.score_events([event(1, "file:///no/such.mp3"), event(2, "https://x/y")])
    assert all(isinstance(o, ScoreRecord) and not o.audio_used for o in outcomes)
    for stage in ("fetch", "decode"):
        assert metrics.registry.get_sample_value(
            "popscore_stage_seconds_count", {"stage": stage}
        ) in (None, 0.0)
    feats = torch.from_numpy(np.stack([extract(event(i, "x:").model_dump(), scorer.meta.features)
                                       for i in (1, 2)]))  # fmt: skip
    with torch.inference_mode():
        expected, _ = net(torch.zeros(2, 1), feats, torch.zeros(2, dtype=torch.bool))
    got = [o.popularity for o in outcomes if isinstance(o, ScoreRecord)]
    np.testing.assert_allclose(got, expected.clamp(0, 100).numpy(), atol=1e-4)


def test_resampling_on_the_device_scores_as_on_the_pool(artifact: Path, tmp_path: Path) -> None:
    """POPSCORE_RESAMPLE_ON=device (the CUDA default) gives the pool's scores, for clips of
    several source rates and lengths in one batch, and its time counts as frontend."""
    rng = np.random.default_rng(4)
    uris = []
    for name, rate, seconds in [("a.flac", 44_100, 3.0), ("b.wav", 48_000, 1.5),
                                ("c.wav", RATE, 2.0), ("d.flac", 44_100, 0.7)]:  # fmt: skip
        path = tmp_path / name
        sf.write(path, (0.3 * rng.standard_normal(int(rate * seconds))).astype(np.float32), rate)
        uris.append(path.as_uri())
    events = [event(i, uri) for i, uri in enumerate(uris)]
    scorer, policy = Scorer(artifact, "cpu"), AudioPolicy.create((tmp_path,))
    outcomes = {}
    with ThreadPoolExecutor(2) as pool:
        for where in ("pool", "device"):
            metrics = Metrics()
            pipeline = Pipeline(scorer, policy, pool, metrics, resample_on=where)
            assert (pipeline.batch_resampler is None) == (where == "pool")
            outcomes[where] = pipeline.score_events(events)
            frontend = metrics.registry.get_sample_value(
                "popscore_stage_seconds_count", {"stage": "frontend"}
            )
            assert frontend == 1.0
    # Not bit for bit: the pool resamples with libsoxr, the device with torchaudio's kernel
    # (BatchResampler equals torchaudio's per-item Resampler exactly: test_audio); the two
    # differ near the top of the band only (docs/PERFORMANCE.md, "Resampling").
    for pooled, batched in zip(outcomes["pool"], outcomes["device"], strict=True):
        assert isinstance(pooled, ScoreRecord) and isinstance(batched, ScoreRecord)
        assert batched.popularity == pytest.approx(pooled.popularity, abs=0.05)
        assert batched.hit_probability == pytest.approx(pooled.hit_probability, abs=0.005)


def test_auto_resamples_on_the_pool_on_cpu(pipeline: Pipeline) -> None:
    assert pipeline.batch_resampler is None


def test_an_odd_sample_rate_is_refused_on_the_pool_when_resampling_on_device(
    artifact: Path, tmp_path: Path
) -> None:
    sf.write(tmp_path / "odd.wav", np.zeros(44_101, dtype=np.float32), 44_101)
    sf.write(tmp_path / "ok.wav", np.zeros(44_100, dtype=np.float32), 44_100)
    events = [event(0, (tmp_path / "odd.wav").as_uri()), event(1, (tmp_path / "ok.wav").as_uri())]
    with ThreadPoolExecutor(2) as pool:
        pipeline = Pipeline(Scorer(artifact, "cpu"), AudioPolicy.create((tmp_path,)), pool,
                            Metrics(), resample_on="device")  # fmt: skip
        odd, ok = pipeline.score_events(events)
    assert isinstance(odd, DeadLetter) and odd.reason is Reason.AUDIO_DECODE_FAILED
    assert isinstance(ok, ScoreRecord)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_usable_cores_follow_the_cgroup_quota(
    cpu_max: str, expected: int | None, tmp_path: Path
) -> None:
    from consumer.device import usable_cores

    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(path) == (affinity if expected is None else min(affinity, expected))
    assert usable_cores(tmp_path / "missing") == affinity


def test_warm_up_runs_the_serving_shape_and_changes_no_score(artifact: Path) -> None:
    scorer = Scorer(artifact, "cpu")
    waves = (0.1 * np.random.default_rng(0).standard_normal((3, int(RATE * CLIP)))).astype(
        np.float32
    )
    feats = np.zeros((3, len(scorer.meta.features)), dtype=np.float32)
    mask = np.ones(3, dtype=bool)
    before = scorer.score(waves, feats, mask)
    assert scorer.warm_up(4) > 0
    after = scorer.score(waves, feats, mask)
    np.testing.assert_allclose(after.popularity, before.popularity, atol=1e-5)
