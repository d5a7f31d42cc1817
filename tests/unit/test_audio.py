"""Audio intake: every format and rate, window and pad, and the URI policy's refusals."""

import errno
import functools
import gzip
import os
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer import audio, resample
from consumer.audio import AudioPolicy, decode_window, load_clip, open_uri, tls_context
from consumer.errors import DeadLetter
from consumer.resample import BatchResampler, Clip, Resampler, check_resample_rate
from schemas.dead_letter import DeadLetterReason as Reason

TARGET = 22_050
AUDIO_BLOCK_MB = 65_536 * 8 * 4 / 2**20  # one block of 8 channels as float32
SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def write(path: Path, audio: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> Path:
    with sf.SoundFile(path, "w", rate, audio.shape[1], subtype or SUBTYPES[fmt], format=fmt) as f:
        for start in range(0, len(audio), rate):  # 1 s blocks: libsndfile's Vorbis encoder
            f.write(audio[start : start + rate])  # crashes on one long write
    return path


def tone(seconds: float, rate: int, channels: int = 1, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * hz * t).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


@pytest.fixture
def policy(tmp_path: Path) -> AudioPolicy:
    return AudioPolicy.create((tmp_path,), max_bytes=5_000_000, max_seconds=60)


def reason_of(excinfo: pytest.ExceptionInfo[DeadLetter]) -> Reason:
    return excinfo.value.reason


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
@pytest.mark.parametrize("rate", [22_050, 44_100, 48_000])
def test_each_format_and_rate_decodes_to_the_target_clip(
    tmp_path: Path, policy: AudioPolicy, fmt: str, rate: int
) -> None:
    path = write(tmp_path / f"a.{fmt.lower()}", tone(3.0, rate, channels=2), rate, fmt)
    wave = load_clip(path.as_uri(), policy, Resampler(TARGET, 2.0))
    assert wave.shape == (2 * TARGET,) and wave.dtype == np.float32
    assert np.isfinite(wave).all()
    # A 0.5-amplitude sine has RMS 0.354; lossy codecs and resampling keep it within 15 %.
    assert np.sqrt(np.mean(wave**2)) == pytest.approx(0.354, rel=0.15)


def test_stereo_is_averaged_to_mono(tmp_path: Path, policy: AudioPolicy) -> None:
    left_only = np.zeros((TARGET, 2), np.float32)
    left_only[:, 0] = 0.8
    path = write(tmp_path / "s.wav", left_only, TARGET, "WAV", "FLOAT")
    clip = decode_window(path, 1.0, policy)
    assert np.allclose(clip.samples, 0.4)


def test_long_track_decodes_only_the_centred_window(tmp_path: Path, policy: AudioPolicy) -> None:
    seconds, rate = 10.0, 8_000
    ramp = (np.arange(int(seconds * rate), dtype=np.float32) / (seconds * rate))[:, None]
    path = write(tmp_path / "ramp.wav", ramp, rate, "WAV", "FLOAT")
    clip = decode_window(path, 2.0, policy)
    assert clip.samples.shape == (2 * rate,)
    assert clip.samples[0] == pytest.approx(0.4, abs=1e-4)  # starts at (10 - 2) / 2 = 4 s
    assert clip.samples[-1] == pytest.approx(0.6, abs=1e-3)
    assert clip.source_seconds == pytest.approx(10.0)


@pytest.mark.parametrize("fmt", ["MP3", "OGG", "FLAC"])
def test_window_of_compressed_formats_is_the_middle(
    tmp_path: Path, policy: AudioPolicy, fmt: str
) -> None:
    rate = 22_050
    quiet, loud = tone(4.0, rate) * 0.02, tone(2.0, rate)
    path = write(tmp_path / f"w.{fmt.lower()}", np.concatenate([quiet, loud, quiet]), rate, fmt)
    clip = decode_window(path, 1.0, policy)  # the middle second is loud
    assert np.sqrt(np.mean(clip.samples**2)) > 0.25


def test_short_clip_is_zero_padded_at_the_end(tmp_path: Path, policy: AudioPolicy) -> None:
    path = write(tmp_path / "short.wav", tone(1.0, TARGET), TARGET, "WAV")
    wave = load_clip(path.as_uri(), policy, Resampler(TARGET, 3.0))
    assert wave.shape == (3 * TARGET,)
    assert np.abs(wave[: TARGET - 10]).max() > 0.4
    assert not wave[TARGET + 10 :].any()


def test_resampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Resampler(0, 1.0)


@pytest.mark.parametrize("uri", ["gs://bucket/a.mp3", "ftp://host/a.mp3", "a.mp3"])
def test_unknown_scheme_is_unsupported(policy: AudioPolicy, uri: str) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, policy)
    assert reason_of(info) is Reason.URI_UNSUPPORTED


def test_file_outside_the_roots_is_forbidden(tmp_path: Path, policy: AudioPolicy) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri("file:///etc/passwd", policy)
    assert reason_of(info) is Reason.URI_FORBIDDEN


def test_dot_dot_escape_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write(tmp_path / "secret.wav", tone(1, TARGET), TARGET, "WAV")
    policy = AudioPolicy.create((root,))
    with pytest.raises(DeadLetter) as info:
        open_uri(f"file://{root}/../secret.wav", policy)
    assert reason_of(info) is Reason.URI_FORBIDDEN


def test_symlink_escape_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = write(tmp_path / "outside.wav", tone(1, TARGET), TARGET, "WAV")
    (root / "link.wav").symlink_to(target)
    with pytest.raises(DeadLetter) as info:
        open_uri((root / "link.wav").as_uri(), AudioPolicy.create((root,)))
    assert reason_of(info) is Reason.URI_FORBIDDEN


def test_no_roots_means_file_uris_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", tone(1, TARGET), TARGET, "WAV")
    with pytest.raises(DeadLetter) as info:
        open_uri(path.as_uri(), AudioPolicy.create(()))
    assert reason_of(info) is Reason.URI_FORBIDDEN


def test_missing_file_is_a_fetch_failure(tmp_path: Path, policy: AudioPolicy) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri((tmp_path / "nope.mp3").as_uri(), policy)
    assert reason_of(info) is Reason.AUDIO_FETCH_FAILED


def test_file_over_the_byte_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", tone(2, TARGET), TARGET, "WAV")
    with pytest.raises(DeadLetter) as info:
        open_uri(path.as_uri(), AudioPolicy.create((tmp_path,), max_bytes=1000))
    assert reason_of(info) is Reason.AUDIO_TOO_LARGE


def test_audio_over_the_duration_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "a.flac", tone(3, 8_000), 8_000, "FLAC")
    policy = AudioPolicy.create((tmp_path,), max_seconds=2.0)
    with pytest.raises(DeadLetter) as info:
        decode_window(path, 1.0, policy)
    assert reason_of(info) is Reason.AUDIO_TOO_LONG


@pytest.mark.parametrize("content", [b"", b"this is not audio at all" * 100, b"RIFF\x00\x00"])
def test_undecodable_bytes(tmp_path: Path, policy: AudioPolicy, content: bytes) -> None:
    path = tmp_path / "bad.mp3"
    path.write_bytes(content)
    with pytest.raises(DeadLetter) as info:
        decode_window(open_uri(path.as_uri(), policy), 1.0, policy)
    assert reason_of(info) is Reason.AUDIO_DECODE_FAILED


def test_truncated_flac_still_fails_cleanly_or_decodes(tmp_path: Path, policy: AudioPolicy) -> None:
    good = write(tmp_path / "a.flac", tone(3, TARGET), TARGET, "FLAC").read_bytes()
    try:
        clip = decode_window(good[: len(good) // 3], 1.0, policy)
    except DeadLetter as exc:
        assert exc.reason is Reason.AUDIO_DECODE_FAILED
    else:
        assert np.isfinite(clip.samples).all()


@pytest.fixture
def http_audio(tmp_path: Path) -> Iterator[str]:
    body = (write(tmp_path / "h.wav", tone(1, TARGET), TARGET, "WAV")).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.path = self.path.split("?", 1)[0]  # presigned-style queries are ignored
            if self.path == "/a.wav":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/slowdrip":  # a byte every 0.9 s
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(5):
                    time.sleep(0.9)
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
            elif self.path == "/stall":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                time.sleep(3)
            elif self.path.startswith("/slowhop/"):  # 0.4 s, then one hop nearer /a.wav
                time.sleep(0.4)
                left = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", f"/slowhop/{left - 1}" if left else "/a.wav")
                self.end_headers()
            elif self.path in ENCODED:  # (Content-Encoding, body)
                coding, data = ENCODED[self.path](body)
                self.send_response(200)
                self.send_header("Content-Encoding", coding)
                if not self.path.endswith("-junk"):  # else its end is the connection's
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/echo-encoding":  # what the client asked for, as the body
                asked = (self.headers.get("Accept-Encoding") or "").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(asked)))
                self.end_headers()
                self.wfile.write(asked)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/a.wav")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_fetch_and_redirect_when_private_hosts_allowed(http_audio: str) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=True)
    for path in ("/a.wav", "/moved"):
        wave = load_clip(http_audio + path, policy, Resampler(TARGET, 1.0))
        assert wave.shape == (TARGET,) and np.abs(wave).max() > 0.4


def _gzipped(data: bytes, layers: int) -> bytes:
    for _ in range(layers):
        data = gzip.compress(data, compresslevel=9)
    return data


@functools.cache
def _junk() -> bytes:
    return _gzipped(b"x", 1) + bytes(8 << 20)


@functools.cache
def _bomb(layers: int) -> bytes:
    return _gzipped(bytes(64 << 20), layers)


ENCODED: dict[str, Callable[[bytes], tuple[str, bytes]]] = {
    # 64 MiB of zeros: one gzip layer (65 kB sent), two (272 bytes sent)
    "/gzip-bomb": lambda _wav: ("gzip", _bomb(1)),
    "/nested-bomb": lambda _wav: ("gzip, gzip", _bomb(2)),
    "/gzip-stored": lambda wav: ("gzip", _gzipped(wav, 1)),  # S3 Content-Encoding: gzip
    "/deflate-stored": lambda wav: ("deflate", zlib.compress(wav)),
    "/gzip-cut": lambda wav: ("gzip", _gzipped(wav, 1)[:-100]),
    # two members (cat a.gz b.gz): both are the audio, not the first alone
    "/gzip-members": lambda wav: ("gzip", _gzipped(wav[:1000], 1) + _gzipped(wav[1000:], 1)),
    "/raw-deflate": lambda wav: ("deflate", _raw_deflate(wav)),
    # a small member, then 8 MiB of junk: counted against the limit, never held
    "/gzip-junk": lambda _wav: ("gzip", _junk()),
}


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("path", "reason", "detail"),
    [
        ("/gzip-bomb", Reason.AUDIO_TOO_LARGE, "over 1048576 bytes"),
        ("/nested-bomb", Reason.AUDIO_FETCH_FAILED, "content-encoding 'gzip, gzip' is not"),
        ("/gzip-cut", Reason.AUDIO_FETCH_FAILED, "the compressed body ends early"),
        ("/gzip-junk", Reason.AUDIO_TOO_LARGE, "over 1048576 bytes after the data"),
    ],
)
def test_a_compressed_body_is_inflated_only_within_the_byte_limit(
    http_audio: str, path: str, reason: Reason, detail: str
) -> None:
    """A few kB of gzip inflate to GBs inside one read: the body is inflated here, a bounded
    piece at a time, so the byte limit bounds what is held; layers on layers are refused."""
    policy = AudioPolicy.create((), allow_private_hosts=True, max_bytes=1 << 20)
    ENCODED[path](b"")  # the server's body built before the measure
    peak = tracemalloc_peak(lambda: _refused(http_audio + path, policy, reason, detail))
    assert peak < 4 << 20  # against 64 MiB held if it were inflated whole


def _refused(uri: str, policy: AudioPolicy, reason: Reason, detail: str) -> None:
    with pytest.raises(DeadLetter, match=detail) as info:
        open_uri(uri, policy)
    assert reason_of(info) is reason


@pytest.mark.parametrize(
    "path", ["/gzip-stored", "/deflate-stored", "/gzip-members", "/raw-deflate"]
)
def test_audio_stored_compressed_is_inflated_whole_and_decodes(http_audio: str, path: str) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=True)
    body = open_uri(http_audio + path, policy)
    assert body.read() == open_uri(http_audio + "/a.wav", policy).read()
    wave = load_clip(http_audio + path, policy, Resampler(TARGET, 1.0))
    assert wave.shape == (TARGET,) and np.abs(wave).max() > 0.4


def tracemalloc_peak(run: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fetches_ask_for_the_body_uncompressed(http_audio: str) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=True)
    assert open_uri(http_audio + "/echo-encoding", policy).read() == b"identity"


def test_fetches_share_one_tls_context() -> None:
    """Building a context loads the CA bundle, ~25 ms of CPU: once per process, not per event."""
    assert tls_context() is tls_context()


@pytest.mark.parametrize("host", ["a" * 64 + ".com", "a..b"])
@pytest.mark.parametrize("private", [False, True])
def test_a_host_the_idna_codec_refuses_is_an_unsupported_uri(host: str, private: bool) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=private, fetch_timeout_s=2.0)
    with pytest.raises(DeadLetter) as info:
        open_uri(f"http://{host}/x.wav", policy)
    assert reason_of(info) is Reason.URI_UNSUPPORTED


def test_http_404_is_a_fetch_failure(http_audio: str) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + "/missing", AudioPolicy.create((), allow_private_hosts=True))
    assert reason_of(info) is Reason.AUDIO_FETCH_FAILED


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1/a.mp3",
        "http://localhost/a.mp3",
        "https://10.1.2.3/a.mp3",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.mp3",
        "http://192.168.0.1/x",
        # IPv6 forms that carry an IPv4 address: NAT64 (well-known and local-use prefixes),
        # IPv4-compatible, IPv4-translated, 6to4, each around the metadata address
        "http://[64:ff9b::a9fe:a9fe]/x",
        "http://[64:ff9b:1::a9fe:a9fe]/x",
        "http://[::a9fe:a9fe]/x",
        "http://[::ffff:0:a9fe:a9fe]/x",
        "http://[2002:a9fe:a9fe::1]/x",
    ],
)
def test_private_hosts_are_forbidden_by_default(uri: str) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, AudioPolicy.create(()))
    assert reason_of(info) is Reason.URI_FORBIDDEN


def test_http_body_over_the_byte_limit(http_audio: str) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=True, max_bytes=100)
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + "/a.wav", policy)
    assert reason_of(info) is Reason.AUDIO_TOO_LARGE


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_slow_drip_and_stalled_servers_hit_the_deadline(http_audio: str, path: str) -> None:
    policy = AudioPolicy.create((), allow_private_hosts=True, fetch_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + path, policy)
    assert reason_of(info) is Reason.AUDIO_FETCH_FAILED
    assert time.monotonic() - start < 2.5


def test_a_fetch_ends_by_a_quarter_past_its_deadline(http_audio: str) -> None:
    """Each read waits at most a quarter of the timeout: a byte every 0.9 s against 1 s."""
    policy = AudioPolicy.create((), allow_private_hosts=True, fetch_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + "/slowdrip", policy)
    assert reason_of(info) is Reason.AUDIO_FETCH_FAILED
    assert time.monotonic() - start < 1.25 + 0.2


def test_the_deadline_covers_every_redirect_hop(http_audio: str) -> None:
    """Five hops of 0.4 s each: every one is within its own timeout, but not within one
    deadline for the whole fetch."""
    policy = AudioPolicy.create((), allow_private_hosts=True, fetch_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + "/slowhop/4", policy)
    assert reason_of(info) is Reason.AUDIO_FETCH_FAILED
    assert time.monotonic() - start < 1.6
    fine = AudioPolicy.create((), allow_private_hosts=True, fetch_timeout_s=5.0)
    with open_uri(http_audio + "/slowhop/2", fine) as body:
        assert len(body.read()) > 1000


def test_every_redirect_hop_passes_the_host_check(
    http_audio: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first hop stands for a public host; the hop it redirects to is refused."""
    hops: list[str] = []

    def check(host: str, _policy: AudioPolicy) -> None:
        hops.append(host)
        if len(hops) > 1:
            raise DeadLetter(Reason.URI_FORBIDDEN, f"host {host!r} is private")

    monkeypatch.setattr("consumer.audio.check_host", check)
    with pytest.raises(DeadLetter) as info:
        open_uri(http_audio + "/moved", AudioPolicy.create(()))
    assert reason_of(info) is Reason.URI_FORBIDDEN and len(hops) == 2


@pytest.mark.parametrize("claimed", [0x7FFF_FFF0, 10])
def test_wav_header_that_lies_about_its_length(
    tmp_path: Path, policy: AudioPolicy, claimed: int
) -> None:
    data = bytearray(write(tmp_path / "lie.wav", tone(2, TARGET), TARGET, "WAV").read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = claimed.to_bytes(4, "little")
    try:
        clip = decode_window(bytes(data), 1.0, policy)
    except DeadLetter as exc:
        assert exc.reason in (Reason.AUDIO_DECODE_FAILED, Reason.AUDIO_TOO_LONG)
    else:
        assert np.isfinite(clip.samples).all() and clip.samples.size > 0


@pytest.mark.parametrize(("rate", "channels"), [(999_999, 1), (8_000, 200)])
def test_absurd_sample_rate_or_channel_count(
    tmp_path: Path, policy: AudioPolicy, rate: int, channels: int
) -> None:
    data = bytearray(write(tmp_path / "odd.wav", tone(1, 8_000), 8_000, "WAV").read_bytes())
    data[22:24] = channels.to_bytes(2, "little")  # WAVE fmt chunk: channels, then sample rate
    data[24:28] = rate.to_bytes(4, "little")
    with pytest.raises(DeadLetter) as info:
        decode_window(bytes(data), 1.0, policy)
    assert reason_of(info) is Reason.AUDIO_DECODE_FAILED


def test_request_goes_to_the_checked_address_not_a_second_dns_answer(
    http_audio: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cdn.invalid never resolves: the fetch can only succeed by connecting to the address the
    host check approved (a DNS-rebinding answer in between would be ignored)."""
    port = http_audio.rsplit(":", 1)[1]
    monkeypatch.setattr("consumer.audio.check_host", lambda host, policy: "127.0.0.1")
    wave = load_clip(
        f"http://cdn.invalid:{port}/a.wav", AudioPolicy.create(()), Resampler(TARGET, 1.0)
    )
    assert np.abs(wave).max() > 0.4


def test_batch_resampler_rows_equal_the_item_by_item_resampler() -> None:
    """Mixed source rates and lengths (longer than the clip, shorter, already at the target
    rate, a few samples) in one batch: every row is what Resampler gives for that clip."""
    rng = np.random.default_rng(0)
    shapes = [(44_100, 44_100 * 3), (44_100, 30_000), (48_000, 48_000 * 2), (TARGET, TARGET),
              (TARGET, 1_000), (16_000, 16_000 * 2), (44_100, 7)]  # fmt: skip
    clips = [Clip((0.1 * rng.standard_normal(n)).astype(np.float32), rate, n / rate)
             for rate, n in shapes]  # fmt: skip
    one_by_one = np.stack([Resampler(TARGET, 2.0)(clip) for clip in clips])
    batched = BatchResampler(TARGET, 2.0, torch.device("cpu"))(clips)
    assert batched.shape == (len(clips), 2 * TARGET) and batched.dtype == torch.float32
    np.testing.assert_allclose(batched.numpy(), one_by_one, atol=1e-6)


@pytest.mark.parametrize("rate", [44_101, 47_999, 383_999])
def test_a_near_coprime_rate_is_refused_before_any_kernel_is_built(rate: int) -> None:
    """torchaudio would build a ~(22050 x 44101)-tap kernel (4 GB) for 44,101 Hz."""
    clip = Clip(np.zeros(rate, dtype=np.float32), rate, 1.0)
    with pytest.raises(DeadLetter) as caught:
        Resampler(TARGET, 1.0)(clip)
    assert caught.value.reason is Reason.AUDIO_DECODE_FAILED and "sample rate" in str(caught.value)


@pytest.mark.parametrize("rate", [8_000, 11_025, 16_000, 24_000, 32_000, 44_100, 48_000,
                                  88_200, 96_000, 176_400, 192_000, 384_000])  # fmt: skip
def test_every_standard_rate_resamples(rate: int) -> None:
    check_resample_rate(rate, TARGET)  # does not raise


@pytest.mark.parametrize(
    "uri", ["http://[::1/a.wav", "http://0177.0.0.1/", "http:///a.wav", "https://[zz]/a.wav"]
)
def test_malformed_urls_are_unsupported_uris_not_decode_failures(uri: str) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, AudioPolicy.create(()))
    assert reason_of(info) is Reason.URI_UNSUPPORTED


def test_request_logs_name_no_credentials_or_signatures(
    http_audio: str, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs every request URL at INFO: userinfo and presigned query strings included."""
    policy = AudioPolicy.create((), allow_private_hosts=True)
    host = http_audio.removeprefix("http://")
    uri = f"http://alice:s3cret@{host}/a.wav?X-Amz-Credential=CRED&X-Amz-Signature=SIG"
    with caplog.at_level("DEBUG"):
        with pytest.raises(DeadLetter):  # the server has no /a.wav?...: 404 is fine here
            open_uri(uri.replace("/a.wav", "/missing"), policy)
        open_uri(uri, policy)
    logged = caplog.text
    assert "HTTP Request" in logged, "httpx's own line is still there"
    for secret in ("s3cret", "CRED", "SIG", "alice"):
        assert secret not in logged


def test_the_kernel_caches_hold_a_bounded_number_of_rates() -> None:
    """Thousands of rates pass the rate check; a kernel is ~MBs: the caches must not grow."""
    resampler = Resampler(8_000, 0.01)
    batched = BatchResampler(8_000, 0.01, torch.device("cpu"))
    for rate in (100 * k for k in range(11, 51) if k != 80):
        clip = Clip(np.zeros(200, dtype=np.float32), rate, 0.02)
        resampler(clip)
        batched([clip])
    cap = resample.MAX_KERNELS
    assert len(resampler._kernels) <= cap and len(batched._kernels) <= cap


def _peak_mb(run: Callable[[], object]) -> float:
    """Peak of the Python-visible allocations (numpy's arrays included) while ``run`` runs."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def wide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 channels at 384 kHz, 8 s: a small file whose 5 s window is 61 MB as float32 frames."""
    path = tmp_path_factory.mktemp("wide") / "wide.wav"
    rate = 384_000
    with sf.SoundFile(path, "w", rate, 8, "PCM_16", format="WAV") as f:
        for _ in range(8):
            f.write(np.tile(tone(1.0, rate), (1, 8)))
    return path


@pytest.mark.parametrize("seekable", [True, False])
def test_decoding_a_wide_file_is_bounded_by_the_mono_window(
    wide_file: Path, seekable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding reads blocks and mixes each down, so a many-channel, high-rate file costs the
    mono window (5 s x 384 kHz x 4 B = 7.3 MB) plus one block, not every channel at once; a
    format libsndfile cannot seek skips to the window in blocks too."""
    if not seekable:
        monkeypatch.setattr(sf.SoundFile, "seekable", lambda self: False)
    policy = AudioPolicy.create((wide_file.parent,), max_bytes=10**9)
    clips: list[Clip] = []
    peak = _peak_mb(lambda: clips.append(decode_window(wide_file, 5.0, policy)))
    [clip] = clips
    assert clip.samples.shape == (5 * 384_000,) and clip.source_rate == 384_000
    assert np.abs(clip.samples).max() > 0.4
    assert peak < 7.3 + 2 * AUDIO_BLOCK_MB, f"{peak:.1f} MB"


def test_a_file_swapped_for_a_fifo_after_the_check_cannot_block_a_decode(
    tmp_path: Path, policy: AudioPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path is checked, then decoded: a FIFO put in its place in between used to block
    the decode thread for ever (no writer). What was checked must be what is decoded."""
    path = write(tmp_path / "a.wav", tone(1, TARGET), TARGET, "WAV")
    checked = audio.open_uri

    def check_then_swap(uri: str, policy: AudioPolicy) -> object:
        source = checked(uri, policy)
        path.unlink()
        os.mkfifo(path)
        return source

    monkeypatch.setattr(audio, "open_uri", check_then_swap)
    done: list[np.ndarray] = []
    worker = threading.Thread(
        target=lambda: done.append(load_clip(path.as_uri(), policy, Resampler(TARGET, 1.0))),
        daemon=True,
    )
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release the blocked open before failing
        with open(path, "wb"):
            pass
        pytest.fail("the decode blocked on a FIFO swapped in after the check")
    assert done and done[0].shape == (TARGET,) and np.abs(done[0]).max() > 0.4


def test_a_fifo_is_not_opened(tmp_path: Path, policy: AudioPolicy) -> None:
    os.mkfifo(tmp_path / "pipe.wav")
    with pytest.raises(DeadLetter, match="not a regular file"):
        open_uri((tmp_path / "pipe.wav").as_uri(), policy)


def test_a_directory_uri_is_refused_without_leaking_a_descriptor(
    tmp_path: Path, policy: AudioPolicy
) -> None:
    (tmp_path / "d").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for uri in ((tmp_path / "d").as_uri(), tmp_path.as_uri()) * 25:
        with pytest.raises(DeadLetter, match="not a regular file"):
            open_uri(uri, policy)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_flac_that_does_not_state_its_length_is_refused_with_the_reason(
    tmp_path: Path, policy: AudioPolicy
) -> None:
    """STREAMINFO's total_samples 0 (written to a pipe): libsndfile says 2**63 - 1 frames."""
    path = write(tmp_path / "piped.flac", tone(3, TARGET), TARGET, "FLAC")
    data = bytearray(path.read_bytes())
    # fLaC, the STREAMINFO block header (4 bytes), then 13 bytes up to the 36-bit total
    # (its low 4 bits share byte 21 with the bits per sample)
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    path.write_bytes(bytes(data))
    assert sf.info(str(path)).frames == 2**63 - 1
    with pytest.raises(DeadLetter, match="does not state its length") as info:
        load_clip(path.as_uri(), policy, Resampler(TARGET, 1.0))
    assert reason_of(info) is Reason.AUDIO_DECODE_FAILED


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("file:///tmp/a%00b.wav", Reason.URI_UNSUPPORTED),  # an embedded NUL
        ("http://[64:ff9b:1:0:a:0:100:0]/x", Reason.URI_FORBIDDEN),  # local-use NAT64, a /64
    ],
)
def test_more_hostile_uris(uri: str, reason: Reason, policy: AudioPolicy) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, policy)
    assert reason_of(info) is reason


def test_a_file_uri_host_is_named_without_its_credentials(policy: AudioPolicy) -> None:
    with pytest.raises(DeadLetter) as info:
        open_uri("file://user:s3cret@host/a.wav", policy)
    assert "s3cret" not in info.value.detail and "host" in info.value.detail


def test_out_of_descriptors_is_the_process_failure_not_the_event(
    tmp_path: Path, policy: AudioPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "a.wav", tone(1, TARGET), TARGET, "WAV")

    def exhausted(*_args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(audio.os, "open", exhausted)
    with pytest.raises(OSError, match="Too many open files"):
        open_uri(path.as_uri(), policy)


def test_decode_threads_run_below_the_rest_of_the_process() -> None:
    """The device stage's one thread must win a core over the decoders (Linux per-thread nice);
    the thread that set up the pool keeps its own priority."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from consumer.audio import DECODE_NICE, lower_decode_thread_priority

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice()
    with ThreadPoolExecutor(1, initializer=lower_decode_thread_priority) as pool:
        assert pool.submit(nice).result() == min(19, base + DECODE_NICE)
    assert nice() == base
