"""Fetch one object from S3 (or an S3-compatible store) under the audio policy's guards.

Credentials, region and endpoint come from boto3's standard configuration — environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, ...), config files, instance or IRSA roles —
never from the event. One client per process and shape of limits, made on first use and shared
by the decode threads (botocore clients are thread-safe; their creation is not, hence the lock).
"""

import io
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as URLLib3Error

from consumer.dead_letters import of_the_process
from consumer.errors import DeadLetter
from consumer.redact import drop_debug, redact
from schemas.dead_letter import DeadLetterReason as Reason

# A last attempt that starts just before the deadline may connect for one share and wait one
# share for the response headers; each body read waits at most one share, and the deadline is
# checked before it. Both shares together are audio.READ_STALL_SHARE, so an S3 fetch ends by
# the same 1.25x the timeout as an http one (audio.WORST_FETCH_FACTOR).
CONNECT_SHARE = READ_SHARE = 0.125
# Standard mode: transient errors and throttling retried with jittered backoff, under a retry
# quota that stops retrying while the store is down. Three attempts, the mode's default.
MAX_ATTEMPTS = 3
READ_BYTES = 256 * 1024
DETAIL_CHARS = 300
# botocore's DEBUG lines carry signing material (the canonical request with the session token,
# the Authorization header, signatures) and STS responses with temporary credentials: they
# are dropped; its INFO lines and above (no secrets) still reach the log.
drop_debug("botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.utils")


@dataclass(frozen=True)
class ClientShape:
    """What a client is built for: its timeouts follow the fetch timeout, its connection pool
    the number of threads fetching at once (the decode pool)."""

    fetch_timeout_s: float
    connections: int


_clients: dict[ClientShape, Any] = {}
_clients_lock = threading.Lock()
# The deadline of the fetch running on this thread, checked before each attempt botocore sends.
_deadline: ContextVar[float | None] = ContextVar("s3_fetch_deadline", default=None)


def fetch_object(bucket: str, key: str, max_bytes: int, shape: ClientShape) -> io.BytesIO:
    """The object's bytes within one deadline of ``shape.fetch_timeout_s``, or a DeadLetter:
    audio_too_large (by its declared length, before any of the body is read, or while reading),
    audio_fetch_failed (missing, refused, unreachable, timed out; the S3 error code only, never
    a message that might quote a credential). Out of memory or descriptors is raised as is."""
    deadline = time.monotonic() + shape.fetch_timeout_s
    token = _deadline.set(deadline)
    try:
        response = s3_client(shape).get_object(Bucket=bucket, Key=key)
        return _read_body(response["Body"], response.get("ContentLength"), max_bytes, deadline)
    except ClientError as exc:
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, _error_code(exc)) from exc
    except (BotoCoreError, URLLib3Error, OSError, ValueError) as exc:
        # urllib3 (botocore's HTTP client): read1's timeouts and broken bodies come from it
        # directly. ValueError: botocore's own for an endpoint URL it cannot use.
        trouble = _of_the_process(exc)
        if trouble is not None:
            raise trouble from None
        detail = redact(f"{type(exc).__name__}: {exc}")[:DETAIL_CHARS]
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, detail) from exc
    finally:
        _deadline.reset(token)


def s3_client(shape: ClientShape) -> Any:
    """The process's client for ``shape``, made on first use."""
    with _clients_lock:
        client = _clients.get(shape)
        if client is None:
            client = _clients[shape] = _new_client(shape)
        return client


def reset_s3_clients() -> None:
    """Close and forget every client, so the next fetch reads the configuration again (tests
    that move the endpoint use it)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()


def _new_client(shape: ClientShape) -> Any:
    session = boto3.session.Session()
    if session.get_credentials() is None:
        # Raised, so nothing is cached: the next fetch looks again (a role's web identity
        # token may be mounted after start-up), where a client made now would fail for ever.
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "no AWS credentials found")
    timeout = shape.fetch_timeout_s
    config = Config(
        connect_timeout=CONNECT_SHARE * timeout,
        read_timeout=READ_SHARE * timeout,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        max_pool_connections=shape.connections,
        # The body is read as it arrives (below), not through botocore's checksum wrapper,
        # which waits for whole chunks: so no checksum mode is asked for. The length is
        # checked here; TLS protects the bytes in transit.
        response_checksum_validation="when_required",
    )
    client = session.client("s3", config=config)
    client.meta.events.register("before-send.s3.GetObject", _check_deadline)
    return client


def _check_deadline(**_kwargs: Any) -> None:
    """Before each attempt, retries included: none starts after the fetch's deadline."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "fetch deadline exceeded")


def _read_body(body: Any, declared: int | None, max_bytes: int, deadline: float) -> io.BytesIO:
    # Entering botocore's StreamingBody yields urllib3's response, whose read1 returns what
    # has arrived (one socket read): the deadline is checked even when a store drips a byte at
    # a time. On leaving, a body cut short closes its connection; a whole one is back in the
    # pool already.
    with body as raw:
        if declared is not None and declared > max_bytes:
            raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"{declared} bytes > {max_bytes}")
        read = getattr(raw, "read1", raw.read)
        buffer = io.BytesIO()
        while True:
            if time.monotonic() > deadline:
                raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "fetch deadline exceeded")
            # Never more than max_bytes + 1 bytes held: one past the limit proves it is over.
            chunk = read(min(READ_BYTES, max_bytes + 1 - buffer.tell()))
            if not chunk:
                break
            buffer.write(chunk)
            if buffer.tell() > max_bytes:
                raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"over {max_bytes} bytes")
    if declared is not None and buffer.tell() != declared:
        got = buffer.tell()
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"{got} of {declared} bytes arrived")
    buffer.seek(0)
    return buffer


def _error_code(exc: ClientError) -> str:
    """``GetObject: NoSuchKey (HTTP 404)``: S3's messages are left out (a signature mismatch
    quotes the string it signed and the access key id)."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    code = str(error.get("Code") or "error")[:64]
    return f"{exc.operation_name}: {code} (HTTP {status})"


def _of_the_process(exc: BaseException) -> BaseException | None:
    """The process's own trouble (out of memory or descriptors) behind ``exc``, if any:
    botocore wraps the OSError of a socket that could not be made."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if of_the_process(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
