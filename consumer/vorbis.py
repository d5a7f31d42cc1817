"""Ogg Vorbis setup headers, checked before libvorbis (inside libsndfile) is given them.

libvorbis sizes its decoder from the codebooks of a stream's setup header, with no limit of its
own beyond the header's field widths, and a codebook costs a few bits in the file. Measured
with libsndfile 1.2.2 (the soundfile wheel): one book of 2**20 entries overflows the decode
thread's stack (an alloca of 12 bytes an entry: SIGSEGV, the process dies); 64 books of 2**19
entries, 2 kB of file, cost +2.2 GB and 9 s; 256 of them, 6 kB, were killed at the memory
limit. Real encoders' books are small — libvorbis's, at 8–96 kHz, 1–6 channels, every quality:
at most 6,561 entries a book, 19,413 in all, 85,928 lookup values — so the limits below leave
10–25 times that room, and a stream past them is dead-lettered before libvorbis sees it.

libsndfile decodes the first logical stream of an Ogg file only (a later chained or
multiplexed stream is not opened, measured), so that stream's setup header is the one checked.
The walk to it fails closed: libogg resynchronises past junk and drops a page whose checksum
is wrong, so a page the walk cannot take as libogg would (junk, a bad checksum, a page out of
sequence) before the headers end dead-letters the file rather than letting it through. And
libsndfile finds Ogg behind ID3v2 tags too: the walk starts wherever it may.
"""

import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from consumer import id3
from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason

MAX_BOOK_ENTRIES = 65_536
MAX_ENTRIES = 1 << 19
"""Entries of all books (libvorbis keeps ~30 bytes an entry in decode tables)."""
MAX_VALUES = 1 << 21
"""Vector values of all books with a lookup table (libvorbis unpacks them to floats)."""
MAX_SETUP_BYTES = 1 << 18
# A comment header may carry cover art (MBs), so the setup header may start far into the file;
# pages are read header by header, and a stream whose setup starts later than this is refused.
MAX_HEADER_PAGES = 16_384
MAX_POSITIONS = 8 * id3.MAX_TAGS
"""Places the walk to the Ogg data looks at (10 bytes each): a file of MAX_TAGS tags needs
about two per tag."""
SYNC = 0x564342
ReadAt = id3.ReadAt
BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


class _Short(Exception):
    """The setup header ended inside a field."""


def check(handle: BinaryIO | str | int) -> None:
    """Dead-letter an Ogg Vorbis stream whose codebooks would make libvorbis crash or allocate
    without bound; anything else (other formats, Opus, FLAC in Ogg) passes untouched. Reads
    the handle at offsets, leaving its position where it was."""
    with id3.reader(handle) as read_at:
        setups = [_first_stream_setup(read_at, start) for start in _ogg_starts(read_at)]
    for setup in setups:
        if setup is None:
            continue
        try:
            _check_books(_Bits(setup))
        except _Short:
            detail = "the Vorbis setup header is cut short"
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, detail) from None


def _ogg_starts(read_at: ReadAt) -> list[int]:
    """Where libsndfile may find Ogg data: at the start, or behind ID3v2 tags (it skips each
    by its syncsafe size plus its 10-byte header; behind the optional 10-byte footer too, to
    be sure)."""
    starts, todo, seen = [], [(0, 0)], set[int]()
    while todo:
        pos, tags = todo.pop()  # ``tags``: how many were stepped over to get here
        if pos in seen:
            continue
        # Each tag has two ends to look behind: the positions are bounded too, not only the
        # tags along one way.
        if tags > id3.MAX_TAGS or len(seen) == MAX_POSITIONS:
            detail = f"over {id3.MAX_TAGS} ID3 tags before the audio"
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, detail)
        seen.add(pos)
        head = read_at(pos, 10)
        if head[:4] == b"OggS":
            starts.append(pos)
        elif head[:3] == b"ID3" and len(head) == 10:
            size = 10 + id3.syncsafe(head[6:10])
            todo += [(pos + size, tags + 1), (pos + size + 10, tags + 1)]
    return starts


@dataclass
class _Packets:
    """The first stream's packets as its pages arrive: the first and third are kept."""

    index: int = 0
    data: bytearray = field(default_factory=bytearray)
    open: bool = False
    """The last page ended inside a packet: the next must continue it."""
    vorbis: bool = False
    setup: bytes | None = None
    done: bool = False

    def feed(self, body: bytes, lacing: bytes) -> None:
        """One page's segments: a packet ends at a segment under 255 bytes, and one whose page
        ends on a 255 goes on in the next page."""
        start = first = 0
        for i, size in enumerate(lacing):
            if size < 255 or i == len(lacing) - 1:
                length = sum(lacing[first : i + 1])
                self._add(body[start : start + length], size < 255)
                start += length
                first = i + 1
                if self.done:
                    return

    def _add(self, piece: bytes, ends: bool) -> None:
        if self.index in (0, 2):
            self.data += piece[: 64 - len(self.data)] if self.index == 0 else piece
            if self.index == 2 and len(self.data) > MAX_SETUP_BYTES:
                raise DeadLetter(
                    Reason.AUDIO_DECODE_FAILED,
                    f"the Vorbis setup header is over {MAX_SETUP_BYTES} bytes",
                )
        self.open = not ends
        if not ends:
            return
        if self.index == 0:
            self.vorbis = bytes(self.data[:7]) == b"\x01vorbis"
            self.done = not self.vorbis
        elif self.index == 2:
            self.setup, self.done = bytes(self.data), True
        self.index += 1
        self.data = bytearray()


@dataclass(frozen=True)
class _Page:
    serial: bytes
    seq: int
    continued: bool
    lacing: bytes
    body: bytes
    end: int


def _first_stream_setup(read_at: ReadAt, offset: int) -> bytes | None:
    """The setup header of the first logical stream from ``offset`` when it is Vorbis, else
    None. Its pages must follow each other as written, every page whole and checksummed, until
    its headers end: anything libogg would skip or mend is refused."""
    packets, serial, seq = _Packets(), b"", -1
    for _ in range(MAX_HEADER_PAGES):
        page = _page_at(read_at, offset)
        if page is None:
            return None  # the data ends inside the headers: libvorbis gets no setup
        if not serial:
            serial, seq = page.serial, page.seq - 1
        if page.serial == serial:
            if page.seq != seq + 1 or page.continued != packets.open:
                raise _damaged(offset, "out of sequence")
            seq = page.seq
            packets.feed(page.body, page.lacing)
            if packets.done:
                return packets.setup
        offset = page.end
    if packets.vorbis:
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            f"the Vorbis headers run past {MAX_HEADER_PAGES} Ogg pages",
        )
    return None


def _page_at(read_at: ReadAt, offset: int) -> _Page | None:
    """The page at ``offset``; None where the data ends; refused when it is no whole page
    with its checksum (libogg would look for the next one)."""
    head = read_at(offset, 27)
    if len(head) < 27:
        return None
    if head[:4] != b"OggS" or head[4] != 0:
        raise _damaged(offset, "not an Ogg page")
    lacing = read_at(offset + 27, head[26])
    body = read_at(offset + 27 + len(lacing), sum(lacing))
    if len(lacing) < head[26] or len(body) < sum(lacing):
        return None
    unsummed = head[:22] + b"\0\0\0\0" + head[26:] + lacing + body
    if _ogg_crc(unsummed) != int.from_bytes(head[22:26], "little"):
        raise _damaged(offset, "a wrong checksum")
    seq = int.from_bytes(head[18:22], "little")
    end = offset + 27 + len(lacing) + len(body)
    return _Page(head[14:18], seq, bool(head[5] & 1), lacing, body, end)


def _ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected, no inversion) through zlib's
    reflected one: bytes and result bit-reversed, zlib's inversions undone. C speed: a page
    of cover art is checked in microseconds, not milliseconds."""
    reflected = zlib.crc32(data.translate(BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def _damaged(offset: int, what: str) -> DeadLetter:
    return DeadLetter(
        Reason.AUDIO_DECODE_FAILED,
        f"Ogg page at byte {offset}, before the Vorbis headers end: {what}",
    )


class _Bits:
    """Vorbis's bit packing: least significant bit first."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.end = data, 0, 8 * len(data)

    def read(self, n: int) -> int:
        if self.pos + n > self.end:
            raise _Short
        word = int.from_bytes(self.data[self.pos >> 3 : (self.pos >> 3) + 5], "little")
        value = (word >> (self.pos & 7)) & ((1 << n) - 1)
        self.pos += n
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > self.end:
            raise _Short
        self.pos += n


def _check_books(bits: _Bits) -> None:
    """Walk the codebooks (Vorbis I specification, 3.2.1) and refuse sizes past the limits."""
    if bits.read(8) != 5 or bits.data[1:7] != b"vorbis":
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the Vorbis setup header is malformed")
    bits.skip(48)
    entries_in_all = values_in_all = 0
    for book in range(bits.read(8) + 1):
        if bits.read(24) != SYNC:
            raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"Vorbis codebook {book} is malformed")
        dim, entries = bits.read(16), bits.read(24)
        entries_in_all += entries
        if entries > MAX_BOOK_ENTRIES or entries_in_all > MAX_ENTRIES:
            raise DeadLetter(
                Reason.AUDIO_DECODE_FAILED,
                f"Vorbis codebook {book} has {entries} entries ({entries_in_all} so far): over "
                f"{MAX_BOOK_ENTRIES} a book or {MAX_ENTRIES} in all, no encoder's",
            )
        _skip_lengths(bits, entries)
        values_in_all += _skip_lookup(bits, entries, dim)
        if values_in_all > MAX_VALUES:
            raise DeadLetter(
                Reason.AUDIO_DECODE_FAILED,
                f"Vorbis codebooks hold {values_in_all} values by book {book}: over "
                f"{MAX_VALUES}, no encoder's",
            )


def _skip_lengths(bits: _Bits, entries: int) -> None:
    if bits.read(1):  # ordered: runs of entries of one length, each one longer
        length, done = bits.read(5) + 1, 0
        while done < entries:
            run = bits.read((entries - done).bit_length())
            if length > 32 or run > entries - done:  # libvorbis refuses these too
                raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "a Vorbis codebook is malformed")
            done, length = done + run, length + 1
        return
    if not bits.read(1):  # every entry's 5-bit length
        bits.skip(5 * entries)
        return
    # Sparse: a used flag an entry, a length after each set one. Inline: one bit at a time
    # through read() costs ~10 ms for an encoder's header, this ~2 ms.
    data, pos = bits.data, bits.pos
    try:
        for _ in range(entries):
            pos += 6 if (data[pos >> 3] >> (pos & 7)) & 1 else 1
    except IndexError:
        raise _Short from None
    bits.skip(pos - bits.pos)


def _skip_lookup(bits: _Bits, entries: int, dim: int) -> int:
    """Skip the book's vector lookup table; returns the floats libvorbis unpacks it to."""
    kind = bits.read(4)
    if kind == 0:
        return 0
    if kind > 2:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"Vorbis lookup type {kind} is reserved")
    bits.skip(64)  # minimum and delta value
    value_bits = bits.read(4) + 1
    bits.skip(1)  # sequence_p
    stored = _lookup1_values(entries, dim) if kind == 1 else entries * dim
    bits.skip(stored * value_bits)
    return entries * dim


def _lookup1_values(entries: int, dim: int) -> int:
    """The greatest r with r ** dim <= entries (the specification's lookup1_values)."""
    if dim == 0:
        return 0
    r = int(entries ** (1.0 / dim))
    while (r + 1) ** dim <= entries:
        r += 1
    while r and r**dim > entries:
        r -= 1
    return r
