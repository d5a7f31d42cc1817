"""Audio files written by FFmpeg (PyAV's encoders): AAC and ALAC in MP4, Opus in WebM, PCM in
Matroska and MP4, raw AAC — the formats the service decodes with FFmpeg, or refuses."""

import struct
from pathlib import Path

import numpy as np

from popscore.training.synthetic import encode_ffmpeg

FORMATS = {
    # name: (encoder, muxer), the file name's extension being the name
    "m4a": ("aac", "ipod"),
    "alac.m4a": ("alac", "ipod"),
    "webm": ("libopus", "webm"),
    "mka": ("pcm_s16le", "matroska"),
    "aac": ("aac", "adts"),
    "pcm.mov": ("pcm_s16le", "mov"),
}


def encode(
    audio: np.ndarray,
    rate: int,
    name: str,
    path: Path | None = None,
    layout: str | None = None,
    frame_size: int = 0,
) -> bytes:
    """``audio`` [channels, frames] float32 in [-1, 1] encoded as FORMATS[name]; written to
    ``path`` too when given."""
    data = encode_ffmpeg(audio, rate, *FORMATS[name], layout=layout, frame_size=frame_size)
    if path is not None:
        path.write_bytes(data)
    return data


def declaring(samples: int) -> bytes:
    """A 2 s AAC M4A whose sample tables are rewritten to declare ``samples`` samples of one
    size (the size table's size and count, and the time table's runs: the first takes them
    all), a few bytes of change."""
    data = bytearray(encode(np.zeros((1, 2 * 48_000), np.float32), 48_000, "m4a"))
    stsz, stts = data.find(b"stsz"), data.find(b"stts")
    (runs,) = struct.unpack(">I", data[stts + 8 : stts + 12])
    struct.pack_into(">II", data, stsz + 8, 6, samples)
    for run in range(runs):
        struct.pack_into(">I", data, stts + 12 + 8 * run, samples if run == 0 else 0)
    return bytes(data)
