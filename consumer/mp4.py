"""MP4 sample tables, checked before FFmpeg is given the file.

FFmpeg's MP4 demuxer builds an index entry for every sample the tables declare, when the file is
opened, before its length can be checked, and a count is 4 bytes of file: ~12 bytes of memory a
declared sample (FFmpeg 8, libavcodec 62, in PyAV 18.1, measured: a 2 s M4A rewritten to
declare 20 million samples cost +243 MB, a million +12 MB), and the field goes to 2^32. Real
files declare few, a sample being a codec frame: AAC's is 1,024 audio frames (47 a second at
48 kHz, 94 at 96 kHz), Opus's usually 20 ms (50 a second), ALAC's 4,096. So the declared
samples of every track (the ``stts`` and ``stsz`` tables, and each fragment's ``trun``) are
summed first, and a file declaring more than SAMPLES_PER_SECOND for each second of the longest
track allowed (``POPSCORE_AUDIO_MAX_SECONDS``: 1,800 s, 360,000 samples, ~4 MB of index,
measured) is dead-lettered.

Uncompressed audio is the exception FFmpeg makes itself: a track whose ``stts`` is one run of
duration 1 (a sample per PCM frame) is indexed by chunks of 1,024 frames, so it counts its
samples / 1,024. The walk reads box headers and these tables only, and fails closed: a box that
runs past its parent or the file dead-letters the file.
"""

import struct

import numpy as np

from consumer.errors import DeadLetter
from consumer.id3 import ReadAt
from schemas.dead_letter import DeadLetterReason as Reason

SAMPLES_PER_SECOND = 200
MAX_BOXES = 100_000
PCM_CHUNK = 1_024
CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"edts", b"mvex"}


def check(read_at: ReadAt, size: int, max_seconds: float) -> None:
    """Dead-letter an MP4 (``size`` bytes, read through ``read_at``) whose tables declare more
    samples than SAMPLES_PER_SECOND × ``max_seconds``, or whose boxes do not nest."""
    walk = _Walk(read_at)
    walk.boxes(0, size)
    declared = walk.fragments + sum(_indexed(track) for track in walk.tracks)
    if declared > (most := round(SAMPLES_PER_SECOND * max_seconds)):
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            f"the MP4 tables declare {declared} samples (at most {most}: "
            f"{SAMPLES_PER_SECOND} a second of the longest audio allowed)",
        )


class _Walk:
    def __init__(self, read_at: ReadAt) -> None:
        self.read_at = read_at
        self.tracks: list[dict[bytes, tuple[int, int]]] = []
        """Per track: its stts (samples, runs, whether one run of duration 1) and stsz."""
        self.fragments = 0
        self.seen = 0

    def boxes(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            kind, body, after = self._box(pos, end)
            if kind == b"trak":
                self.tracks.append({})
            if kind in CONTAINERS:
                self.boxes(body, after)
            elif kind in (b"stts", b"stsz", b"trun"):
                self._table(kind, body, after)
            pos = after

    def _box(self, pos: int, end: int) -> tuple[bytes, int, int]:
        """A box's type, where its body starts and where it ends."""
        self.seen += 1
        if self.seen > MAX_BOXES:
            raise _bad(f"over {MAX_BOXES} MP4 boxes")
        head = self.read_at(pos, 16)
        if len(head) < 8 or end - pos < 8:
            raise _bad("an MP4 box is cut short")
        size, kind = struct.unpack(">I4s", head[:8])
        body = pos + 8
        if size == 1:  # a 64-bit size follows the type
            if len(head) < 16:
                raise _bad("an MP4 box is cut short")
            size, body = struct.unpack(">Q", head[8:16])[0], pos + 16
        elif size == 0:  # to the end of its parent
            size = end - pos
        if size < body - pos or pos + size > end:
            raise _bad(f"the MP4 box {kind!r} runs past its parent or the file")
        return kind, body, pos + size

    def _table(self, kind: bytes, body: int, after: int) -> None:
        head = self.read_at(body, 16)
        if kind == b"trun":  # version/flags, then the fragment's sample count
            self.fragments += _field(head, 4, kind)
        elif not self.tracks:
            raise _bad(f"an MP4 {kind.decode()} table outside a track")
        elif kind == b"stsz":  # version/flags, sample size, sample count
            self.tracks[-1][kind] = (_field(head, 8, kind), 0)
        else:  # stts: version/flags, run count, then runs of (count, duration)
            runs = _field(head, 4, kind)
            if 8 + 8 * runs > after - body:
                raise _bad("the MP4 stts table runs past its box")
            self.tracks[-1][kind] = (*self._stts(body + 8, runs),)

    def _stts(self, at: int, runs: int) -> tuple[int, int]:
        """The samples of a track's runs, and 1 when it is one run of duration 1 (PCM)."""
        data = self.read_at(at, 8 * runs)
        if len(data) != 8 * runs:
            raise _bad("the MP4 stts table is cut short")
        pairs = np.frombuffer(data, dtype=">u4").reshape(runs, 2)
        samples = int(pairs[:, 0].sum(dtype=np.uint64))
        return samples, int(runs == 1 and int(pairs[0, 1]) == 1)


def _indexed(track: dict[bytes, tuple[int, int]]) -> int:
    """The index entries FFmpeg makes for a track: a sample each, or a chunk of PCM frames."""
    stts, pcm = track.get(b"stts", (0, 0))
    samples = max(stts, track.get(b"stsz", (0, 0))[0])
    return -(-samples // PCM_CHUNK) if pcm else samples


def _field(head: bytes, offset: int, kind: bytes) -> int:
    if len(head) < offset + 4:
        raise _bad(f"the MP4 {kind.decode()} table is cut short")
    value: int = struct.unpack(">I", head[offset : offset + 4])[0]
    return value


def _bad(detail: str) -> DeadLetter:
    return DeadLetter(Reason.AUDIO_DECODE_FAILED, detail)
