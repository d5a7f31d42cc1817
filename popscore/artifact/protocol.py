"""What an artifact's TorchScript module does, as typing Protocols (docs/INTERFACE.md, "Model
artifact").

    ScoringModule          forward(waveform[B, S], features[B, F], audio_mask[B])
                               -> (popularity[B] on 0..100, hit_logit[B])
    StagedScoringModule    + spectrogram(waveform) -> logmel, and
                             score_spectrogram(logmel, features, audio_mask): forward in two
                             calls, so serving times the frontend apart
    ArtifactModel          a staged module ``save`` can export: its metadata (sample rate,
                           feature order, whether it listens) is read off it
"""

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

STAGED_METHODS = ("spectrogram", "score_spectrogram")


class ScoringModule(Protocol):
    """The one method every artifact has."""

    def __call__(
        self, waveform: Tensor, features: Tensor, audio_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mono waveforms at the artifact's rate, raw feature rows (NaN = missing) and which rows
        have audio -> (popularity 0..100, hit logit)."""
        ...


class StagedScoringModule(ScoringModule, Protocol):
    """An artifact whose forward() is also exported in two calls:
    ``score_spectrogram(spectrogram(w), f, m) == forward(w, f, m)``."""

    def spectrogram(self, waveform: Tensor) -> Tensor:
        """Waveforms [B, S] -> log-Mel [B, 1, M, T]; [B, 0] when the model has no audio branch."""
        ...

    def score_spectrogram(
        self, logmel: Tensor, features: Tensor, audio_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """What forward() does after the frontend."""
        ...


class ArtifactModel(StagedScoringModule, Protocol):
    """A trained model, before scripting, that describes its own inputs."""

    @property
    def feature_paths(self) -> Sequence[str]:
        """ReleaseEvent paths of its feature columns, in order."""
        ...

    @property
    def sample_rate(self) -> int:
        """The rate its waveforms must have."""
        ...

    @property
    def use_audio(self) -> bool:
        """Whether it has an audio branch (False: the audio is never fetched)."""
        ...
