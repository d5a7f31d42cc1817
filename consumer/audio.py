"""Audio intake: URI policy, fetch, decode of the centred window, mono, resample, crop or pad.

Every failure becomes a ``DeadLetter`` with its reason, so one bad release never stops the
stream. libsndfile (via soundfile) decodes WAV, FLAC, OGG/Vorbis/Opus and MP3 and releases the
GIL, so a thread pool decodes in parallel; torchaudio only resamples.
"""

import io
import ipaddress
import os
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO, cast

import httpx
import numpy as np
import soundfile as sf

from consumer import ffmpeg, ffmpeg_sandbox, id3, vorbis
from consumer.dead_letters import of_the_process
from consumer.errors import DeadLetter
from consumer.limits import check_stated
from consumer.mixdown import BLOCK_FRAMES, mix_down
from consumer.redact import redact, redact_loggers
from consumer.resample import Clip, Resampler
from consumer.s3 import ClientShape, fetch_object
from consumer.s3uri import parse_s3_uri
from schemas.dead_letter import DeadLetterReason as Reason

MAX_REDIRECTS = 5
# One read may wait at most this share of the fetch timeout for the next bytes. The deadline
# is checked between reads, so a fetch ends by (1 + this) x the timeout at worst, a bound the
# shutdown grace period relies on (deploy/k8s, tested).
READ_STALL_SHARE = 0.25
WORST_FETCH_FACTOR = 1 + READ_STALL_SHARE
# Bodies are asked for as stored: audio gains nothing from HTTP compression, and a compressed
# body is inflated here under the byte limit (a few kB of nested gzip become GBs).
IDENTITY = {"Accept-Encoding": "identity"}


@dataclass(frozen=True)
class AudioPolicy:
    """What the service may read, and how much."""

    file_roots: tuple[Path, ...]
    allow_private_hosts: bool
    max_bytes: int
    max_seconds: float
    fetch_timeout_s: float
    s3_buckets: tuple[str, ...] = ()
    """Buckets s3:// URIs may name; empty refuses them all."""
    fetch_concurrency: int = 10
    """Threads fetching at once (the decode pool): the S3 client keeps as many connections."""
    ffmpeg_limits: ffmpeg_sandbox.Limits = ffmpeg_sandbox.DEFAULT_LIMITS
    """What one MP4 or Matroska file may cost the worker process decoding it."""

    @classmethod
    def create(
        cls,
        file_roots: tuple[Path, ...],
        allow_private_hosts: bool = False,
        max_bytes: int = 200 * 1024 * 1024,
        max_seconds: float = 1800.0,
        fetch_timeout_s: float = 15.0,
        s3_buckets: tuple[str, ...] = (),
        fetch_concurrency: int = 10,
        ffmpeg_limits: ffmpeg_sandbox.Limits = ffmpeg_sandbox.DEFAULT_LIMITS,
    ) -> "AudioPolicy":
        """Roots are resolved once here, so a symlinked root compares like its target."""
        roots = tuple(Path(r).resolve() for r in file_roots)
        return cls(
            roots,
            allow_private_hosts,
            max_bytes,
            max_seconds,
            fetch_timeout_s,
            tuple(s3_buckets),
            fetch_concurrency,
            ffmpeg_limits,
        )


# An open file or downloaded body, positioned at its start; decode_window closes it.
AudioSource = BinaryIO
# Decode threads run this much below the rest of the process (Linux nice, per thread), so the
# device stage -- one thread, the pipeline's serial step -- gets a core whenever it can run and
# the decoders take what is left: on 2 cores the compute ceiling rose from ~29 to ~31.7
# events/s (docs/PERFORMANCE.md, "Decode below the device stage").
DECODE_NICE = 10


def lower_decode_thread_priority() -> None:
    """A decode pool's thread initializer: ``DECODE_NICE`` above the process's nice, at most 19;
    best effort (a platform without per-thread nice keeps the default)."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is no process id
        return
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + DECODE_NICE))
    except (AttributeError, OSError):
        pass


# httpx logs every request URL at INFO: its userinfo and query (a presigned signature) are
# credentials.
redact_loggers("httpx", "httpcore", "httpcore.connection", "httpcore.http11", "httpcore.http2")


def open_uri(uri: str, policy: AudioPolicy) -> AudioSource:
    """``uri``'s audio, open at its start (a local file, or the fetched body), or a DeadLetter
    saying why not. The caller closes it (decode_window does)."""
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"malformed URI: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return _local_file(parsed, policy)
    if scheme in ("http", "https"):
        _check_http_uri(uri)
        return _fetch_http(uri, policy)
    if scheme == "s3":
        return _fetch_s3(uri, policy)
    raise DeadLetter(Reason.URI_UNSUPPORTED, f"scheme {scheme or '(none)'!r} is not supported")


def _check_http_uri(uri: str) -> None:
    """A URI httpx can parse, naming a host (else uri_unsupported, before any lookup)."""
    try:
        host = httpx.URL(uri).host
    except (httpx.InvalidURL, ValueError) as exc:
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"malformed URI: {redact(str(exc))}") from None
    if not host:
        raise DeadLetter(Reason.URI_UNSUPPORTED, "the URI names no host")


def _local_file(parsed: urllib.parse.SplitResult, policy: AudioPolicy) -> BinaryIO:
    """The file, opened once: what is checked (a regular file under a root, its size) is what
    is decoded, so swapping the path afterwards (for a FIFO, say) changes nothing."""
    if parsed.netloc not in ("", "localhost"):
        host = redact(f"file://{parsed.netloc}/").removeprefix("file://").rstrip("/")
        raise DeadLetter(Reason.URI_FORBIDDEN, f"file URI with host {host!r}")
    if not policy.file_roots:
        raise DeadLetter(Reason.URI_FORBIDDEN, "file URIs are disabled (no audio file roots)")
    # Resolve symlinks and '..' before the root check, so neither can escape a root.
    try:
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
    except ValueError as exc:  # an embedded NUL byte
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"malformed file URI: {exc}") from None
    if not any(path.is_relative_to(root) for root in policy.file_roots):
        raise DeadLetter(Reason.URI_FORBIDDEN, "file is outside the audio file roots")
    try:
        # No symlink may replace the resolved name, and a FIFO must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if of_the_process(exc):  # out of descriptors: the process's trouble, not the event's
            raise
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"cannot read file: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a directory, a FIFO, a device
            raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "not a regular file")
        if info.st_size > policy.max_bytes:
            raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"{info.st_size} bytes > {policy.max_bytes}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _fetch_s3(uri: str, policy: AudioPolicy) -> io.BytesIO:
    """The object, from a bucket on the allow-list, under the same limits as an http body.
    The URI is checked whole before the allow-list, and both before any network call."""
    bucket, key = parse_s3_uri(uri)  # the raw URI: urlsplit would drop tabs and newlines
    if not policy.s3_buckets:
        raise DeadLetter(Reason.URI_FORBIDDEN, "s3 URIs are disabled (no audio S3 buckets)")
    if bucket not in policy.s3_buckets:
        raise DeadLetter(Reason.URI_FORBIDDEN, f"bucket {bucket!r} is not an audio S3 bucket")
    shape = ClientShape(policy.fetch_timeout_s, policy.fetch_concurrency)
    return fetch_object(bucket, key, policy.max_bytes, shape)


def check_host(host: str, policy: AudioPolicy) -> str | None:
    """Refuse hosts that resolve to loopback, private, link-local or reserved addresses.

    Returns the checked address to connect to (None when private hosts are allowed), so a
    second DNS answer — a rebinding attack — can never send the request elsewhere."""
    if policy.allow_private_hosts:
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"cannot resolve {host!r}") from exc
    except UnicodeError as exc:  # the IDNA codec refuses it: an empty or over-long label
        raise DeadLetter(Reason.URI_UNSUPPORTED, f"malformed host {host[:100]!r}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address in _LOCAL_NAT64:  # any IPv4 may sit anywhere in it (RFC 6052 prefixes)
            raise DeadLetter(Reason.URI_FORBIDDEN, f"host {host!r} resolves to {address}")
        for form in (address, *_embedded_ipv4(address)):
            if not form.is_global or form.is_multicast:
                raise DeadLetter(Reason.URI_FORBIDDEN, f"host {host!r} resolves to {address}")
    return str(infos[0][4][0])


# IPv6 prefixes whose last 32 bits are an IPv4 address a translator or host may reach: NAT64's
# well-known prefix, IPv4-compatible, IPv4-translated (SIIT). The local-use NAT64 range is
# refused whole; an operator's own NAT64 prefix cannot be recognised (egress policy's job).
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _embedded_ipv4(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, compatible, translated, 6to4,
    Teredo's client): each must pass the check too."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    if any(address in net for net in _IPV4_IN_LAST_32_BITS):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return [a for a in found if a is not None]


def _fetch_http(uri: str, policy: AudioPolicy) -> io.BytesIO:
    """The body of ``uri`` within one deadline of ``fetch_timeout_s`` for the whole fetch,
    redirects included: each hop's connect gets the time left, each read at most a quarter of
    the timeout, and the body is cut between reads once the deadline passes, so a fetch ends
    by 1.25x the setting. DNS lookups are bounded by the resolver's own timeout; the deadline
    is checked after each."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    with httpx.Client(follow_redirects=False, verify=tls_context()) as client:
        # Redirects are followed by hand so every hop passes the host check.
        for _ in range(MAX_REDIRECTS + 1):
            url = httpx.URL(uri)
            if not url.host:  # a redirect to a host-less URL
                raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "redirected to a URI with no host")
            address = check_host(url.host, policy)
            left = _time_left(deadline)
            timeout = httpx.Timeout(left, read=min(left, READ_STALL_SHARE * policy.fetch_timeout_s))
            try:
                with _pinned_stream(client, url, address, timeout) as response:
                    if response.is_redirect and "location" in response.headers:
                        uri = str(url.join(response.headers["location"]))
                        continue
                    return _read_body(response, policy, deadline)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: a bad redirect
                detail = redact(f"{type(exc).__name__}: {exc}")
                raise DeadLetter(Reason.AUDIO_FETCH_FAILED, detail) from exc
            except UnicodeError as exc:  # IDNA, when the transport resolves the name itself
                raise DeadLetter(Reason.URI_UNSUPPORTED, f"malformed host: {exc}"[:300]) from exc
    raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"more than {MAX_REDIRECTS} redirects")


@cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (~25 ms of CPU), which a
    client per fetch would pay on every event. Contexts are safe to share between threads."""
    return httpx.create_ssl_context()


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "fetch deadline exceeded")
    return left


def _pinned_stream(
    client: httpx.Client, url: httpx.URL, address: str | None, timeout: httpx.Timeout
) -> AbstractContextManager[httpx.Response]:
    """GET ``url``, connecting to the already checked ``address`` when one is given: the Host
    header and TLS server name stay the URL's, so virtual hosts and certificates still work."""
    if address is None:
        return client.stream("GET", url, headers=IDENTITY, timeout=timeout)
    return client.stream(
        "GET",
        url.copy_with(host=address),
        headers={**IDENTITY, "Host": url.netloc.decode("ascii")},
        extensions={"sni_hostname": url.host},
        timeout=timeout,
    )


def _read_body(response: httpx.Response, policy: AudioPolicy, deadline: float) -> io.BytesIO:
    if response.status_code != 200:
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"HTTP {response.status_code}")
    inflate = Inflater.of(response.headers.get("content-encoding", ""), policy.max_bytes)
    declared = int(response.headers.get("content-length", "0") or 0)
    if declared > policy.max_bytes:
        raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"{declared} bytes > {policy.max_bytes}")
    body = io.BytesIO()  # decoded from where it was written: the body is held once
    # No chunk size: chunks come as the network delivers them, so the deadline is checked
    # even when a server drips a byte at a time. Raw, and inflated here if at all, so the
    # byte limit bounds what is held, not what was sent.
    for chunk in response.iter_raw():
        if inflate is None:
            body.write(chunk)
            if body.tell() > policy.max_bytes:
                raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"over {policy.max_bytes} bytes")
        else:
            inflate.feed(body, chunk)
        # httpx times each read; a server dripping a byte at a time needs a total deadline.
        if time.monotonic() > deadline:
            raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "fetch deadline exceeded")
    if inflate is not None and not inflate.finished():
        raise DeadLetter(Reason.AUDIO_FETCH_FAILED, "the compressed body ends early")
    body.seek(0)
    return body


GZIP_MAGIC = b"\x1f\x8b"


class Inflater:
    """One gzip or deflate layer inflated into a body, never past its byte limit.

    Fetches ask for the body as stored (``Accept-Encoding: identity``), yet an object stored
    gzip-encoded (S3 ``Content-Encoding: gzip``) comes so anyway. A gzip body may hold several
    members (RFC 1952: ``cat a.gz b.gz``), each inflated in turn; bytes after the last are
    counted against the limit and dropped, never kept. Layers on layers are refused."""

    def __init__(self, coding: str, limit: int) -> None:
        self.gzip = coding in ("gzip", "x-gzip")
        self.limit = limit
        self.stream: zlib._Decompress | None = None
        self.pending = b""  # a few bytes that may begin the next gzip member
        self.trailing = 0

    @classmethod
    def of(cls, encoding: str, limit: int) -> "Inflater | None":
        coding = encoding.strip().lower()
        if coding in ("", "identity"):
            return None
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise DeadLetter(
                Reason.AUDIO_FETCH_FAILED, f"content-encoding {coding[:50]!r} is not accepted"
            )
        return cls(coding, limit)

    def feed(self, body: io.BytesIO, chunk: bytes) -> None:
        """Inflate ``chunk`` into ``body`` (at most up to the limit at a time)."""
        data = self.pending + chunk
        self.pending = b""
        while data and body.tell() <= self.limit:
            if self.stream is None or self.stream.eof:
                data = self._next_member(data)
                if not data:
                    return
            stream = cast("zlib._Decompress", self.stream)
            try:
                body.write(stream.decompress(data, self.limit + 1 - body.tell()))
            except zlib.error as exc:
                raise DeadLetter(Reason.AUDIO_FETCH_FAILED, f"corrupt body: {exc}") from exc
            data = stream.unused_data if stream.eof else stream.unconsumed_tail
        if body.tell() > self.limit:
            raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"over {self.limit} bytes")

    def _next_member(self, data: bytes) -> bytes:
        """Start the stream (or the next gzip member) on ``data``; what follows the last
        member is counted and dropped. Returns the bytes still to inflate."""
        if self.stream is None:
            self.stream = zlib.decompressobj(wbits=self._wbits(data))
            return data
        if self.gzip and len(data) < len(GZIP_MAGIC) and GZIP_MAGIC.startswith(data):
            self.pending = data  # the next member's first byte; its second comes next
            return b""
        if self.gzip and data.startswith(GZIP_MAGIC):
            self.stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            return data
        self.trailing += len(data)
        if self.trailing > self.limit:
            raise DeadLetter(Reason.AUDIO_TOO_LARGE, f"over {self.limit} bytes after the data")
        return b""

    def _wbits(self, data: bytes) -> int:
        if self.gzip or data.startswith(GZIP_MAGIC):  # gzip sent as "deflate" happens too
            return 16 + zlib.MAX_WBITS
        # deflate is zlib-wrapped, as RFC 9110 says; some servers send it raw
        wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS

    def finished(self) -> bool:
        """The stream ended: a cut body (no end of stream) is no audio."""
        return self.stream is not None and self.stream.eof and not self.pending


def decode_window(
    source: AudioSource | Path | bytes, clip_seconds: float, policy: AudioPolicy
) -> Clip:
    """Decode only the centred ``clip_seconds`` window (seeking where the format allows), mono.
    Reads in blocks of BLOCK_FRAMES and mixes each down, so an event costs the mono window plus
    one block whatever its channel count. An open source is closed. Ogg Vorbis codebooks are
    checked first (consumer/vorbis.py: libvorbis crashes or takes GBs on a crafted few), and
    libsndfile opens the audio behind ID3v2 tags where it can (consumer/id3.py). MP4 and
    Matroska audio go to FFmpeg instead (consumer/ffmpeg.py), under the same limits."""
    try:
        with _closing(source) as handle:
            vorbis.check(handle)
            start, head = id3.locate(handle)
            if (demuxer := ffmpeg.demuxer_for(head)) is not None:
                seconds = (clip_seconds, policy.max_seconds)
                mono, rate, frames = ffmpeg_sandbox.decode_window(
                    handle, start, demuxer, seconds, policy.ffmpeg_limits
                )
            else:
                opened = id3.behind_tags(handle, start, head)
                mono, rate, frames = _sndfile_window(opened, clip_seconds, policy)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, str(exc)[:300]) from exc
    if len(mono) == 0:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "no audio frames could be read")
    # A float file may hold NaN or infinite samples (or finite ones whose mix overflows): the
    # demo model scored such a window like silence, a score of corrupt audio.
    if bad := int(np.count_nonzero(~np.isfinite(mono))):
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            f"{bad} of the window's {len(mono)} samples are not finite numbers (NaN or infinite)",
        )
    return Clip(mono, rate, frames / rate)


def _sndfile_window(
    handle: object, clip_seconds: float, policy: AudioPolicy
) -> tuple[np.ndarray, int, int]:
    """libsndfile's decode of the window: mono (possibly short), sample rate, stated frames."""
    with sf.SoundFile(handle, closefd=False) as audio:
        rate, frames = _check_header(audio, policy)
        window = min(frames, round(clip_seconds * rate))
        start = (frames - window) // 2
        block = np.empty((min(BLOCK_FRAMES, max(window, 1)), audio.channels), np.float32)
        if start and audio.seekable():
            audio.seek(start)
        else:
            _read_blocks(audio, start, block, None)  # skip to the window
        mono = np.empty(window, dtype=np.float32)
        got = _read_blocks(audio, window, block, mono)
    return mono[:got], rate, frames


def _read_blocks(
    audio: sf.SoundFile, frames: int, block: np.ndarray, mono: np.ndarray | None
) -> int:
    """Read ``frames`` frames through ``block``, mixing each block down into ``mono`` (or
    dropping it); returns the frames read (fewer when the file is shorter than its header)."""
    done = 0
    while done < frames:
        data = audio.read(out=block[: min(len(block), frames - done)])
        if len(data) == 0:
            break
        if mono is not None:
            mix_down(data, out=mono[done : done + len(data)])
        done += len(data)
    return done


@contextmanager
def _closing(source: AudioSource | Path | bytes) -> Iterator[BinaryIO | int]:
    """What libsndfile opens: an open file's (or path's) descriptor, which libsndfile reads
    itself without the GIL (through a Python file object every read is a callback holding
    the GIL, and the decode threads take turns); or an in-memory body. An open source is
    closed afterwards."""
    if isinstance(source, Path):
        source = open(source, "rb")  # noqa: SIM115 (closed below)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        yield source.fileno() if isinstance(source, io.BufferedReader) else source
    finally:
        source.close()


def _check_header(audio: sf.SoundFile, policy: AudioPolicy) -> tuple[int, int]:
    rate, frames = audio.samplerate, audio.frames
    check_stated(rate, audio.channels, frames, policy.max_seconds)
    return rate, frames


def load_clip(uri: str, policy: AudioPolicy, resampler: Resampler) -> np.ndarray:
    """The whole intake for one event: policy, fetch, decode window, mono, resample, crop/pad."""
    source = open_uri(uri, policy)
    clip = decode_window(source, resampler.clip_samples / resampler.target_rate, policy)
    return resampler(clip)
