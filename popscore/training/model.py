"""FusionNet: a small audio CNN and a feature MLP, fused late, scoring one release.

    waveform [B, S] → LogMel → per-bin BatchNorm → 4 conv blocks → mean+max over time
        → audio embedding (a learned "no audio" vector where audio_mask is False) ──┐
    features [B, F] → log1p(counts) → standardise → impute NaN + missing flags ─┐   │
        → MLP → feature embedding ──────────────────────────────────────────────┼───┤
                                                                                │   ↓
        fusion MLP (+ a linear skip from the normalised features) ←─────────────┘
        → (popularity [B] = clamp(centre + scale·out₀, 0, 100), hit_logit [B] = out₁)

`use_audio=False` builds the features-only model: the CNN is never run, every item gets the
"no audio" vector, and the artifact keeps the same forward signature. `Ensemble` averages
several members (seeds) into one scriptable module.

Everything serving needs (STFT, mel filterbank, feature mean/std, imputation values) is a
buffer or parameter of this module, so the TorchScript artifact cannot drift from training.
"""

# No `from __future__ import annotations` here: TorchScript must resolve the class-level
# buffer annotations as real types, not strings.
import copy
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from popscore.artifact.features import COUNT_FEATURES, DEFAULT_FEATURES
from popscore.artifact.frontend import LogMel

# On CPU the audio path runs over slices of the batch holding at most this many samples (~47 s
# at 22050 Hz), so the STFT and the first conv stay in cache (docs/PERFORMANCE.md).
_CPU_CHUNK_SAMPLES = 1 << 20

# Standardised features are clamped: a wildly out-of-range value (a data error, or a
# release far bigger than anything in training) should saturate, not explode the MLP.
_Z_LIMIT = 8.0


class FeatureNormalizer(nn.Module):
    """Raw feature rows (NaN = missing) -> [standardised values with imputation | missing flags]."""

    is_count: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    edges: torch.Tensor
    widths: torch.Tensor

    def __init__(self, feature_paths: Sequence[str], n_bins: int = 0) -> None:
        super().__init__()
        if not feature_paths:
            raise ValueError("at least one feature is needed")
        if n_bins < 0 or n_bins == 1:
            raise ValueError(f"n_bins must be 0 (off) or >= 2, got {n_bins}")
        n = len(feature_paths)
        is_count = [path in COUNT_FEATURES for path in feature_paths]
        self.num_features = n
        self.z_limit = _Z_LIMIT
        self.register_buffer("is_count", torch.tensor(is_count, dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        # Learned, in standardised units: 0 (the training mean) is only the starting point.
        self.impute = nn.Parameter(torch.zeros(n))
        # Piecewise-linear encoding (n_bins > 0): per feature, n_bins ramps between training
        # quantiles (in standardised units), each 0 below its bin, 1 above, linear inside. A
        # linear layer over them is an additive model with a learned shape per feature, which
        # gives the MLP the step-like splits trees find on tabular data.
        self.n_bins = n_bins
        self.register_buffer("edges", torch.zeros(n, max(n_bins, 1)))
        self.register_buffer("widths", torch.ones(n, max(n_bins, 1)))

    @property
    def out_features(self) -> int:
        return (2 + self.n_bins) * self.num_features

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        # clamp(min=0) keeps log1p defined on a (schema-invalid) negative count.
        return torch.where(self.is_count, torch.log1p(x.clamp(min=0.0)), x)

    @torch.jit.ignore
    def fit(self, features: np.ndarray) -> None:
        """Set mean/std from training rows [n, F], NaN ignored; constant/empty columns get std 1."""
        x = self._transform(torch.as_tensor(np.asarray(features, dtype=np.float32)))
        if x.dim() != 2 or x.size(1) != self.num_features:
            raise ValueError(f"expected [n, {self.num_features}] features, got {tuple(x.shape)}")
        x = torch.where(torch.isfinite(x), x, torch.nan).double()
        mean = torch.nanmean(x, dim=0)
        std = torch.sqrt(torch.nanmean((x - mean) ** 2, dim=0))
        mean = torch.nan_to_num(mean, nan=0.0)
        std = torch.where(torch.isfinite(std) & (std > 1e-6), std, torch.ones_like(std))
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())
        if self.n_bins > 0:
            self._fit_bins(((x - mean) / std).clamp(-self.z_limit, self.z_limit))

    @torch.jit.ignore
    def _fit_bins(self, z: torch.Tensor) -> None:
        # Bin edges at the quantiles of each standardised column (NaN ignored); a column with
        # too few distinct values gets zero-width bins merged away (width 1, never crossed).
        probs = np.linspace(0.0, 1.0, self.n_bins + 1)
        for j in range(self.num_features):
            column = z[:, j].numpy()
            column = column[np.isfinite(column)]
            if column.size == 0:
                continue
            q = np.quantile(column, probs)
            lower, width = q[:-1], np.diff(q)
            flat = width <= 1e-6
            # A zero-width bin is a step at that value: lower it a little so it still fires.
            self.edges[j] = torch.from_numpy(np.where(flat, lower - 1e-3, lower)).float()
            self.widths[j] = torch.from_numpy(np.where(flat, 1e-3, width)).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        present = torch.isfinite(features)
        # Zero the missing entries before arithmetic so no NaN/inf reaches the gradients.
        x = self._transform(torch.where(present, features, torch.zeros_like(features)))
        z = ((x - self.mean) / self.std).clamp(-self.z_limit, self.z_limit)
        z = torch.where(present, z, self.impute.expand_as(z))
        parts = [z, (~present).to(z.dtype)]
        if self.n_bins > 0:
            ramps = ((z.unsqueeze(2) - self.edges) / self.widths).clamp(0.0, 1.0)
            parts.append(ramps.flatten(1))
        return torch.cat(parts, dim=1)


def _conv_block(c_in: int, c_out: int, first: bool) -> nn.Sequential:
    # The first block halves both axes with a strided conv instead of conv + max-pool: at full
    # spectrogram resolution that is half the CPU time for the same output shape.
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2 if first else 1, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if not first:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class AudioEncoder(nn.Module):
    """Log-mel [B, 1, M, T] -> embedding [B, dim]; pools over time so any clip length works."""

    def __init__(self, n_mels: int, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"channels must be positive, got {channels}")
        if n_mels < 2 ** len(channels):
            raise ValueError(f"n_mels={n_mels} too small for {len(channels)} pooling blocks")
        # Per-mel-bin normalisation: BatchNorm1d with one channel per bin; in eval mode it is
        # a fixed affine map fitted on training audio, so items never influence each other.
        self.bin_norm = nn.BatchNorm1d(n_mels)
        widths = [1, *channels]
        self.blocks = nn.Sequential(
            *[_conv_block(a, b, i == 0) for i, (a, b) in enumerate(pairwise(widths))]
        )
        self.project = nn.Sequential(nn.Linear(2 * widths[-1], dim), nn.ReLU(inplace=True))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        x = self.bin_norm(logmel.squeeze(1)).unsqueeze(1)
        x = self.blocks(x).mean(dim=2)  # [B, C, T']: frequency summarised first
        pooled = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)
        return self.project(pooled)


class FusionNet(nn.Module):
    """forward(waveform [B, S], features [B, F], audio_mask [B] bool) -> (popularity, hit_logit)."""

    pop_centre: torch.Tensor
    pop_scale: torch.Tensor

    def __init__(
        self,
        feature_paths: Sequence[str] = DEFAULT_FEATURES,
        sample_rate: int = 22050,
        n_mels: int = 64,
        channels: Sequence[int] = (8, 16, 32, 64),
        audio_dim: int = 64,
        feature_dim: int = 32,
        hidden: int = 64,
        dropout: float = 0.1,
        use_audio: bool = True,
        n_bins: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.feature_paths = list(feature_paths)
        self.sample_rate = sample_rate
        self.use_audio = use_audio
        self.cpu_chunk_samples = _CPU_CHUNK_SAMPLES
        self.frontend = LogMel(sample_rate=sample_rate, n_mels=n_mels)
        self.audio = AudioEncoder(n_mels, channels, audio_dim)
        self.no_audio = nn.Parameter(torch.zeros(audio_dim))
        self.normalizer = FeatureNormalizer(self.feature_paths, n_bins)
        self.features = nn.Sequential(
            nn.Dropout(dropout / 2),
            nn.Linear(self.normalizer.out_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Linear(audio_dim + feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 2),
        )
        # Wide & deep: on small tabular data (2k tracks) most of the signal is near-linear in
        # the normalised features, and the linear path learns it without the MLP overfitting.
        self.skip = nn.Linear(self.normalizer.out_features, 2)
        # The popularity output is centre + scale·out, set from the training targets so the
        # heads start at the mean and the loss works in standardised units.
        self.register_buffer("pop_centre", torch.tensor(50.0))
        self.register_buffer("pop_scale", torch.tensor(25.0))
        # Training-only: predicts popularity from the audio embedding alone, so the CNN learns
        # from every item. Without it the easier feature path wins and the audio goes unused.
        self.audio_probe = nn.Linear(audio_dim, 1)

    @torch.jit.ignore
    def fit_normalizer(self, features: np.ndarray) -> None:
        """Fit the feature mean/std buffers on training rows [n, F] before training."""
        self.normalizer.fit(features)

    @torch.jit.ignore
    def fit_target(self, popularity: np.ndarray) -> None:
        """Centre and scale of the popularity output, from the training targets."""
        target = np.asarray(popularity, dtype=np.float64)
        self.pop_centre.fill_(float(target.mean()))
        self.pop_scale.fill_(max(float(target.std()), 1.0))

    def _check_inputs(
        self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> None:
        if waveform.dim() != 2 or features.dim() != 2 or audio_mask.dim() != 1:
            raise ValueError("expected waveform [B, S], features [B, F], audio_mask [B]")
        batch = waveform.size(0)
        if features.size(0) != batch or audio_mask.size(0) != batch:
            raise ValueError("waveform, features and audio_mask disagree on batch size")
        if features.size(1) != self.normalizer.num_features:
            raise ValueError("features has the wrong number of columns for this model")

    def embed_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, S] -> audio embeddings [B, audio_dim], before no-audio substitution."""
        # Training keeps one pass because BatchNorm's batch statistics must see the whole batch;
        # in eval mode every item is independent, so slicing cannot change the result.
        if not self.use_audio:
            return self.no_audio.unsqueeze(0).expand(waveform.size(0), -1)
        per_chunk = max(1, self.cpu_chunk_samples // max(1, waveform.size(1)))
        if self.training or waveform.device.type != "cpu" or waveform.size(0) <= per_chunk:
            return self.audio(self.frontend(waveform))
        parts: list[torch.Tensor] = []
        for chunk in torch.split(waveform, per_chunk):
            parts.append(self.audio(self.frontend(chunk)))
        return torch.cat(parts, dim=0)

    def fuse(
        self, audio: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio embeddings, raw features and the mask -> (popularity 0..100, hit_logit)."""
        # torch.where, not indexing: batch-safe, and a NaN from an absent clip never leaks.
        use_audio = audio_mask.to(torch.bool).unsqueeze(1)
        audio = torch.where(use_audio, audio, self.no_audio.expand_as(audio))
        normalised = self.normalizer(features)
        fused = torch.cat([audio, self.features(normalised)], dim=1)
        out = self.head(fused) + self.skip(normalised)
        popularity = (self.pop_centre + self.pop_scale * out[:, 0]).clamp(0.0, 100.0)
        return popularity, out[:, 1]

    def forward(
        self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_inputs(waveform, features, audio_mask)
        return self.fuse(self.embed_audio(waveform), features, audio_mask)

    # forward() in two calls, so serving can time the torchaudio frontend apart from the
    # network (popscore_stage_seconds{stage="frontend"}): score_spectrogram(spectrogram(w), f,
    # m) == forward(w, f, m) in eval mode.
    @torch.jit.export
    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, S] -> log-mel [B, 1, M, T]; [B, 0] when there is no audio branch."""
        if not self.use_audio:
            return waveform.new_zeros(waveform.size(0), 0)
        return self.frontend(waveform)

    @torch.jit.export
    def score_spectrogram(
        self, logmel: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What forward() does after the frontend: (popularity 0..100, hit_logit)."""
        if features.dim() != 2 or features.size(1) != self.normalizer.num_features:
            raise ValueError("features has the wrong number of columns for this model")
        if audio_mask.dim() != 1 or audio_mask.size(0) != features.size(0):
            raise ValueError("features and audio_mask disagree on batch size")
        if self.use_audio:
            audio = self.audio(logmel)
        else:
            audio = self.no_audio.unsqueeze(0).expand(features.size(0), -1)
        return self.fuse(audio, features, audio_mask)


class Ensemble(nn.Module):
    """Several members (FusionNet seeds, a `training.trees.TreeModel`) averaged with weights:
    popularity and hit logit are weighted means (default: equal weights).

    Same forward and attributes as FusionNet, so it exports and serves unchanged; averaging
    seeds is the cheapest variance reduction on a dataset of two thousand tracks, and mixing
    model families (an MLP and trees) reduces it further.
    """

    weights: torch.Tensor

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        paths = [list(getattr(m, "feature_paths")) for m in members]  # noqa: B009
        if any(p != paths[0] for p in paths):
            raise ValueError("ensemble members disagree on their features")
        if any(getattr(m, "sample_rate") != getattr(first, "sample_rate") for m in members):  # noqa: B009
            raise ValueError("ensemble members disagree on their sample rate")
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("need one non-negative weight per member, not all zero")
        total = float(sum(weights))
        self.feature_paths = paths[0]
        self.sample_rate = int(getattr(first, "sample_rate"))  # noqa: B009
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        # One frontend for every audio member (spectrogram() runs it once per batch).
        listening = [m for m in members if getattr(m, "use_audio", False)]
        self.use_audio = bool(listening)
        self.frontend = (
            copy.deepcopy(listening[0].frontend) if listening else LogMel(self.sample_rate)
        )
        if any(not _same_frontend(m.frontend, self.frontend) for m in listening):
            raise ValueError("ensemble members disagree on their audio frontend")

    def forward(
        self, waveform: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pops: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for member in self.members:
            pop, logit = member(waveform, features, audio_mask)
            pops.append(pop)
            logits.append(logit)
        return self._blend(pops, logits)

    @torch.jit.export
    def spectrogram(self, waveform: torch.Tensor) -> torch.Tensor:
        """The members' shared frontend: log-mel [B, 1, M, T], or [B, 0] if none listens."""
        if not self.use_audio:
            return waveform.new_zeros(waveform.size(0), 0)
        return self.frontend(waveform)

    @torch.jit.export
    def score_spectrogram(
        self, logmel: torch.Tensor, features: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pops: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        for member in self.members:
            pop, logit = member.score_spectrogram(logmel, features, audio_mask)
            pops.append(pop)
            logits.append(logit)
        return self._blend(pops, logits)

    def _blend(
        self, pops: list[torch.Tensor], logits: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' weighted means of popularity and of hit logit."""
        w = self.weights.unsqueeze(1)
        return (torch.stack(pops) * w).sum(dim=0), (torch.stack(logits) * w).sum(dim=0)


def _same_frontend(a: nn.Module, b: nn.Module) -> bool:
    """Two LogMel frontends that compute alike: same settings, same buffers (window, mel
    filterbank, eps)."""

    def settings(m: nn.Module) -> tuple[object, ...]:
        stft = m.mel.spectrogram  # type: ignore[union-attr]
        return (m.sample_rate, m.n_fft, m.hop_length, m.n_mels,
                stft.center, stft.pad_mode, stft.power, stft.normalized)  # fmt: skip

    if settings(a) != settings(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )
