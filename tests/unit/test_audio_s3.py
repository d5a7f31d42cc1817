"""s3:// URIs without a server: what is refused before any network call, the bucket setting,
and the shared client. The fetches themselves: tests/integration/test_s3_audio.py."""

import threading
from collections.abc import Iterator

import pytest

from consumer import audio, s3
from consumer.app import audio_policy
from consumer.audio import AudioPolicy, open_uri
from consumer.errors import ConfigError, DeadLetter
from consumer.s3uri import bucket_name_problem, parse_s3_uri
from consumer.settings import load_settings
from schemas.dead_letter import DeadLetterReason as Reason
from tests.unit.aws_helpers import fake_aws

ALLOWED = AudioPolicy.create((), s3_buckets=("audio-bucket",))


@pytest.fixture(autouse=True)
def no_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake credentials, and an endpoint nothing listens on (port 9 is discard): a test that
    reached the network would fail loudly rather than find a real store."""
    fake_aws(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    s3.reset_s3_clients()
    yield
    s3.reset_s3_clients()


def refused(uri: str, policy: AudioPolicy = ALLOWED) -> DeadLetter:
    with pytest.raises(DeadLetter) as info:
        open_uri(uri, policy)
    return info.value


@pytest.mark.parametrize(
    "uri",
    [
        "s3://",
        "s3:///key.flac",  # no bucket
        "s3://audio-bucket",  # no key
        "s3://audio-bucket/",
        "s3://Audio-Bucket/a.flac",  # upper case
        "s3://ab/a.flac",  # too short
        f"s3://{'a' * 64}/a.flac",  # too long
        "s3://-audio-bucket/a.flac",
        "s3://audio..bucket/a.flac",
        "s3://192.168.1.10/a.flac",  # an IP address
        "s3://audio_bucket/a.flac",
        "s3://user:secret@audio-bucket/a.flac",  # userinfo
        "s3://audio-bucket:443/a.flac",  # a port
        "s3://audio-bucket/a\nb.flac",  # control characters in the key
        "s3://audio-bucket/a\tb.flac",
        "s3://audio-bucket/a\x00.flac",
        "s3://audio-bucket/a\x7f.flac",
        "s3://audio-bucket/\udcff.flac",  # a lone surrogate
        f"s3://audio-bucket/{'k' * 1025}",  # over 1024 bytes
        f"s3://audio-bucket/{'é' * 513}",  # 1026 bytes in UTF-8
        "s3://audio-bucket/../other-bucket/a.flac",
        "s3://audio-bucket/a/./b.flac",
        "s3://audio-bucket/a/..",
        "s3://[audio-bucket/a.flac",  # urlsplit refuses it first
    ],
)
def test_malformed_s3_uris_are_unsupported_before_any_request(uri: str) -> None:
    dead = refused(uri)
    assert dead.reason is Reason.URI_UNSUPPORTED
    assert "secret" not in dead.detail


def test_well_formed_uris_parse_literally() -> None:
    assert parse_s3_uri("s3://audio-bucket/a.flac") == ("audio-bucket", "a.flac")
    literal = "x/y z%20?.flac#1"
    assert parse_s3_uri(f"S3://audio-bucket/{literal}") == ("audio-bucket", literal)
    assert parse_s3_uri("s3://a.b-c/k/") == ("a.b-c", "k/")
    assert parse_s3_uri(f"s3://audio-bucket/{'k' * 1024}")[1] == "k" * 1024


@pytest.mark.parametrize(
    ("policy", "detail"),
    [
        (AudioPolicy.create(()), "s3 URIs are disabled (no audio S3 buckets)"),
        (ALLOWED, "bucket 'other-bucket' is not an audio S3 bucket"),
    ],
)
def test_a_bucket_off_the_list_is_forbidden(policy: AudioPolicy, detail: str) -> None:
    dead = refused("s3://other-bucket/a.flac", policy)
    assert dead.reason is Reason.URI_FORBIDDEN and dead.detail == detail


def test_an_unlisted_bucket_is_refused_before_a_client_is_made() -> None:
    refused("s3://other-bucket/a.flac")
    assert not s3._clients


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("abc", True),
        ("a" * 63, True),
        ("my.audio-bucket.2026", True),
        ("ab", False),
        ("a" * 64, False),
        ("Upper", False),
        ("under_score", False),
        ("-leading", False),
        ("trailing.", False),
        ("two..dots", False),
        ("10.0.0.1", False),
        ("", False),
    ],
)
def test_bucket_names_follow_s3s_rules(name: str, ok: bool) -> None:
    assert (bucket_name_problem(name) is None) is ok


def test_the_bucket_setting_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPSCORE_AUDIO_S3_BUCKETS", " audio-a , audio.b,, ")
    assert load_settings().audio_s3_buckets == ("audio-a", "audio.b")
    monkeypatch.setenv("POPSCORE_AUDIO_S3_BUCKETS", "")
    assert load_settings().audio_s3_buckets == ()


@pytest.mark.parametrize("value", ["audio-a,Audio_B", "s3://audio-a", "ab"])
def test_a_bad_bucket_name_fails_start_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("POPSCORE_AUDIO_S3_BUCKETS", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("POPSCORE_AUDIO_S3_BUCKETS: ") and "\n" not in message
    assert "not an S3 bucket name" in message


def test_the_policy_takes_the_buckets_and_the_decode_pool_size() -> None:
    policy = audio_policy(load_settings(audio_s3_buckets=("audio-a",), decode_workers=12))
    assert policy.s3_buckets == ("audio-a",) and policy.fetch_concurrency == 12
    default = AudioPolicy.create(())
    assert default.s3_buckets == () and default.fetch_concurrency == 10


def test_one_client_per_shape_shared_by_threads_and_built_from_the_policy() -> None:
    shape = s3.ClientShape(fetch_timeout_s=8.0, connections=6)
    clients: list[object] = []

    def take() -> None:
        clients.append(s3.s3_client(shape))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(clients) == 8 and all(c is clients[0] for c in clients)
    config = clients[0].meta.config  # type: ignore[attr-defined]
    assert config.connect_timeout == config.read_timeout == 1.0  # an eighth of 8 s each
    assert config.max_pool_connections == 6
    assert config.retries == {"mode": "standard", "total_max_attempts": s3.MAX_ATTEMPTS}
    # boto3's own endpoint setting, not one of popscore's.
    assert clients[0].meta.endpoint_url == "http://127.0.0.1:9"  # type: ignore[attr-defined]
    s3.reset_s3_clients()
    assert s3.s3_client(shape) is not clients[0]


def test_a_fetch_ends_by_the_same_bound_as_an_http_one() -> None:
    """An attempt started just before the deadline may connect for one share and wait one for
    its headers: together the quarter that audio.WORST_FETCH_FACTOR allows past the deadline."""
    assert s3.CONNECT_SHARE + s3.READ_SHARE == audio.READ_STALL_SHARE


def test_no_attempt_is_sent_after_the_deadline() -> None:
    """Making the client takes longer than this deadline, so botocore's first attempt is
    already too late: it is never sent (the endpoint would have refused the connection)."""
    hurried = AudioPolicy.create((), s3_buckets=("audio-bucket",), fetch_timeout_s=1e-6)
    dead = refused("s3://audio-bucket/a.flac", hurried)
    assert dead.reason is Reason.AUDIO_FETCH_FAILED and dead.detail == "fetch deadline exceeded"


def test_an_unreachable_endpoint_is_a_fetch_failure_naming_no_credentials() -> None:
    dead = refused("s3://audio-bucket/a.flac")
    assert dead.reason is Reason.AUDIO_FETCH_FAILED
    assert dead.detail.startswith("EndpointConnectionError: ") and "127.0.0.1:9" in dead.detail
    assert "testing" not in dead.detail


def test_without_credentials_no_client_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client made without credentials would fail every fetch until a restart; none is
    kept, so credentials that appear later (a role's token mounted late) are found."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    dead = refused("s3://audio-bucket/a.flac")
    assert dead.reason is Reason.AUDIO_FETCH_FAILED and dead.detail == "no AWS credentials found"
    assert not s3._clients
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert refused("s3://audio-bucket/a.flac").detail.startswith("EndpointConnectionError")
