"""Channels to mono, a block at a time: shared by the two decoders (libsndfile in the service,
FFmpeg in its worker processes, which load numpy and FFmpeg only)."""

import numpy as np

BLOCK_FRAMES = 65_536
"""Frames read and mixed down at a time: ≤ 16.8 MB a block at 64 channels."""


def mix_down(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[frames, channels] float32 → [frames] mono, the mean of the channels (into ``out``
    when given).

    Channel by channel: ``data.mean(axis=1)`` reduces over a tiny inner axis, many times slower
    (docs/PERFORMANCE.md, "The CPU pass")."""
    channels = data.shape[1]
    mono = np.empty(len(data), dtype=np.float32) if out is None else out
    np.copyto(mono, data[:, 0])
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums: refused after
        for ch in range(1, channels):
            mono += data[:, ch]
        if channels > 1:
            mono *= np.float32(1.0 / channels)
    return mono
