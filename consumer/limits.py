"""What a file may state of itself, checked before anything is decoded, whichever decoder reads
it (libsndfile in-process, FFmpeg in its worker: consumer/ffmpeg_sandbox.py)."""

from collections.abc import Callable
from functools import partial

from consumer.errors import DeadLetter
from schemas.dead_letter import DeadLetterReason as Reason

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
UNKNOWN_FRAMES = 2**62  # libsndfile reports 2**63 - 1 frames for a length it does not know


def check_stated(rate: int, channels: int, frames: int, max_seconds: float) -> None:
    """Refuse a stated sample rate, channel count or length (in frames) out of bounds."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"sample rate {rate} Hz is out of range")
    if not 1 <= channels <= MAX_CHANNELS:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, f"{channels} channels is out of range")
    if frames <= 0:
        raise DeadLetter(Reason.AUDIO_DECODE_FAILED, "the file holds no audio frames")
    if frames >= UNKNOWN_FRAMES:
        # libsndfile's answer when the header leaves the length open (a FLAC written to a pipe
        # has total_samples 0): the centre cannot be found without decoding it all, and
        # libsndfile fails seeking to the end of such a stream.
        raise DeadLetter(
            Reason.AUDIO_DECODE_FAILED,
            "the file does not state its length (e.g. a FLAC streamed to a pipe): re-encode it",
        )
    if frames / rate > max_seconds:
        seconds = frames / rate
        raise DeadLetter(Reason.AUDIO_TOO_LONG, f"{seconds:.0f} s > {max_seconds:.0f} s")


def stated_checker(max_seconds: float) -> Callable[[int, int, int], None]:
    """check_stated for files at most ``max_seconds`` long."""
    return partial(check_stated, max_seconds=max_seconds)
