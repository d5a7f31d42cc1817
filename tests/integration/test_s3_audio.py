"""s3:// audio against a real S3-protocol server over the network (moto in server mode, started
by ``deploy/local/s3-up.sh``), and against small HTTP servers for what moto cannot do: stall,
drip, or send more than it declared. boto3 is never mocked or patched.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import soundfile as sf

from consumer import s3
from consumer.audio import WORST_FETCH_FACTOR, AudioPolicy, decode_window, load_clip, open_uri
from consumer.errors import DeadLetter
from consumer.resample import Resampler
from consumer.soxr_resample import SoxrResampler
from schemas.dead_letter import DeadLetterReason as Reason
from tests.conftest import free_port
from tests.integration.conftest import ROOT
from tests.unit.aws_helpers import fake_aws

pytestmark = pytest.mark.integration
TARGET = 22_050
# Scheduling on a loaded 2-core machine: added to every bound on elapsed time.
SLACK_S = 0.75


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Fake credentials and a region, nothing else of the machine's AWS configuration; the
    client cache is emptied before and after, so no test sees another's endpoint."""
    fake_aws(monkeypatch)
    s3.reset_s3_clients()
    yield monkeypatch
    s3.reset_s3_clients()


@pytest.fixture
def moto(s3_endpoint: str, aws_env: pytest.MonkeyPatch) -> str:
    """The local S3 server, as the service finds it: through boto3's own endpoint variable."""
    aws_env.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def bucket(moto: str) -> str:
    name = f"popscore-test-{uuid.uuid4().hex[:12]}"
    admin().create_bucket(Bucket=name)
    return name


def admin() -> Any:
    """A plain boto3 client for the tests' own uploads (the endpoint from the environment)."""
    return boto3.session.Session().client("s3")


def write_tone(path: Path, seconds: float = 2.0, rate: int = 44_100) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.1 * np.sin(2 * np.pi * 1_210 * t)
    sf.write(path, wave.astype(np.float32), rate, format="FLAC")
    return path


def policy(bucket: str, **limits: Any) -> AudioPolicy:
    return AudioPolicy.create((), s3_buckets=(bucket,), **limits)


def refusal(uri: str, policy: AudioPolicy) -> DeadLetter:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, policy)
    return info.value


def test_an_s3_object_decodes_exactly_like_the_same_local_file(bucket: str, tmp_path: Path) -> None:
    path = write_tone(tmp_path / "tone.flac")
    admin().upload_file(str(path), bucket, "releases/2026/tone.flac")
    uri = f"s3://{bucket}/releases/2026/tone.flac"
    both = AudioPolicy.create((tmp_path,), s3_buckets=(bucket,))

    from_s3 = load_clip(uri, both, Resampler(TARGET, 1.5))
    from_file = load_clip(path.as_uri(), both, Resampler(TARGET, 1.5))
    assert from_s3.shape == (int(1.5 * TARGET),) and np.abs(from_s3).max() > 0.2
    np.testing.assert_array_equal(from_s3, from_file)
    window = decode_window(open_uri(uri, both), 1.0, both)
    np.testing.assert_array_equal(window.samples, decode_window(path, 1.0, both).samples)


def test_keys_are_literal_not_percent_decoded(bucket: str, tmp_path: Path) -> None:
    """As the AWS CLI and console print them: a space, a "?" or a "%" belong to the key."""
    path = write_tone(tmp_path / "tone.flac", seconds=0.5)
    for key in ("a b?x=1#y.flac", "100%25.flac"):
        admin().upload_file(str(path), bucket, key)
        with open_uri(f"s3://{bucket}/{key}", policy(bucket)) as body:
            assert body.read() == path.read_bytes()


def test_a_missing_key_or_bucket_is_a_fetch_failure(bucket: str) -> None:
    missing_key = refusal(f"s3://{bucket}/nope.flac", policy(bucket))
    assert missing_key.reason is Reason.AUDIO_FETCH_FAILED
    assert missing_key.detail == "GetObject: NoSuchKey (HTTP 404)"
    gone = "popscore-test-never-created"
    missing_bucket = refusal(f"s3://{gone}/a.flac", policy(gone))
    assert missing_bucket.reason is Reason.AUDIO_FETCH_FAILED
    assert "NoSuchBucket" in missing_bucket.detail


def test_an_object_over_the_byte_limit_is_refused_by_its_length_unread(bucket: str) -> None:
    """The declared length decides before the body is read: the 8 MB never come into memory."""
    admin().put_object(Bucket=bucket, Key="big.wav", Body=os.urandom(8 * 1024 * 1024))
    admin().put_object(Bucket=bucket, Key="small.bin", Body=b"x" * 1000)
    limited = policy(bucket, max_bytes=64 * 1024)
    open_uri(f"s3://{bucket}/small.bin", limited).close()  # the client (its models: ~10 MB)
    tracemalloc.start()
    try:
        dead = refusal(f"s3://{bucket}/big.wav", limited)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert dead.reason is Reason.AUDIO_TOO_LARGE
    assert dead.detail == f"{8 * 1024 * 1024} bytes > {64 * 1024}"
    assert peak_mb < 1, f"{peak_mb:.1f} MB held"
    # The connection cut short is not reused half-read: the next fetch is whole.
    with open_uri(f"s3://{bucket}/small.bin", limited) as body:
        assert body.read() == b"x" * 1000


def test_a_bucket_off_the_list_is_forbidden_before_any_request(bucket: str) -> None:
    other = f"popscore-test-{uuid.uuid4().hex[:12]}"
    admin().create_bucket(Bucket=other)
    admin().put_object(Bucket=other, Key="a.flac", Body=b"audio")
    assert refusal(f"s3://{other}/a.flac", policy(bucket)).reason is Reason.URI_FORBIDDEN
    disabled = AudioPolicy.create(())
    assert refusal(f"s3://{other}/a.flac", disabled).reason is Reason.URI_FORBIDDEN


def test_an_unreachable_endpoint_fails_within_the_fetch_timeout(
    aws_env: pytest.MonkeyPatch,
) -> None:
    aws_env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens
    start = time.monotonic()
    dead = refusal("s3://popscore-audio/a.flac", policy("popscore-audio", fetch_timeout_s=2.0))
    assert dead.reason is Reason.AUDIO_FETCH_FAILED
    assert dead.detail.startswith("EndpointConnectionError")
    assert time.monotonic() - start < WORST_FETCH_FACTOR * 2.0 + SLACK_S


@pytest.fixture
def bad_store(aws_env: pytest.MonkeyPatch) -> Iterator[str]:
    """An endpoint that speaks HTTP but misbehaves as a store, by bucket: stalls after its
    headers, drips its body a byte at a time, or sends more than the limit without a length."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            # The client hangs up at its deadline or over the limit: nothing to report.
            with contextlib.suppress(OSError):
                self._answer(self.path.split("/")[1])

        def _answer(self, bucket: str) -> None:
            self.send_response(200)
            if bucket == "chunked-big":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(64):  # 4 MB, no length declared
                    self.wfile.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            if bucket == "stall":
                time.sleep(3)
            elif bucket == "drip":
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    aws_env.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("bucket", ["stall", "drip"])
def test_stalled_and_dripping_stores_hit_the_deadline(bad_store: str, bucket: str) -> None:
    """Each read waits at most an eighth of the timeout, and the deadline is checked between
    reads: a store dripping a byte every 50 ms is cut at the deadline all the same."""
    start = time.monotonic()
    dead = refusal(f"s3://{bucket}/a.flac", policy(bucket, fetch_timeout_s=1.0))
    assert dead.reason is Reason.AUDIO_FETCH_FAILED
    assert time.monotonic() - start < WORST_FETCH_FACTOR * 1.0 + SLACK_S


def test_a_body_without_a_length_is_cut_one_byte_past_the_limit(bad_store: str) -> None:
    limited = policy("chunked-big", max_bytes=100_000)
    s3.s3_client(s3.ClientShape(limited.fetch_timeout_s, limited.fetch_concurrency))  # made first
    tracemalloc.start()
    try:
        dead = refusal("s3://chunked-big/a.flac", limited)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert dead.reason is Reason.AUDIO_TOO_LARGE and dead.detail == "over 100000 bytes"
    assert peak_mb < 1.5, f"{peak_mb:.1f} MB held"


def test_no_credential_reaches_the_log_at_debug(
    bucket: str, aws_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore logs the canonical request (session token included), the Authorization header
    and its signatures at DEBUG; none of it may reach popscore's log."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIDPOPSCORETEST")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "SECRETPOPSCORETEST")
    aws_env.setenv("AWS_SESSION_TOKEN", "TOKENPOPSCORETEST")
    s3.reset_s3_clients()
    admin().put_object(Bucket=bucket, Key="a.bin", Body=b"x" * 100)
    with caplog.at_level("DEBUG"):
        open_uri(f"s3://{bucket}/a.bin", policy(bucket)).close()
        refusal(f"s3://{bucket}/missing.bin", policy(bucket))
    logged = caplog.text
    assert "GET /" in logged, "urllib3's request line is still there"
    for secret in ("AKIDPOPSCORETEST", "SECRETPOPSCORETEST", "TOKENPOPSCORETEST", "Signature"):
        assert secret not in logged


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from consumer.audio import AudioPolicy, open_uri
from consumer.errors import DeadLetter

bucket = sys.argv[1]
# The client is made and its connection closed (a body refused by its length is not reused)...
try:
    open_uri(f"s3://{bucket}/a.bin", AudioPolicy.create((), s3_buckets=(bucket,), max_bytes=10))
except DeadLetter:
    pass
# ...then every descriptor is taken, so the next fetch cannot open a socket.
top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    open_uri(f"s3://{bucket}/a.bin", AudioPolicy.create((), s3_buckets=(bucket,)))
except OSError as exc:
    print(f"raised errno {exc.errno}")
except DeadLetter as exc:
    print(f"dead letter: {exc}")
"""


def test_out_of_descriptors_is_the_process_failure_not_the_event(bucket: str) -> None:
    """As for files: the OSError botocore wraps is raised again, not dead-lettered."""
    admin().put_object(Bucket=bucket, Key="a.bin", Body=b"x" * 100)
    run = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, bucket],
        check=False,  # its output says what happened
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.stdout.strip() == "raised errno 24", run.stdout + run.stderr[-2000:]


def test_a_parquet_catalog_of_s3_audio_is_prepared_with_the_services_clips(
    bucket: str, tmp_path: Path
) -> None:
    """Training reads s3:// catalogs through the service's own intake (policy, fetch, window):
    `popscore prepare` against the local S3 server, from a Parquet catalog."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from consumer.settings import Settings
    from popscore.training.cache import read_table, shard_name
    from popscore.training.jobs import CLIP_SECONDS, SAMPLE_RATE, prepare_cache

    rng = np.random.default_rng(3)
    records = []
    for i in range(3):
        local = tmp_path / f"t{i}.flac"
        sf.write(local, rng.uniform(-0.4, 0.4, (3 * 16_000, 2)).astype(np.float32), 16_000)
        admin().upload_file(str(local), bucket, f"cat/t{i}.flac")
        records.append({"popularity": 50.0 + i, "artist": {"name": f"A{i}"},
                        "audio": f"s3://{bucket}/cat/t{i}.flac"})  # fmt: skip
    records.append({"popularity": 60.0, "artist": {"name": "A9"},
                    "audio": f"s3://{bucket}/cat/missing.flac"})  # fmt: skip
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(records), catalog)
    settings = Settings(audio_s3_buckets=(bucket,))
    done = prepare_cache(catalog, "audio", tmp_path / "cache", settings, workers=2, progress=False)
    assert (done.rows, done.failures) == (4, 1)
    table = read_table(tmp_path / "cache")
    assert table.audio_ok.tolist() == [True, True, True, False]
    clips = np.load(tmp_path / "cache" / shard_name(0, ".npy")).astype(np.float32)
    resampler = SoxrResampler(SAMPLE_RATE, CLIP_SECONDS)  # what the pool and training use
    for i in range(3):
        local = decode_window(tmp_path / f"t{i}.flac", CLIP_SECONDS, AudioPolicy.create(()))
        np.testing.assert_allclose(clips[i], resampler(local), atol=1e-3)
