"""ID3v2 tags in front of the audio, stepped over before libsndfile opens it.

libsndfile skips a leading ID3v2 tag itself, but two cases go wrong (1.2.2, the soundfile
wheel, measured on files it wrote with a tag put in front):

- a tag of 0 or 1 bytes (an emptied tag; size 2 and up are fine) makes it refuse the file,
  "Format not recognised", whatever follows: MP3, FLAC, WAV and AIFF alike;
- from memory (the http and s3 bodies), a WAV or AIFF behind a tag is counted short by the
  tag's length in bytes, so the centred window moves and the file's end is lost.

Opening at the audio itself avoids both. A body in memory is handed over as a view that
starts there, so libsndfile sees a file without tags, whatever its format. A local file's
descriptor is moved there when the audio is FLAC or MP3, which libsndfile reads correctly at an
offset ("embedded" files; measured, cut files too); any other audio behind tags in a local file
is read through the same view as a body in memory. libsndfile takes a moved descriptor's whole
size as the file's: a cut or streamed WAV or AIFF behind a tag was misread or refused, and
Ogg, CAF, W64, RF64 and AU are refused at an offset.

A tag is told as libsndfile tells it ("ID3", a size whose bytes count 7 bits each, whatever
their top bit), so a malformed tag libsndfile would step over is stepped over here too, and
the v2.4 footer it overlooks is counted.
"""

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason

MAX_TAGS = 64
ReadAt = Callable[[int, int], bytes]


def locate(handle: BinaryIO | int) -> tuple[int, bytes]:
    """Where the audio starts behind ``handle``'s leading ID3v2 tags, and its first 12 bytes
    (which tell its format); the handle's position is left as it was."""
    with reader(handle) as read_at:
        start = audio_start(read_at)
        return start, read_at(start, 12)


def behind_tags(handle: BinaryIO | int, start: int, head: bytes) -> "BinaryIO | int | Behind":
    """What libsndfile should open for ``handle`` (positioned at 0) whose audio ``locate``
    found at ``start``, beginning with ``head``: the descriptor moved there when that audio is
    FLAC or an MPEG frame, else a view that starts there (of a descriptor, through a Python file
    object that leaves it open); ``handle`` as it is when it has no tags."""
    if start == 0 or not head:
        return handle
    if isinstance(handle, int):
        if _embeds(head):
            os.lseek(handle, start, os.SEEK_SET)
            return handle
        handle = open(handle, "rb", closefd=False)  # noqa: SIM115 (the descriptor's owner closes it)
    return Behind(handle, start)


def audio_start(read_at: ReadAt) -> int:
    """The offset behind the ID3v2 tags the data starts with (0 when it has none)."""
    start = 0
    for _ in range(MAX_TAGS + 1):  # the last look is for the audio behind the last tag
        size = tag_size(read_at(start, 10))
        if size is None:
            return start
        start += size
    raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"over {MAX_TAGS} ID3 tags before the audio")


def tag_size(head: bytes) -> int | None:
    """The bytes of the ID3v2 tag whose 10-byte header is ``head`` (header, body and the
    v2.4 footer), or None when ``head`` is not one. As libsndfile reads one: any version, and a
    size byte's top bit ignored (a malformed tag it steps over must be stepped over here, or a
    body in memory is counted short by the tag's bytes again)."""
    if len(head) < 10 or head[:3] != b"ID3":
        return None
    footer = 10 if head[3] == 4 and head[5] & 0x10 else 0
    return 10 + syncsafe(head[6:10]) + footer


def syncsafe(data: bytes) -> int:
    value = 0
    for byte in data:
        value = (value << 7) | (byte & 0x7F)
    return value


def _embeds(head: bytes) -> bool:
    """Whether ``head`` starts audio libsndfile reads correctly at an offset (its length does
    not come from the file's size)."""
    mpeg = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    return mpeg or head[:4] == b"fLaC"


@contextmanager
def reader(handle: BinaryIO | str | int) -> Iterator[ReadAt]:
    """Reads at offsets of a descriptor, a path or a file object, leaving its position as it
    was."""
    if isinstance(handle, int):
        yield lambda offset, n: os.pread(handle, n, offset)
        return
    if isinstance(handle, str):
        with open(handle, "rb") as f:
            fd = f.fileno()
            yield lambda offset, n: os.pread(fd, n, offset)
        return
    where = handle.tell()

    def read_at(offset: int, n: int) -> bytes:
        handle.seek(offset)
        return handle.read(n)

    try:
        yield read_at
    finally:
        handle.seek(where)


class Behind:
    """A read-only file object over ``body`` that starts ``start`` bytes in (no copy)."""

    def __init__(self, body: BinaryIO, start: int) -> None:
        self.body, self.start = body, start
        body.seek(start)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            if offset < 0:  # as a file object of the audio alone would say
                raise ValueError(f"negative seek position {offset}")
            offset = min(offset + self.start, sys.maxsize)
        self.body.seek(offset, whence)
        if self.body.tell() < self.start:  # never back into the tags
            self.body.seek(self.start)
        return self.tell()

    def tell(self) -> int:
        return self.body.tell() - self.start

    def read(self, n: int = -1) -> bytes:
        return self.body.read(n)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        got: int = self.body.readinto(buffer)  # type: ignore[attr-defined]
        return got
