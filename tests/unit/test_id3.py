"""ID3v2 tags in front of the audio: decoded as if absent, from a file and from memory."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from consumer import id3
from consumer.audio import AudioPolicy, decode_window
from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason

RATE = 44_100
FORMATS = {"WAV": "PCM_16", "AIFF": "PCM_24", "FLAC": "PCM_16", "MP3": "MPEG_LAYER_III"}
POLICY = AudioPolicy.create(())


def tag(size: int, version: int = 4, footer: bool = False) -> bytes:
    """An ID3v2 tag whose body is ``size`` zero bytes (padding), with its footer if asked."""
    length = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    flags = 0x10 if footer else 0
    tail = b"3DI" + bytes([version, 0, flags]) + length if footer else b""
    return b"ID3" + bytes([version, 0, flags]) + length + bytes(size) + tail


TAGS = {
    "empty": tag(0),  # libsndfile refused these: "Format not recognised"
    "one byte": tag(1),
    "v2.3 padded": tag(30, version=3),
    "v2.4 with footer": tag(30, footer=True),
    "two tags": tag(0) + tag(5),
}


def encoded(fmt: str, subtype: str) -> bytes:
    noise = np.random.default_rng(7).standard_normal((RATE * 6, 2)).astype(np.float32) * 0.1
    body = io.BytesIO()
    with sf.SoundFile(body, "w", RATE, 2, subtype, format=fmt) as f:
        for start in range(0, len(noise), RATE):  # 1 s blocks (libsndfile's Vorbis encoder)
            f.write(noise[start : start + RATE])
    return body.getvalue()


@pytest.fixture(scope="module", params=sorted(FORMATS))
def audio(request: pytest.FixtureRequest) -> tuple[bytes, np.ndarray]:
    data = encoded(request.param, FORMATS[request.param])
    return data, decode_window(data, 2.0, POLICY).samples


@pytest.mark.parametrize("front", sorted(TAGS))
@pytest.mark.parametrize("where", ["file", "memory"])
def test_audio_behind_tags_decodes_the_window_it_would_without_them(
    tmp_path: Path, audio: tuple[bytes, np.ndarray], front: str, where: str
) -> None:
    data, window = audio
    tagged = TAGS[front] + data
    if where == "file":
        (tmp_path / "a").write_bytes(tagged)
        got = decode_window(open(tmp_path / "a", "rb"), 2.0, POLICY)  # noqa: SIM115 (closed)
    else:
        got = decode_window(tagged, 2.0, POLICY)
    np.testing.assert_array_equal(got.samples, window)


def test_ogg_behind_a_tag_in_memory_decodes() -> None:
    data = encoded("OGG", "VORBIS")
    window = decode_window(data, 2.0, POLICY).samples
    np.testing.assert_array_equal(decode_window(tag(0) + data, 2.0, POLICY).samples, window)


def test_tag_sizes_follow_the_header() -> None:
    assert id3.tag_size(tag(0)[:10]) == 10
    assert id3.tag_size(tag(300, version=3)[:10]) == 310
    assert id3.tag_size(tag(300, footer=True)[:10]) == 320
    footer_flag_in_v3 = b"ID3\x03\x00\x10\x00\x00\x00\x05"  # the footer exists in v2.4 only
    assert id3.tag_size(footer_flag_in_v3) == 15
    # Malformed, and stepped over as libsndfile steps over them: a size byte's top bit is
    # ignored, any version and revision taken.
    assert id3.tag_size(b"ID3\x04\x00\x00\x00\x00\x00\x85") == 15
    assert id3.tag_size(b"ID3\x05\x00\x00\x00\x00\x00\x03") == 13
    assert id3.tag_size(b"ID3\x04\xff\x00\x00\x00\x00\x00") == 10
    not_tags = [b"ID3\x04\x00\x00", b"RIFF0000WAVE"]  # cut short; audio
    assert [id3.tag_size(head) for head in not_tags] == [None] * len(not_tags)


def test_a_file_of_endless_tags_is_dead_lettered() -> None:
    with pytest.raises(DeadLetter) as excinfo:
        decode_window(tag(0) * (id3.MAX_TAGS + 1) + encoded("WAV", "PCM_16"), 2.0, POLICY)
    assert excinfo.value.reason is Reason.AUDIO_DECODE_FAILED
    assert "ID3 tags" in excinfo.value.detail


def test_the_view_behind_tags_never_seeks_back_into_them() -> None:
    body = io.BytesIO(tag(5) + b"abcdef")
    view = id3.behind_tags(body, *id3.locate(body))
    assert not isinstance(view, int)
    assert view.tell() == 0 and view.read(3) == b"abc"
    assert view.seek(-10, os.SEEK_CUR) == 0 and view.read(1) == b"a"
    assert view.seek(-2, os.SEEK_END) == 4 and view.read() == b"ef"
    assert view.seek(1) == 1 and view.read(1) == b"b"


def test_a_descriptor_is_moved_only_for_audio_libsndfile_reads_embedded(tmp_path: Path) -> None:
    """FLAC and MP3 are read by libsndfile from the descriptor itself, moved behind the tags;
    the rest through a view (libsndfile takes a descriptor's whole size as the file's)."""
    for fmt, moved in (("MP3", True), ("FLAC", True), ("WAV", False), ("OGG", False)):
        (tmp_path / "a").write_bytes(tag(20) + encoded(fmt, FORMATS.get(fmt, "VORBIS")))
        fd = os.open(tmp_path / "a", os.O_RDONLY)
        try:
            opened = id3.behind_tags(fd, *id3.locate(fd))
            assert (opened == fd) is moved, fmt
            assert os.lseek(fd, 0, os.SEEK_CUR) == 30
            if not moved:
                assert isinstance(opened, id3.Behind) and opened.tell() == 0
        finally:
            os.close(fd)


def cut(data: bytes) -> bytes:
    """The first 60 % of a file: its header states more than is there."""
    return data[: len(data) * 6 // 10]


def streamed(wav: bytes) -> bytes:
    """A WAV as written to a pipe: the RIFF and data sizes unknown (0xFFFFFFFF)."""
    data = bytearray(wav)
    data[4:8] = data[data.find(b"data") + 4 : data.find(b"data") + 8] = b"\xff" * 4
    return bytes(data)


def high_bit_tag(size: int) -> bytes:
    """A malformed tag whose last size byte has its top bit set (libsndfile ignores it)."""
    length = bytearray((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    length[3] |= 0x80
    return b"ID3\x03\x00\x00" + bytes(length) + bytes(size)


HARD = {
    # libsndfile took a moved descriptor's whole size as the file's: wrong length, or refused
    "cut WAV": lambda: cut(encoded("WAV", "PCM_16")),
    "cut AIFF": lambda: cut(encoded("AIFF", "PCM_24")),
    "streamed WAV": lambda: streamed(encoded("WAV", "PCM_16")),
    # refused at an offset
    "OGG": lambda: encoded("OGG", "VORBIS"),
    "CAF": lambda: encoded("CAF", "PCM_16"),
    "W64": lambda: encoded("W64", "PCM_16"),
    "RF64": lambda: encoded("RF64", "PCM_16"),
    "AU": lambda: encoded("AU", "PCM_16"),
}


@pytest.mark.parametrize("name", sorted(HARD))
@pytest.mark.parametrize("front", ["empty", "v2.3 padded", "high bit"])
def test_a_local_file_behind_tags_decodes_as_the_same_bytes_from_memory(
    tmp_path: Path, name: str, front: str
) -> None:
    """The same bytes give the same window from a local file and from memory, the window of
    the file without its tags."""
    data = HARD[name]()
    window = decode_window(data, 2.0, POLICY)
    tagged = (high_bit_tag(40) if front == "high bit" else TAGS[front]) + data
    (tmp_path / "a").write_bytes(tagged)
    for got in (
        decode_window(open(tmp_path / "a", "rb"), 2.0, POLICY),  # noqa: SIM115 (closed)
        decode_window(tagged, 2.0, POLICY),
    ):
        assert got.source_seconds == window.source_seconds
        np.testing.assert_array_equal(got.samples, window.samples)


@pytest.mark.parametrize("fmt", ["WAV", "OGG"])
def test_as_many_tags_as_the_limit_decode(fmt: str) -> None:
    """MAX_TAGS tags with bodies decode (the Ogg walk looks behind each tag's two ends); one
    more is refused."""
    data = encoded(fmt, FORMATS.get(fmt, "VORBIS"))
    window = decode_window(data, 2.0, POLICY).samples
    front = tag(5) * id3.MAX_TAGS
    np.testing.assert_array_equal(decode_window(front + data, 2.0, POLICY).samples, window)
    with pytest.raises(DeadLetter, match=f"over {id3.MAX_TAGS} ID3 tags"):
        decode_window(tag(5) + front + data, 2.0, POLICY)


def test_the_view_seeks_as_a_file_of_the_audio_alone_would() -> None:
    view = id3.Behind(io.BytesIO(tag(5) + b"abcdef"), 15)
    with pytest.raises(ValueError, match="negative"):
        view.seek(-1)
    assert view.seek(2**63 - 2) == 2**63 - 1 - 15  # past the end, as far as a file goes
    assert view.read(1) == b""
