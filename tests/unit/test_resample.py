"""The decode pool's resampler (libsoxr): Resampler's contract, and accuracy against an exact
reference (the test tones of ``popscore.bench.resampler``)."""

import numpy as np
import pytest
import torch

from consumer.errors import DeadLetter
from consumer.resample import BatchResampler, Clip, Resampler
from consumer.soxr_resample import SoxrResampler
from popscore.bench.resampler import ENGINES, quality
from schemas.dead_letter import DeadLetterReason as Reason

TARGET = 22_050


@pytest.mark.parametrize(("rate", "n"), [(44_100, 44_100 * 3), (48_000, 30_000), (TARGET, TARGET),
                                         (16_000, 16_000 * 2), (44_100, 7)])  # fmt: skip
def test_every_clip_comes_out_exactly_clip_samples_long_in_float32(rate: int, n: int) -> None:
    clip = Clip(
        (0.1 * np.random.default_rng(0).standard_normal(n)).astype(np.float32), rate, n / rate
    )
    wave = SoxrResampler(TARGET, 2.0)(clip)
    assert wave.shape == (2 * TARGET,) and wave.dtype == np.float32
    expected = min(2 * TARGET, round(n * TARGET / rate))
    assert np.all(wave[expected + 1 :] == 0), "a short clip is zero-padded at the end"


@pytest.mark.parametrize("rate", [44_101, 47_999])
def test_the_rates_the_device_path_refuses_are_refused_here_too(rate: int) -> None:
    with pytest.raises(DeadLetter) as caught:
        SoxrResampler(TARGET, 1.0)(Clip(np.zeros(rate, dtype=np.float32), rate, 1.0))
    assert caught.value.reason is Reason.AUDIO_DECODE_FAILED


@pytest.mark.parametrize("rate", [44_100, 48_000, 32_000, 16_000])
def test_soxr_is_within_70_db_of_the_exact_resampled_tones(rate: int) -> None:
    measured = quality(ENGINES["soxr_HQ"], rate)
    assert measured["snr_db"] >= 70
    assert measured.get("alias_db", -999) <= -70


def test_soxr_and_torchaudio_agree_on_what_the_model_hears() -> None:
    """Music-like content well inside the pass band: the device path (torchaudio, batched) and
    the pool path (libsoxr) give the same window to within 1 % of its amplitude."""
    rng = np.random.default_rng(1)
    t = np.arange(44_100 * 2) / 44_100
    tones = sum(
        0.1 * np.sin(2 * np.pi * f * t + p) for f, p in rng.uniform((60, 0), (6000, 6), (12, 2))
    )
    clip = Clip(tones.astype(np.float32), 44_100, 2.0)
    pool = SoxrResampler(TARGET, 2.0)(clip)
    device = BatchResampler(TARGET, 2.0, torch.device("cpu"))([clip])[0].numpy()
    middle = slice(TARGET // 10, -TARGET // 10)
    assert np.max(np.abs(pool[middle] - device[middle])) < 0.01 * np.max(np.abs(pool))
    np.testing.assert_allclose(device, Resampler(TARGET, 2.0)(clip), atol=1e-6)
