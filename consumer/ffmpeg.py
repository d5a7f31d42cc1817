"""Audio libsndfile does not read, decoded with FFmpeg through PyAV: AAC and ALAC in MP4/M4A,
and Opus or Vorbis in WebM/Matroska — what stores and video platforms ship. Raw AAC (ADTS) is
not among them: it states no length (FFmpeg guesses one from the bit rate, 3 % long on a test
file, which moves the window by 0.2 s), like a FLAC written to a pipe, which is refused too.

This runs in a worker process (consumer/ffmpeg_sandbox.py), never in the service's own. The
container is told by its first bytes, and FFmpeg is given that one demuxer: it never probes, so
no playlist or concat demuxer (which open other files and URLs) is ever reached, and every other
open it might attempt is refused (``io_open``). The same rules as libsndfile's path hold: the
stated length is checked against the limits before any decoding, only the centred window is
decoded after a seek, each frame is mixed down to mono into a buffer of the window's size, and
any failure is the event's dead letter.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np

from consumer.errors import DeadLetter
from consumer.mixdown import BLOCK_FRAMES, mix_down
from schemas.dead_letter import DeadLetterReason as Reason

if TYPE_CHECKING:  # FFmpeg itself is loaded by the first file that needs it (decode_window)
    from av import AudioFrame, AudioResampler, AudioStream
    from av.container import InputContainer

SEEK_MARGIN_S = 1.0
"""Seek this far before the window: a demuxer may land just after the time asked for."""


def demuxer_for(head: bytes) -> str | None:
    """FFmpeg's demuxer for audio starting with ``head`` (12 bytes), or None (libsndfile's)."""
    if head[4:8] == b"ftyp":
        return "mov"  # MP4, M4A, 3GP: one demuxer
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # EBML: Matroska and WebM
    return None


Check = Callable[[int, int, int], None]
"""Refuses a stated (sample rate, channels, frames) as libsndfile's path does."""


def decode_window(
    handle: BinaryIO, demuxer: str, clip_seconds: float, check: Check, max_seconds: float
) -> tuple[np.ndarray, int, int]:
    """The centred ``clip_seconds`` window, mono float32 (possibly short), the sample rate and
    the stated length in frames. ``handle``: a file object at the audio's start."""
    import av  # noqa: PLC0415 (FFmpeg is loaded by the first such file, not by every process)

    av.logging.set_level(None)  # FFmpeg's own log lines would go to stderr unredacted
    try:
        opened = av.open(handle, format=demuxer, io_open=_refuse_open, metadata_errors="ignore")
        with cast("InputContainer", opened) as container:
            return _window(container, clip_seconds, check, max_seconds)
    except (av.FFmpegError, ValueError, TypeError, IndexError, OverflowError) as exc:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"FFmpeg ({demuxer}): {exc}"[:300]) from exc


def _refuse_open(url: str, flags: int, options: dict[str, str]) -> None:
    raise PermissionError("this audio file asks to open another file or URL; refused")


def _window(
    container: "InputContainer", clip_seconds: float, check: Check, max_seconds: float
) -> tuple[np.ndarray, int, int]:
    if not container.streams.audio:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the file holds no audio stream")
    stream = container.streams.audio[0]
    if stream.codec_context is None:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "FFmpeg has no decoder for the audio")
    stream.codec_context.thread_count = 1  # the decode pool is the parallelism
    rate = stream.codec_context.sample_rate
    frames = _stated_frames(container, stream, rate)
    check(rate, stream.codec_context.channels, frames)
    window = min(frames, round(clip_seconds * rate))
    start = (frames - window) // 2
    if start > SEEK_MARGIN_S * rate and stream.time_base:
        target = (start / rate - SEEK_MARGIN_S) / stream.time_base
        container.seek(int(target), stream=stream, backward=True)
    mono = np.empty(window, dtype=np.float32)
    budget = frames + window + round(2 * SEEK_MARGIN_S * rate)
    return mono[: _fill(container, stream, (rate, start, budget), mono)], rate, frames


def _stated_frames(container: "InputContainer", stream: "AudioStream", rate: int) -> int:
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None and container.duration > 0:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            "the file does not state its length (e.g. a live recording): re-encode it",
        )
    return max(round(seconds * rate), 0)


def _fill(
    container: "InputContainer", stream: "AudioStream", at: tuple[int, int, int], mono: np.ndarray
) -> int:
    """Decode from the seek point into ``mono`` until it is full; frames before the window's
    ``start`` are dropped, and decoding more than ``budget`` frames (the stated length, the
    window and the seek's margins) refuses the file. Returns the frames written."""
    rate, start, budget = at
    pos, decoded = None, 0
    mixer = _Mixer(mono, start)
    # Decoded frames carry the stream's time base; one float of it, not a Fraction a frame.
    to_frames = float(stream.time_base or 0) * rate
    for packet in container.demux(stream):
        for frame in packet.decode():
            if frame.sample_rate != rate:
                raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the sample rate changes mid-stream")
            pos = _position(frame.pts, to_frames, pos)
            decoded += frame.samples
            if decoded > budget:  # more audio than the file states: a lying or crafted file
                raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "decodes to more than its length")
            if mixer.add(frame, pos):
                return mixer.flush()
            pos += frame.samples
    return mixer.flush()


def _position(pts: int | None, to_frames: float, last: int | None) -> int:
    """A frame's first sample, from its timestamp (or following the last frame's)."""
    if pts is not None and to_frames:
        at = round(pts * to_frames)
        # Within the time base's resolution of where the last frame ended (Matroska's are
        # milliseconds: 44.1 frames at 44.1 kHz), it is where the last frame ended: the
        # rounded timestamp would drop or repeat a few samples.
        if last is not None and abs(at - last) <= to_frames + 1:
            return last
        return at
    if last is None:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the audio frames carry no timestamps")
    return last


class _Mixer:
    """Frames into the mono window: the part of each frame inside the window is copied into a
    block of BLOCK_FRAMES rows as float, and a full block is mixed down at once, as libsndfile's
    path does (mixing each codec frame, 1,024 samples for AAC, cost three times the decoding
    itself)."""

    def __init__(self, mono: np.ndarray, start: int) -> None:
        self.mono, self.start = mono, start
        self.got = 0
        """Frames of the window mixed into ``mono``."""
        self.block = np.empty((0, 0), dtype=np.float32)
        self.fill = 0
        self.packed: AudioResampler | None = None

    def add(self, frame: "AudioFrame", pos: int) -> bool:
        """Take ``frame`` (its first sample at ``pos`` in the file); True once the window is
        complete."""
        want = self.got + self.fill  # the window's next frame
        skip = max(0, want - (pos - self.start))
        take = min(frame.samples - skip, len(self.mono) - want)
        if take > 0:
            rows = self._rows(frame)[skip : skip + take]
            if self.block.shape[1] != rows.shape[1]:
                self.flush()
                self.block = np.empty((BLOCK_FRAMES, rows.shape[1]), dtype=np.float32)
            while len(rows):
                n = min(len(rows), len(self.block) - self.fill)
                part = self.block[self.fill : self.fill + n]
                if rows.dtype.kind == "f":
                    part[...] = rows[:n]
                else:
                    scale = np.float32(1 / 2 ** (8 * rows.dtype.itemsize - 1))
                    np.multiply(rows[:n], scale, out=part, casting="unsafe")
                    if rows.dtype.kind == "u":  # 8-bit PCM is unsigned, centred on 128
                        part -= np.float32(1.0)
                self.fill, rows = self.fill + n, rows[n:]
                if self.fill == len(self.block):
                    self.flush()
        return self.got + self.fill >= len(self.mono)

    def flush(self) -> int:
        """Mix the block into the window; returns the frames of it written."""
        if self.fill:
            mix_down(self.block[: self.fill], out=self.mono[self.got : self.got + self.fill])
            self.got, self.fill = self.got + self.fill, 0
        return self.got

    def _rows(self, frame: "AudioFrame") -> np.ndarray:
        """The frame as (samples, channels), in its own sample type: ints are scaled to
        [-1, 1] as the window's part is copied into the block (a PCM frame may be as large as
        its packet, so it is never converted whole)."""
        channels = frame.layout.nb_channels
        if frame.format.is_planar and channels >= 8:
            # PyAV 18.1 reads a planar frame's planes past its pointers at 8+ channels
            # (SIGSEGV on a 7.1 AAC): FFmpeg makes it packed (one plane) first. A layout that
            # changes mid-stream is refused by the converter.
            import av  # noqa: PLC0415 (loaded already by decode_window)

            self.packed = self.packed or av.AudioResampler(
                format="flt", layout=frame.layout, rate=frame.sample_rate
            )
            parts = [
                part.to_ndarray().reshape(-1, channels) for part in self.packed.resample(frame)
            ]
            return np.concatenate(parts) if parts else np.empty((0, channels), np.float32)
        data: np.ndarray = frame.to_ndarray()
        return data.T if frame.format.is_planar else data.reshape(-1, channels)
