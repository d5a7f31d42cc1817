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
    not_tags = [
        b"ID3\x04\x00\x00\x00\x00\x00\x80",  # a size byte over 7 bits
        b"ID3\x05\x00\x00\x00\x00\x00\x00",  # no such version
        b"ID3\x04\xff\x00\x00\x00\x00\x00",  # no such revision
        b"ID3\x04\x00\x00",  # cut short
        b"RIFF0000WAVE",
    ]
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
    for body, moved in ((encoded("WAV", "PCM_16"), True), (b"OggS" + bytes(60), False)):
        (tmp_path / "a").write_bytes(tag(20) + body)
        fd = os.open(tmp_path / "a", os.O_RDONLY)
        try:
            assert id3.behind_tags(fd, *id3.locate(fd)) == fd
            assert os.lseek(fd, 0, os.SEEK_CUR) == (30 if moved else 0)
        finally:
            os.close(fd)
