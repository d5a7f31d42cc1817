"""Audio decoded with FFmpeg: MP4/M4A (AAC, ALAC), WebM (Opus), Matroska — the same window as
libsndfile would give, under the same limits, and nothing but the one file read."""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from consumer import ffmpeg, ffmpeg_sandbox
from consumer.audio import AudioPolicy, decode_window, load_clip
from consumer.errors import DeadLetter
from consumer.resample import Resampler
from schemas.dead_letter import DeadLetterReason as Reason
from tests.unit.av_helpers import declaring, encode

RATE = 48_000
SECONDS = 12
WINDOW_S = 4.0
LOSSLESS = ("alac.m4a", "mka")
LOSSY = ("m4a", "webm")


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """Stereo noise, its two channels different, so a window off by one sample would show;
    low-passed (a 16-tap box, ~3 kHz), where lossy codecs keep the waveform."""
    white = np.random.default_rng(3).standard_normal((2, RATE * SECONDS))
    box = np.ones(16) / 16
    return np.stack([np.convolve(ch, box, "same") * 0.4 for ch in white]).astype(np.float32)


@pytest.fixture(scope="module")
def reference(noise: np.ndarray) -> np.ndarray:
    """The window libsndfile decodes from the same samples as a float WAV."""
    body = io.BytesIO()
    sf.write(body, noise.T, RATE, format="WAV", subtype="FLOAT")
    return decode_window(body.getvalue(), WINDOW_S, AudioPolicy.create(())).samples


def lag_and_correlation(window: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """The shift (in samples, within ±2,048) that best aligns ``window`` on ``reference``, and
    their correlation there."""
    middle = slice(4_096, len(reference) - 4_096)
    part = reference[middle]
    lags = range(-2_048, 2_049)
    scores = [float(np.dot(window[middle.start + k : middle.stop + k], part)) for k in lags]
    lag = lags[int(np.argmax(scores))]
    shifted = window[middle.start + lag : middle.stop + lag]
    return lag, float(np.corrcoef(shifted, part)[0, 1])


@pytest.mark.parametrize("name", LOSSLESS + LOSSY)
@pytest.mark.parametrize("where", ["file", "memory"])
def test_each_container_gives_the_centred_window(
    tmp_path: Path, noise: np.ndarray, reference: np.ndarray, name: str, where: str
) -> None:
    data = encode(noise, RATE, name, tmp_path / f"a.{name}")
    source = open(tmp_path / f"a.{name}", "rb") if where == "file" else data  # noqa: SIM115
    clip = decode_window(source, WINDOW_S, AudioPolicy.create(()))
    assert clip.source_rate == RATE and len(clip.samples) == len(reference)
    assert clip.source_seconds == pytest.approx(SECONDS, abs=0.1)
    if name in LOSSLESS:
        np.testing.assert_allclose(clip.samples, reference, atol=1e-4)
        return
    lag, correlation = lag_and_correlation(clip.samples, reference)
    # Lossy codecs: the window within one codec frame of the centre (AAC's stated length holds
    # its 1,024 priming samples).
    assert abs(lag) <= 1_024, lag
    assert correlation > 0.8, correlation


def test_a_local_m4a_is_scored_through_the_uri_path(tmp_path: Path, noise: np.ndarray) -> None:
    encode(noise, RATE, "m4a", tmp_path / "a.m4a")
    policy = AudioPolicy.create((tmp_path,))
    wave = load_clip((tmp_path / "a.m4a").as_uri(), policy, Resampler(22_050, 2.0))
    assert wave.shape == (44_100,) and np.isfinite(wave).all() and np.abs(wave).max() > 0.05


def test_the_stated_length_is_checked_before_decoding(noise: np.ndarray) -> None:
    data = encode(noise, RATE, "m4a")
    with pytest.raises(DeadLetter) as excinfo:
        decode_window(data, WINDOW_S, AudioPolicy.create((), max_seconds=10))
    assert excinfo.value.reason is Reason.AUDIO_TOO_LONG


def test_a_rate_out_of_range_is_refused() -> None:
    quiet = np.zeros((1, 500 * 4), np.float32)
    with pytest.raises(DeadLetter) as excinfo:
        decode_window(encode(quiet, 500, "mka"), 1.0, AudioPolicy.create(()))
    assert excinfo.value.reason is Reason.AUDIO_DECODE_FAILED
    assert "sample rate 500 Hz" in excinfo.value.detail


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_cut_file_is_dead_lettered_or_decodes_what_is_there(
    noise: np.ndarray, cut: float
) -> None:
    for name in ("m4a", "webm", "alac.m4a"):
        data = encode(noise, RATE, name)
        try:
            clip = decode_window(data[: int(len(data) * cut)], WINDOW_S, AudioPolicy.create(()))
        except DeadLetter as exc:
            assert exc.reason is Reason.AUDIO_DECODE_FAILED
        else:
            assert 0 < len(clip.samples) <= WINDOW_S * RATE and np.isfinite(clip.samples).all()


def test_corrupt_files_are_dead_lettered_never_raised(noise: np.ndarray) -> None:
    """Bytes flipped all over MP4 and WebM files: each decodes or is dead-lettered."""
    rng = np.random.default_rng(11)
    outcomes = {"decoded": 0, "dead-lettered": 0}
    for name in ("m4a", "webm", "mka"):
        original = np.frombuffer(encode(noise[:, : RATE * 3], RATE, name), np.uint8)
        for _ in range(40):
            data = original.copy()
            spots = rng.integers(0, len(data), 1 + rng.integers(0, 64))
            data[spots] ^= rng.integers(1, 256, len(spots)).astype(np.uint8)
            try:
                decode_window(data.tobytes(), 2.0, AudioPolicy.create(()))
                outcomes["decoded"] += 1
            except DeadLetter as exc:
                assert exc.reason in (Reason.AUDIO_DECODE_FAILED, Reason.AUDIO_TOO_LONG)
                outcomes["dead-lettered"] += 1
    assert outcomes["decoded"] and outcomes["dead-lettered"], outcomes


def test_a_file_that_asks_to_open_another_is_refused(tmp_path: Path, noise: np.ndarray) -> None:
    """FFmpeg is only ever given one demuxer, none that opens other files; and should one try
    (a playlist, here forced), the open is refused."""
    encode(noise, RATE, "mka", tmp_path / "other.mka")
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:12\n#EXTINF:12,\n{tmp_path / 'other.mka'}\n"
    playlist += "#EXT-X-ENDLIST\n"
    with pytest.raises(DeadLetter) as excinfo:
        ffmpeg.decode_window(io.BytesIO(playlist.encode()), "hls", 2.0, lambda *_: None, 60.0)
    assert excinfo.value.reason is Reason.AUDIO_DECODE_FAILED
    assert ffmpeg.demuxer_for(playlist.encode()[:12]) is None


def test_containers_are_told_by_their_first_bytes() -> None:
    assert ffmpeg.demuxer_for(b"\x00\x00\x00\x20ftypM4A ") == "mov"
    assert ffmpeg.demuxer_for(b"\x1a\x45\xdf\xa3\x01\x00") == "matroska"
    for other in (b"\xff\xfb\x90\xc4", b"RIFF\x00\x00\x00\x00WAVE", b"OggS", b"fLaC", b"ID3\x04"):
        assert ffmpeg.demuxer_for(other) is None  # MP3, WAV, Ogg, FLAC, tags: libsndfile's


def test_raw_aac_which_states_no_length_is_refused(noise: np.ndarray) -> None:
    with pytest.raises(DeadLetter) as excinfo:
        decode_window(encode(noise, RATE, "aac"), WINDOW_S, AudioPolicy.create(()))
    assert excinfo.value.reason is Reason.AUDIO_DECODE_FAILED


def test_eight_channels_and_more_decode() -> None:
    """PyAV 18.1 reads a planar frame's planes past its pointers at 8+ channels (an ordinary
    7.1 AAC was a SIGSEGV): frames are converted to packed float before they are read."""
    seven_one = (np.random.default_rng(5).standard_normal((8, RATE * 3)) * 0.1).astype(np.float32)
    for name in ("m4a", "webm"):
        data = encode(seven_one, RATE, name, layout="7.1")
        window = decode_window(data, 1.0, AudioPolicy.create(())).samples
        assert len(window) == RATE and 0.01 < float(np.abs(window).max()) < 1.0


def test_a_file_declaring_millions_of_samples_costs_the_worker_not_the_service(
    tmp_path: Path,
) -> None:
    """FFmpeg builds an index entry per declared sample when it opens an MP4 (+243 MB for 20
    million in a 2 kB file, measured in-process): that happens in the worker, under its limit."""
    (tmp_path / "bomb.m4a").write_bytes(declaring(20_000_000))
    script = f"""
import resource, sys
from consumer.audio import AudioPolicy, decode_window
from consumer.errors import DeadLetter
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_window(open({str(tmp_path / "bomb.m4a")!r}, "rb"), 30.0, AudioPolicy.create(()))
except DeadLetter as exc:
    print(exc.reason.value)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
print("av" in sys.modules)
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    reason, grown_mb, ffmpeg_here = run.stdout.split()
    assert reason == "audio_decode_failed", run.stderr[-2000:]
    assert int(grown_mb) < 30 and ffmpeg_here == "False"  # FFmpeg never loads in the service


@pytest.fixture
def stalled() -> Iterator[int]:
    """A descriptor whose reads block (a pipe nobody writes): a decode that never ends."""
    read, write = os.pipe()
    yield read
    os.close(write)
    os.close(read)


def test_a_worker_that_dies_costs_its_file_alone(stalled: int, noise: np.ndarray) -> None:
    pool = ffmpeg_sandbox.pool()
    pool.close()  # no idle worker: the decode starts the one to kill
    before = set(pool.workers)

    def kill_the_new_worker() -> None:
        deadline = time.monotonic() + 30
        while not (new := pool.workers - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # it is reading the file
        for worker in new:
            os.kill(worker.proc.pid, signal.SIGSEGV)

    killer = threading.Thread(target=kill_the_new_worker)
    killer.start()
    with pytest.raises(DeadLetter) as excinfo:
        ffmpeg_sandbox.decode_window(stalled, 0, "mov", (2.0, 60.0))
    killer.join()
    assert excinfo.value.reason is Reason.AUDIO_DECODE_FAILED
    assert "died on this file (signal SIGSEGV)" in excinfo.value.detail
    window = decode_window(encode(noise, RATE, "m4a"), 1.0, AudioPolicy.create(())).samples
    assert len(window) == RATE  # the next file gets a new worker


def test_a_decode_past_its_time_is_stopped(stalled: int) -> None:
    pool = ffmpeg_sandbox.pool()
    started = time.monotonic()
    with pytest.raises(DeadLetter) as excinfo:
        limits = ffmpeg_sandbox.Limits(timeout_s=1.5)
        ffmpeg_sandbox.decode_window(stalled, 0, "matroska", (2.0, 60.0), limits)
    assert "took over 1.5 s on this file; stopped" in excinfo.value.detail
    assert time.monotonic() - started < 10
    assert all(worker.alive() for worker in pool.workers)  # the stopped one is gone


def address_space_limit(pid: int) -> int:
    """A process's soft RLIMIT_AS in MB, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            return int(line.split()[3]) >> 20
    raise AssertionError("no address space line")


def test_the_memory_limit_is_each_file_s_own(noise: np.ndarray) -> None:
    """The limit is the policy's, set for each file: one worker decodes a file held to 400 MB,
    then the next under the default 1024 MB."""
    pool = ffmpeg_sandbox.pool()
    pool.close()  # one worker for both files
    data = encode(noise, RATE, "m4a")
    tight = AudioPolicy.create((), ffmpeg_limits=ffmpeg_sandbox.Limits(memory_mb=400))
    for policy, limit in ((tight, 400), (AudioPolicy.create(()), 1024)):
        assert len(decode_window(data, 1.0, policy).samples) == RATE
        [worker] = pool.workers
        assert address_space_limit(worker.proc.pid) == limit


def test_the_oom_killer_takes_a_worker_before_the_service(noise: np.ndarray) -> None:
    decode_window(encode(noise, RATE, "m4a"), 1.0, AudioPolicy.create(()))
    for worker in ffmpeg_sandbox.pool().workers:
        adj = Path(f"/proc/{worker.proc.pid}/oom_score_adj").read_text()
        assert adj.strip() == "1000"
    assert Path("/proc/self/oom_score_adj").read_text().strip() != "1000"


def test_uncompressed_audio_in_mp4_decodes(noise: np.ndarray) -> None:
    data = encode(noise, RATE, "pcm.mov")
    window = decode_window(data, WINDOW_S, AudioPolicy.create((), max_seconds=60)).samples
    assert len(window) == WINDOW_S * RATE


@pytest.mark.parametrize("where", ["file", "memory"])
def test_an_m4a_behind_an_id3_tag_or_with_bytes_after_it_decodes(
    tmp_path: Path, noise: np.ndarray, where: str
) -> None:
    m4a = encode(noise, RATE, "m4a")
    window = decode_window(m4a, WINDOW_S, AudioPolicy.create(())).samples
    id3v2 = b"ID3\x04\x00\x00\x00\x00\x00\x14" + bytes(20)
    id3v1 = b"TAG" + bytes(125)
    for data in (id3v2 + m4a, m4a + b"\x00\x00\x00", m4a + id3v1):
        (tmp_path / "a.m4a").write_bytes(data)
        source = open(tmp_path / "a.m4a", "rb") if where == "file" else data  # noqa: SIM115
        np.testing.assert_array_equal(
            decode_window(source, WINDOW_S, AudioPolicy.create(())).samples, window
        )


@pytest.mark.parametrize("rate", [44_100, 48_000])
def test_matroska_windows_follow_frames_not_millisecond_timestamps(rate: int) -> None:
    """Matroska's timestamps are milliseconds: 1,024-sample frames at 44.1 kHz start at
    rounded times, and taking those as positions dropped or repeated samples."""
    audio = (np.random.default_rng(9).standard_normal((1, rate * 6)) * 0.1).astype(np.float32)
    data = encode(audio, rate, "mka", frame_size=1_024)
    window = decode_window(data, 2.0, AudioPolicy.create(())).samples
    start = (rate * 6 - 2 * rate) // 2
    np.testing.assert_allclose(window, audio[0, start : start + 2 * rate], atol=1e-4)


def two_files(noise: np.ndarray) -> tuple[bytes, bytes]:
    return encode(noise, RATE, "mka"), encode(noise[:, ::-1].copy(), RATE, "mka")


def test_a_wait_cut_short_never_hands_the_next_file_an_old_answer(
    noise: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while a thread waits for its worker (KeyboardInterrupt where decoding runs
    on the main thread) left the answer in the socket, and every later file got the one
    before it: the worker is stopped instead."""
    ffmpeg_sandbox.pool().close()  # one worker from here: the one the wait is cut short on
    first, second = two_files(noise)
    policy = AudioPolicy.create(())
    windows = [decode_window(data, 1.0, policy).samples for data in (first, second)]
    assert not np.array_equal(*windows)
    real = socket.recv_fds

    def interrupted(*args: object) -> object:
        monkeypatch.setattr(socket, "recv_fds", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(socket, "recv_fds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decode_window(first, 1.0, policy)
    for data, window in zip((second, first), windows[::-1], strict=True):
        np.testing.assert_array_equal(decode_window(data, 1.0, policy).samples, window)


def test_a_file_whose_idle_worker_died_goes_to_another(noise: np.ndarray) -> None:
    """Killed while idle (the OOM killer, an operator) just before a file is handed to it: the
    file never reached it, so it goes to a new worker (it raised BrokenPipeError, and the
    record was dead-lettered internal_error)."""
    pool = ffmpeg_sandbox.pool()
    data = encode(noise, RATE, "mka")
    for _ in range(5):
        decode_window(data, 1.0, AudioPolicy.create(()))  # a worker, idle now
        for worker in list(pool.workers):
            os.kill(worker.proc.pid, signal.SIGKILL)  # not reaped: it still looks alive
        assert len(decode_window(data, 1.0, AudioPolicy.create(())).samples) == RATE
