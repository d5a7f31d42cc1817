"""Ogg Vorbis codebooks that would crash libvorbis, or make it take GBs, are dead-lettered
before it sees them; every encoder-made stream passes (consumer/vorbis.py)."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from consumer import vorbis
from consumer.audio import AudioPolicy, decode_window, open_uri
from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason
from tests.unit.test_audio import tone, write
from tests.unit.vorbis_helpers import BitWriter, Book, pages, setup_header, vorbis_file

ROOT = Path(__file__).resolve().parents[2]
# One book of 2**20 entries: libvorbis allocas 12 bytes an entry on the decode thread's stack
# and dies with SIGSEGV (829 bytes of file; measured with libsndfile 1.2.2, soundfile 0.14).
STACK_BOMB = [Book(1 << 20)]
# 64 books of 2**19 entries with 15-dimensional lattices: +2.2 GB and 9 s in libvorbis.
MEMORY_BOMB = [Book(1)] + [Book(1 << 19, dim=15, lookup=1)] * 63


@pytest.fixture
def policy(tmp_path: Path) -> AudioPolicy:
    return AudioPolicy.create((tmp_path,), max_bytes=5_000_000, max_seconds=60)


def refused(data: bytes) -> str:
    with pytest.raises(DeadLetter) as info:
        vorbis.check(io.BytesIO(data))
    assert info.value.reason is Reason.AUDIO_DECODE_FAILED
    return info.value.detail


def test_the_process_survives_a_file_that_crashes_libvorbis(tmp_path: Path) -> None:
    """In a child process, as the crash would kill this one: through the service's decode, the
    file is dead-lettered and the process lives on (without the check it dies of SIGSEGV, and
    so does a second stream multiplexed before an encoder's, which libsndfile opens first)."""
    bomb = tmp_path / "bomb.ogg"
    bomb.write_bytes(vorbis_file(STACK_BOMB))
    good = write(tmp_path / "good.ogg", tone(2.0, 22_050), 22_050, "OGG").read_bytes()
    first, rest = pages(vorbis_file(STACK_BOMB, serial=7)), pages(good)
    muxed = tmp_path / "muxed.ogg"  # the bomb's stream second: libsndfile decodes the first
    muxed.write_bytes(b"".join([rest[0], first[0], *rest[1:], *first[1:]]))
    disguised = []
    for name, data in disguises().items():
        disguised.append(tmp_path / f"{name}.ogg")
        disguised[-1].write_bytes(data)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from consumer.audio import AudioPolicy, decode_window\n"
        "from consumer.errors import DeadLetter\n"
        "policy = AudioPolicy.create((Path(sys.argv[1]).parent,))\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        print(len(decode_window(Path(name), 30.0, policy).samples))\n"
        "    except DeadLetter as exc:\n"
        "        print(exc.reason.value, exc.detail)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(bomb), str(muxed), *map(str, disguised)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("audio_decode_failed Vorbis codebook 0 has 1048576 entries")
    assert lines[1] == str(2 * 22_050)
    assert all(line.startswith("audio_decode_failed ") for line in lines[2:]), lines
    assert len(lines) == 2 + len(disguised)


def disguises() -> dict[str, bytes]:
    """The bomb where libsndfile still finds it and a naive walk does not (each decoded, and
    died of SIGSEGV, behind a check that read pages one after another from byte 0): junk
    between two pages (libogg resynchronises), a decoy page of small books with a wrong
    checksum before the real one (libogg drops it), an ID3v2 tag before the file (libsndfile
    skips it)."""
    bomb, benign = pages(vorbis_file(STACK_BOMB)), pages(vorbis_file([Book(300)]))
    decoy = bytearray(benign[1])
    decoy[22] ^= 0xFF
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10
    return {
        "junk": bomb[0] + b"\x00" + b"".join(bomb[1:]),
        "decoy": bomb[0] + bytes(decoy) + b"".join(bomb[1:]),
        "id3": tag + b"".join(bomb),
    }


@pytest.mark.parametrize(
    ("name", "detail"),
    [("junk", "not an Ogg page"), ("decoy", "a wrong checksum"), ("id3", "1048576 entries")],
)
def test_a_disguised_bomb_is_refused(name: str, detail: str) -> None:
    assert detail in refused(disguises()[name])


def test_a_run_of_empty_length_runs_is_refused_at_once() -> None:
    """An ordered book's lengths grow by one a run, and libvorbis refuses past 32: a setup
    header of empty runs (250 kB of zeros) is refused there, not walked to its end."""
    w = BitWriter()
    w.put(0, 8)  # one book
    w.put(0x564342, 24), w.put(1, 16), w.put(2, 24)  # sync, dim 1, 2 entries
    w.put(1, 1), w.put(0, 5)  # ordered, from length 1
    setup = b"\x05vorbis" + w.bytes() + b"\x00" * 250_000
    assert "malformed" in refused(vorbis_file([], setup=setup))


def test_a_memory_bomb_is_refused_at_once() -> None:
    detail = refused(vorbis_file(MEMORY_BOMB))
    assert "codebook 1 has 524288 entries" in detail


def test_books_within_the_limit_each_but_not_together_are_refused() -> None:
    entries = [Book(vorbis.MAX_BOOK_ENTRIES)] * (vorbis.MAX_ENTRIES // vorbis.MAX_BOOK_ENTRIES + 1)
    assert "in all" in refused(vorbis_file(entries))
    values = [Book(1)] + [Book(vorbis.MAX_BOOK_ENTRIES, dim=15, lookup=1)] * 3
    assert "values" in refused(vorbis_file(values))


def test_books_at_the_limits_pass() -> None:
    at = [Book(vorbis.MAX_BOOK_ENTRIES)] * (vorbis.MAX_ENTRIES // vorbis.MAX_BOOK_ENTRIES)
    vorbis.check(io.BytesIO(vorbis_file(at)))


@pytest.mark.parametrize("rate", [8_000, 22_050, 48_000])
@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("quality", [0.0, 0.5, 1.0])
def test_encoder_made_streams_pass_and_decode(
    tmp_path: Path, policy: AudioPolicy, rate: int, channels: int, quality: float
) -> None:
    """libvorbis's own books, at its lowest, middle and highest quality (the largest seen:
    6,561 entries a book, 19,413 in all, 85,928 values)."""
    path = tmp_path / "a.ogg"
    noise = np.random.default_rng(0).standard_normal((rate, channels)).astype(np.float32)
    audio = 0.5 * tone(1.0, rate, channels) + 0.05 * noise
    with sf.SoundFile(path, "w", rate, channels, "VORBIS", format="OGG",
                      compression_level=quality) as f:  # fmt: skip
        f.write(audio)
    with path.open("rb") as f:
        vorbis.check(f.fileno())
        assert f.tell() == 0
    clip = decode_window(open_uri(path.as_uri(), policy), 30.0, policy)
    assert len(clip.samples) == rate


def test_a_cut_or_oversized_setup_header_is_refused() -> None:
    setup = setup_header([Book(300)])
    assert "cut short" in refused(vorbis_file([], setup=setup[:12]))
    huge = setup + b"\x00" * vorbis.MAX_SETUP_BYTES
    assert f"over {vorbis.MAX_SETUP_BYTES} bytes" in refused(vorbis_file([], setup=huge))


def test_a_setup_header_across_pages_is_read_whole() -> None:
    """A packet whose page ends on a 255-byte segment goes on in the next page."""
    books = [Book(4096, lookup=1)] * 10  # 512 bytes of lattice each: a 5 kB header
    data = vorbis_file(books + STACK_BOMB, most=2)
    assert len(pages(data)) > 20  # of 510 bytes at most
    assert "codebook 10 has 1048576 entries" in refused(data)
    vorbis.check(io.BytesIO(vorbis_file(books, most=2)))


def test_other_ogg_streams_and_formats_pass_untouched(tmp_path: Path) -> None:
    for fmt, subtype in (("OGG", "OPUS"), ("FLAC", "PCM_16"), ("WAV", "PCM_16")):
        path = write(tmp_path / f"a.{subtype}", tone(1.0, 48_000), 48_000, fmt, subtype)
        body = io.BytesIO(path.read_bytes())
        vorbis.check(body)
        assert body.tell() == 0


def test_a_window_of_nan_or_infinite_samples_is_refused(
    tmp_path: Path, policy: AudioPolicy
) -> None:
    audio = tone(2.0, 22_050)
    audio[100:200] = np.nan
    audio[300] = np.inf
    path = write(tmp_path / "nan.wav", audio, 22_050, "WAV", "FLOAT")
    with pytest.raises(DeadLetter) as info:
        decode_window(open_uri(path.as_uri(), policy), 30.0, policy)
    assert info.value.reason is Reason.AUDIO_DECODE_FAILED
    assert "101 of the window's 44100 samples are not finite" in info.value.detail
