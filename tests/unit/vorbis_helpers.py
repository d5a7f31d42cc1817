"""Crafted Ogg Vorbis files: valid identification and comment headers, a setup header with the
codebooks asked for (a few bytes each, whatever their size), and silent audio packets."""

import struct
from dataclasses import dataclass


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


CRC = _crc_table()


def ogg_pages(
    packets: list[bytes], serial: int, seq: int, granule: int, flags: int = 0, most: int = 255
) -> bytes:
    """``packets`` laid in pages of at most ``most`` segments (255: Ogg's limit); a page that
    starts inside a packet is flagged as its continuation (flags: 2 first page of a stream,
    4 last)."""
    segments: list[tuple[bytes, bool]] = []  # (segment, ends its packet)
    for packet in packets:
        whole = len(packet) // 255
        segments += [(packet[i * 255 : (i + 1) * 255], False) for i in range(whole)]
        segments.append((packet[whole * 255 :], True))
    out, continued = b"", False
    for start in range(0, len(segments), most):
        chunk = segments[start : start + most]
        page_flags = (flags & 2 if start == 0 else 0) | (1 if continued else 0)
        last = start + most >= len(segments)
        page_flags |= flags & 4 if last else 0
        out += _page(chunk, serial, seq, granule if last else -1, page_flags)
        seq += 1
        continued = not chunk[-1][1]
    return out


def ogg_page(packets: list[bytes], serial: int, seq: int, granule: int, flags: int = 0) -> bytes:
    """One page holding whole ``packets``."""
    return ogg_pages(packets, serial, seq, granule, flags)


def _page(
    chunk: list[tuple[bytes, bool]], serial: int, seq: int, granule: int, flags: int
) -> bytes:
    lacing = bytes(len(segment) for segment, _ends in chunk)
    body = b"".join(segment for segment, _ends in chunk)
    head = b"OggS" + bytes([0, flags]) + struct.pack("<qIII", granule, serial, seq, 0)
    page = bytearray(head + bytes([len(lacing)]) + lacing + body)
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ CRC[((crc >> 24) & 0xFF) ^ byte]
    page[22:26] = struct.pack("<I", crc)
    return bytes(page)


class BitWriter:
    """Vorbis's bit packing: least significant bit first."""

    def __init__(self) -> None:
        self.value, self.bits = 0, 0

    def put(self, value: int, bits: int) -> None:
        self.value |= (value & ((1 << bits) - 1)) << self.bits
        self.bits += bits

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.bits + 7) // 8, "little")


@dataclass(frozen=True)
class Book:
    entries: int
    dim: int = 1
    lookup: int = 0  # 1: a lattice of lookup1_values(entries, dim) values


def _lookup1_values(entries: int, dim: int) -> int:
    r = int(entries ** (1.0 / dim))
    while (r + 1) ** dim <= entries:
        r += 1
    while r**dim > entries:
        r -= 1
    return r


def setup_header(books: list[Book]) -> bytes:
    """Books of one codeword length each ('ordered', a few bytes whatever the size), then the
    smallest floor, residue, mapping and mode that refer to book 0."""
    w = BitWriter()
    w.put(len(books) - 1, 8)
    for book in books:
        w.put(0x564342, 24)
        w.put(book.dim, 16)
        w.put(book.entries, 24)
        w.put(1, 1)  # ordered
        length = max(book.entries - 1, 1).bit_length()
        w.put(length - 1, 5)
        w.put(book.entries, book.entries.bit_length())  # every entry at that length
        w.put(book.lookup, 4)
        if book.lookup:
            w.put(0x60000000, 32)  # minimum
            w.put(0x60000000, 32)  # delta
            w.put(0, 4)  # one bit a value
            w.put(0, 1)  # sequence_p
            for _ in range(_lookup1_values(book.entries, book.dim)):
                w.put(1, 1)
    w.put(0, 6), w.put(0, 16)  # one time-domain entry
    w.put(0, 6), w.put(1, 16)  # one floor, type 1
    w.put(0, 5), w.put(0, 2), w.put(8, 4)  # no partitions, multiplier 1, range bits 8
    w.put(0, 6), w.put(1, 16)  # one residue, type 1
    for bits in (24, 24, 24, 6, 8):  # begin, end, partition size, classifications, groupbook
        w.put(0, bits)
    w.put(0, 3), w.put(0, 1)  # cascade
    w.put(0, 6), w.put(0, 16)  # one mapping, type 0
    w.put(0, 1), w.put(0, 1), w.put(0, 2)  # no submaps, no coupling, reserved
    w.put(0, 8), w.put(0, 8), w.put(0, 8)  # time, floor, residue of submap 0
    w.put(0, 6)  # one mode
    w.put(0, 1), w.put(0, 16), w.put(0, 16), w.put(0, 8)
    w.put(1, 1)  # framing
    return b"\x05vorbis" + w.bytes()


def vorbis_file(
    books: list[Book], serial: int = 42, setup: bytes | None = None, most: int = 255
) -> bytes:
    """A mono 44.1 kHz stream with ``books`` (or a ready ``setup`` header); its comment and
    setup headers in pages of at most ``most`` segments."""
    ident = b"\x01vorbis" + struct.pack("<IBIiiiB", 0, 1, 44_100, 0, 128_000, 0, 0x86) + b"\x01"
    comment = b"\x03vorbis" + struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0) + b"\x01"
    setup = setup if setup is not None else setup_header(books)
    out = ogg_page([ident], serial, 0, 0, flags=2)
    out += ogg_pages([comment, setup], serial, 1, 0, most=most)
    seq = 1 + len(pages(out)) - 1
    for n in range(10):  # one-byte audio packets: mode 0 (no bits with one mode)
        out += ogg_page([b"\x00"] * 20, serial, seq + n, 1280 * (n + 1), flags=4 if n == 9 else 0)
    return out


def pages(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        count = data[pos + 26]
        size = 27 + count + sum(data[pos + 27 : pos + 27 + count])
        out.append(data[pos : pos + size])
        pos += size
    return out
