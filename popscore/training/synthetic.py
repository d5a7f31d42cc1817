"""SYNTHETIC music and labels, for demos and tests only — no real releases, no real listeners.

Every track is generated from a handful of musical parameters (`TrackParams`): chords in a
key, a drum pattern at a tempo with more or less timing jitter, noise, brightness and
dynamics. Its popularity depends on those audio qualities *and* on synthetic artist and
engagement numbers, plus noise, so a model has to use both modalities to do well.
Everything is drawn from a caller-supplied `numpy.random.Generator`: same seed, same data.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from popscore.artifact.features import DEFAULT_FEATURES, extract
from schemas.events import ReleaseEvent

# fmt -> (libsndfile major format, subtype)
AUDIO_FORMATS: dict[str, tuple[str, str]] = {
    "WAV": ("WAV", "PCM_16"),
    "FLAC": ("FLAC", "PCM_16"),
    "OGG": ("OGG", "VORBIS"),
    "MP3": ("MP3", "MPEG_LAYER_III"),
}
# fmt -> (FFmpeg encoder, muxer), for what libsndfile does not write (the service reads it
# with FFmpeg: consumer/ffmpeg.py)
FFMPEG_FORMATS: dict[str, tuple[str, str]] = {"M4A": ("aac", "ipod")}
FILE_SUFFIXES: dict[str, str] = {
    "WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3", "M4A": ".m4a"
}  # fmt: skip

ENGAGEMENT_WINDOW_HOURS = 48
_TABLE_SIZE = 2048
_NOISE_PERIOD = 1 << 17
# Major key: I V vi IV; minor key: i VI III VII — (root offset in semitones, is-minor triad).
_PROGRESSIONS = {
    1: ((0, False), (7, False), (9, True), (5, False)),
    0: ((0, True), (8, False), (3, False), (10, False)),
}


@dataclass(frozen=True)
class TrackParams:
    """The musical knobs behind one synthetic track (all unit-free 0..1 unless stated)."""

    tempo: float  # BPM
    beats_per_bar: int  # 3 or 4
    regularity: float  # 1 = drums exactly on the grid, 0 = sloppy and with dropped hits
    brightness: float  # harmonic roll-off and noise colour
    dynamics: float  # depth of note decays and of the slow section swell
    percussiveness: float  # drum level against the chords
    noise: float  # background noise level
    key: int  # 0..11, C = 0
    mode: int  # 1 major, 0 minor
    level_db: float  # peak level in dBFS, <= 0


@dataclass
class SyntheticTrack:
    """A SYNTHETIC release: its generator parameters, ReleaseEvent-shaped groups, the label."""

    params: TrackParams
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    popularity: float = 0.0


def sample_params(rng: np.random.Generator) -> TrackParams:
    return TrackParams(
        tempo=float(rng.uniform(70.0, 180.0)),
        beats_per_bar=3 if rng.random() < 0.15 else 4,
        regularity=float(rng.beta(2.0, 1.5)),
        brightness=float(rng.uniform(0.0, 1.0)),
        dynamics=float(rng.uniform(0.0, 1.0)),
        percussiveness=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.beta(1.5, 4.0)),
        key=int(rng.integers(0, 12)),
        mode=int(rng.random() < 0.6),
        level_db=float(rng.uniform(-12.0, -1.0)),
    )


# --- audio --------------------------------------------------------------------------------


def _wavetable(brightness: float) -> np.ndarray:
    # One period of a harmonic tone; brighter = slower roll-off of the upper harmonics.
    harmonics = np.arange(1, 13, dtype=np.float64)
    amps = harmonics ** -(2.6 - 2.0 * brightness)
    phase = np.arange(_TABLE_SIZE) / _TABLE_SIZE
    table = (amps[:, None] * np.sin(2 * np.pi * harmonics[:, None] * phase[None, :])).sum(0)
    return (table / np.abs(table).max()).astype(np.float32)


def _chord_cycle(beat: int, params: TrackParams, sample_rate: int) -> np.ndarray:
    """Four bars of chords with a per-beat attack/decay; the whole tonal part tiles this."""
    bar = beat * params.beats_per_bar
    table = _wavetable(params.brightness)
    local_t = (np.arange(bar, dtype=np.float32) / sample_rate)[None, :]
    decay = 0.5 + 4.0 * params.dynamics
    note_env = np.exp(-decay * (np.arange(bar) % beat) / beat).astype(np.float32)
    bars = []
    for offset, minor in _PROGRESSIONS[params.mode]:
        midi = 48 + params.key + offset + np.array([0, 3 if minor else 4, 7])
        freqs = (440.0 * 2.0 ** ((midi - 69) / 12.0)).astype(np.float32)[:, None]
        # Phase restarts every bar; the chord change hides the discontinuity.
        index = ((freqs * local_t) % 1.0 * _TABLE_SIZE).astype(np.int32)
        bars.append(table[index].sum(0) * note_env)
    return np.concatenate(bars) / 3.0


def _place(n: int, onsets: np.ndarray, gains: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of `kernel` copies starting at sample `onsets`, scaled by `gains` (overlaps add)."""
    positions = onsets[:, None] + np.arange(kernel.size)[None, :]
    weights = gains[:, None] * kernel[None, :]
    inside = positions < n
    summed = np.bincount(positions[inside], weights=weights[inside], minlength=n)[:n]
    # bincount gives int64 when nothing was placed (every hit dropped).
    return summed.astype(np.float32, copy=False)


def _drums(rng: np.random.Generator, n: int, beat: int, params: TrackParams, sr: int) -> np.ndarray:
    jitter = (1.0 - params.regularity) * 0.08 * beat
    drop = (1.0 - params.regularity) * 0.35
    grid = np.arange(0, n, beat // 2)  # eighth notes
    onsets = np.clip(grid + rng.normal(0.0, jitter + 1e-9, grid.size), 0, n - 1).astype(np.int64)
    keep = rng.random(grid.size) >= drop
    on_beat = (np.arange(grid.size) % 2) == 0
    beat_no = (np.arange(grid.size) // 2) % params.beats_per_bar
    kt = np.arange(int(0.25 * sr)) / sr
    kick = np.sin(2 * np.pi * (50 * kt + 2.0 * (1 - np.exp(-kt / 0.02)))) * np.exp(-kt / 0.08)
    st = np.arange(int(0.15 * sr)) / sr
    snare = (rng.standard_normal(st.size) * 0.7 + np.sin(2 * np.pi * 185 * st)) * np.exp(-st / 0.05)
    ht = np.arange(int(0.06 * sr)) / sr
    hat_decay = 0.01 + 0.02 * params.brightness
    hat = np.diff(rng.standard_normal(ht.size + 1)) * np.exp(-ht / hat_decay)
    is_kick = keep & on_beat & (beat_no % 2 == 0)
    is_snare = keep & on_beat & (beat_no % 2 == 1)
    out = _place(n, onsets[is_kick], np.where(beat_no[is_kick] == 0, 1.0, 0.8), kick)
    out += _place(n, onsets[is_snare], np.full(is_snare.sum(), 0.6), snare)
    out += _place(n, onsets[keep], np.where(on_beat[keep], 0.15, 0.25), hat * params.brightness)
    return out


def _noise(rng: np.random.Generator, n: int, brightness: float) -> np.ndarray:
    # A few seconds of noise, tiled: nobody hears the repeat, and minutes of fresh Gaussian
    # samples were the slowest part of a long track. Boxcar low-pass via a cumulative sum:
    # darker tracks get a wider (duller) filter.
    period = min(n, _NOISE_PERIOD)
    width = 1 + round((1.0 - brightness) * 15)
    csum = np.cumsum(rng.standard_normal(period + width))
    loop = ((csum[width:] - csum[:-width]) / math.sqrt(width)).astype(np.float32)
    return np.tile(loop, n // period + 1)[:n]


def synth_audio(
    rng: np.random.Generator, seconds: float, sample_rate: int, channels: int, params: TrackParams
) -> np.ndarray:
    """A SYNTHETIC track: float32 [frames, channels] in [-1, 1], peak at `params.level_db`."""
    if seconds <= 0 or sample_rate <= 0 or channels <= 0:
        raise ValueError("seconds, sample_rate and channels must be positive")
    n = max(1, round(seconds * sample_rate))
    # The beat is a whole number of samples so the 4-bar chord cycle tiles exactly.
    beat = max(2, round(60.0 / params.tempo * sample_rate))
    cycle = _chord_cycle(beat, params, sample_rate)
    tonal = np.tile(cycle, n // cycle.size + 1)[:n]
    swell_period = 8 * beat * params.beats_per_bar
    phase = rng.uniform(0, 2 * np.pi)
    swell = np.sin(2 * np.pi * np.arange(n, dtype=np.float32) / swell_period + phase)
    tonal *= 1.0 - 0.35 * params.dynamics * (1.0 + swell)
    stems = np.stack(
        [
            tonal,
            _drums(rng, n, beat, params, sample_rate) * params.percussiveness * 1.5,
            _noise(rng, n, params.brightness) * params.noise * 0.3,
        ]
    )
    # Each channel is its own mix of the stems (a crude stereo image).
    pan = rng.uniform(0.6, 1.0, size=(channels, stems.shape[0])).astype(np.float32)
    mix = pan @ stems
    peak = float(np.abs(mix).max()) or 1.0
    mix *= np.float32(10.0 ** (params.level_db / 20.0) / peak)
    return np.clip(mix.T, -1.0, 1.0).astype(np.float32, copy=False)


# --- features and labels ----------------------------------------------------------------------


def audio_quality(params: TrackParams) -> float:
    """How much the (synthetic) audience likes the sound itself, 0..1."""
    tempo_fit = math.exp(-(((params.tempo - 122.0) / 25.0) ** 2))
    brightness_fit = max(0.0, 1.0 - 1.5 * abs(params.brightness - 0.65))
    dynamics_fit = 1.0 - 2.0 * abs(params.dynamics - 0.5)
    return (
        0.25 * tempo_fit
        + 0.15 * params.regularity
        + 0.2 * brightness_fit
        + 0.15 * params.percussiveness
        + 0.15 * (1.0 - params.noise)
        + 0.1 * dynamics_fit
    )


def _unit(value: float) -> float:
    return float(min(1.0, max(0.0, value)))


def _audio_features(rng: np.random.Generator, p: TrackParams) -> dict[str, Any]:
    """Spotify-style descriptors 'measured' from the parameters, with measurement noise."""
    tempo_fit = math.exp(-(((p.tempo - 122.0) / 25.0) ** 2))
    tempo = p.tempo * (2.0 if rng.random() < 0.05 else 1.0) * (1 + rng.normal(0, 0.01))
    return {
        "acousticness": _unit(1 - 0.7 * p.brightness - 0.3 * p.percussiveness + rng.normal(0, 0.1)),
        "danceability": _unit(
            0.45 * p.regularity + 0.35 * tempo_fit + 0.2 * p.percussiveness + rng.normal(0, 0.08)
        ),
        "energy": _unit(
            0.4 * p.percussiveness
            + 0.3 * p.brightness
            + 0.3 * (1 + p.level_db / 12)
            + rng.normal(0, 0.08)
        ),
        "instrumentalness": _unit(0.7 + rng.normal(0, 0.2)),
        "liveness": _unit(0.1 + 0.5 * p.noise + rng.normal(0, 0.05)),
        "loudness": float(p.level_db - 6.0 - 4.0 * p.dynamics + rng.normal(0, 1.0)),
        "speechiness": _unit(0.03 + abs(rng.normal(0, 0.04))),
        "valence": _unit(0.25 + 0.35 * p.mode + 0.25 * p.brightness + rng.normal(0, 0.12)),
        "tempo": round(float(tempo), 3),
        "time_signature": p.beats_per_bar,
        "key": p.key,
        "mode": p.mode,
    }


def _engagement(rng: np.random.Generator, followers: int, appeal: float) -> dict[str, Any]:
    streams = int(np.exp(0.85 * math.log1p(followers) - 0.5 + 0.9 * appeal + rng.normal(0, 0.5)))

    def share(bias: float, slope: float) -> int:
        return int(rng.binomial(streams, 1.0 / (1.0 + math.exp(-(bias + slope * appeal)))))

    return {
        "window_hours": ENGAGEMENT_WINDOW_HOURS,
        "streams": streams,
        "saves": share(-2.8, 0.6),
        "playlist_adds": share(-4.5, 0.6),
        "skips": share(-0.4, -0.5),
        "shares": share(-5.5, 0.7),
    }


# Probability that a whole optional group, or any single field, is absent from the event.
_GROUP_MISSING = {"artist": 0.05, "release": 0.05, "audio_features": 0.25, "engagement": 0.3}
_FIELD_MISSING = 0.03
_MEAN_QUALITY = 0.54  # roughly E[audio_quality] under sample_params
_ALWAYS_KEPT = {"id", "name", "genres", "window_hours"}


def _drop_missing(rng: np.random.Generator, groups: dict[str, dict[str, Any]]) -> None:
    for group in list(groups):
        if rng.random() < _GROUP_MISSING[group]:
            del groups[group]
            continue
        for name in list(groups[group]):
            if name not in _ALWAYS_KEPT and rng.random() < _FIELD_MISSING:
                del groups[group][name]


def sample_track(rng: np.random.Generator, duration_s: float | None = None) -> SyntheticTrack:
    """One SYNTHETIC release: parameters, ReleaseEvent-shaped optional groups, popularity 0..100."""
    params = sample_params(rng)
    followers = int(np.exp(rng.normal(8.5, 2.2)))
    log_f = math.log10(followers + 1)
    artist_pop = int(np.clip(round(8 * log_f + 15 + rng.normal(0, 8)), 0, 100))
    # Hidden appeal drives both engagement and the label, so engagement is informative but noisy.
    sound = audio_quality(params) - _MEAN_QUALITY
    appeal = 0.45 * (log_f - 3.7) + 5.0 * sound + rng.normal(0, 0.45)
    explicit = bool(rng.random() < 0.2)
    latent = 0.9 * appeal + 0.02 * (artist_pop - 45) + rng.normal(0, 0.3)
    artist_no = int(rng.integers(0, 10_000))
    seconds = duration_s if duration_s is not None else float(rng.uniform(120, 300))
    groups: dict[str, dict[str, Any]] = {
        "artist": {
            "id": f"synthetic-artist-{artist_no:04d}",
            "name": f"Synthetic Artist {artist_no:04d}",
            "popularity": artist_pop,
            "followers": followers,
            "genres": ["synthetic"],
        },
        "release": {"explicit": explicit, "duration_ms": round(seconds * 1000)},
        "audio_features": _audio_features(rng, params),
        "engagement": _engagement(rng, followers, appeal),
    }
    _drop_missing(rng, groups)
    popularity = 100.0 / (1.0 + math.exp(-latent))
    return SyntheticTrack(params=params, features=groups, popularity=popularity)


def release_event(
    track: SyntheticTrack, track_id: str, audio_uri: str, seconds: float | None = None
) -> ReleaseEvent:
    """The ReleaseEvent a platform would publish for ``track`` (``emitted_at``: now); with
    ``seconds``, its ``release.duration_ms`` is that of the audio file actually written."""
    groups: dict[str, Any] = dict(track.features)
    if seconds is not None:
        groups["release"] = {**groups.get("release", {}), "duration_ms": int(seconds * 1000)}
    return ReleaseEvent.model_validate(
        {
            **groups,
            "event_id": str(uuid.uuid4()),
            "track_id": track_id,
            "emitted_at": datetime.now(UTC),
            "audio_uri": audio_uri,
        },
        strict=False,
    )


# --- files and datasets ------------------------------------------------------------------------


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int, fmt: str) -> Path:
    """Write [frames, channels] (or [frames]) float audio as WAV, FLAC, OGG (Vorbis), MP3 or
    M4A (AAC)."""
    fmt = fmt.upper()
    known = sorted({*AUDIO_FORMATS, *FFMPEG_FORMATS})
    if fmt not in known:
        raise ValueError(f"unknown audio format {fmt!r}; expected one of {known}")
    frames = audio.reshape(audio.shape[0], -1) if audio.ndim == 1 else audio
    if fmt in FFMPEG_FORMATS:
        Path(path).write_bytes(encode_ffmpeg(frames.T, sample_rate, *FFMPEG_FORMATS[fmt]))
        return Path(path)
    major, subtype = AUDIO_FORMATS[fmt]
    block = max(1, int(sample_rate))
    # Written in ~1 s blocks: libsndfile 1.2.2 segfaults encoding a long Vorbis stream
    # handed over in one call, and small blocks cost nothing for the other formats.
    with sf.SoundFile(
        path, "w", samplerate=sample_rate, channels=frames.shape[1], format=major, subtype=subtype
    ) as out:
        for start in range(0, frames.shape[0], block):
            out.write(frames[start : start + block])
    return Path(path)


def encode_ffmpeg(
    audio: np.ndarray,
    sample_rate: int,
    codec: str,
    muxer: str,
    layout: str | None = None,
    frame_size: int = 0,
) -> bytes:
    """[channels, frames] float audio in [-1, 1] encoded by FFmpeg's ``codec`` into ``muxer``'s
    container (PyAV), fed in 1 s frames; ``layout`` names the channels' (default: mono,
    stereo, else FFmpeg's unnamed layout of that many); ``frame_size``: frames of that many
    samples for an encoder that takes any (PCM), else as fed."""
    import av  # noqa: PLC0415 (FFmpeg: only for the formats libsndfile does not write)

    body = io.BytesIO()
    layout = layout or {1: "mono", 2: "stereo"}.get(audio.shape[0], f"{audio.shape[0]}c")
    with av.open(body, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=sample_rate, layout=layout)
        # Frames go in packed float (one plane: PyAV 18.1 mishandles 8+ planar channels) and
        # FFmpeg converts them to what the encoder takes.
        wanted = stream.codec_context.codec.audio_formats[0].name
        convert = av.AudioResampler(
            format=wanted, layout=layout, rate=sample_rate, frame_size=frame_size or None
        )
        for start in range(0, audio.shape[1], sample_rate):
            chunk = audio[:, start : start + sample_rate].T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(chunk, dtype=np.float32), format="flt", layout=layout
            )
            frame.sample_rate = sample_rate
            for part in convert.resample(frame):
                out.mux(stream.encode(part))
        for part in convert.resample(None):
            out.mux(stream.encode(part))
        out.mux(stream.encode(None))
    return body.getvalue()


def make_dataset(
    seed: int,
    n: int,
    seconds: float,
    sample_rate: int,
    paths: Sequence[str] = DEFAULT_FEATURES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SYNTHETIC training data: mono waveforms [n, S], feature rows [n, F], popularity [n]."""
    rng = np.random.default_rng(seed)
    samples = max(1, round(seconds * sample_rate))
    waveforms = np.empty((n, samples), dtype=np.float32)
    features = np.empty((n, len(paths)), dtype=np.float32)
    popularity = np.empty(n, dtype=np.float32)
    for i in range(n):
        track = sample_track(rng)
        waveforms[i] = synth_audio(rng, seconds, sample_rate, 1, track.params)[:, 0]
        features[i] = extract(track.features, paths)
        popularity[i] = track.popularity
    return waveforms, features, popularity
