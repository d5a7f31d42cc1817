"""Waveform -> log-mel spectrogram, as an nn.Module so it ships inside the artifact."""

# No `from __future__ import annotations` here: TorchScript must resolve the class-level
# buffer annotations as real types, not strings.
import torch
import torchaudio
from torch import nn


class LogMel(nn.Module):
    """Mono waveforms [B, S] float32 -> natural-log mel power spectrogram [B, 1, n_mels, T].

    A plain log(x + eps) rather than AmplitudeToDB(top_db=...): top_db clamps relative to a
    maximum taken across the batch, which would make one item's features depend on its
    neighbours and break batched == item-by-item scoring.
    """

    eps: torch.Tensor

    def __init__(
        self,
        sample_rate: int = 22050,
        n_fft: int = 1024,
        hop_length: int = 512,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        nyquist = sample_rate / 2 if sample_rate > 0 else 0.0
        top = nyquist if f_max is None else f_max
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if n_fft < 16 or hop_length <= 0 or hop_length > n_fft:
            raise ValueError(
                f"need 16 <= n_fft, 0 < hop_length <= n_fft; got {n_fft}, {hop_length}"
            )
        if not 0 < n_mels <= n_fft // 2 + 1:
            raise ValueError(f"n_mels must be in 1..{n_fft // 2 + 1}, got {n_mels}")
        if not 0.0 <= f_min < top <= nyquist:
            raise ValueError(f"need 0 <= f_min < f_max <= {nyquist}, got {f_min}, {top}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        # The window and mel filterbank are buffers inside MelSpectrogram: built once, moved
        # by .to(device), saved with the artifact under the names every artifact and
        # checkpoint has. forward() uses them, not MelSpectrogram.forward (see there).
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            n_mels=n_mels,
            f_min=f_min,
            f_max=top,
            power=2.0,
        )
        self.register_buffer("eps", torch.tensor(eps, dtype=torch.float32))

    def num_frames(self, num_samples: int) -> int:
        """T for a clip of `num_samples` (centred STFT)."""
        return num_samples // self.hop_length + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError("LogMel expects a mono batch [B, S]")
        # Reflect padding in the centred STFT needs more than half a window of signal.
        if waveform.size(1) <= self.n_fft // 2:
            raise ValueError("clip shorter than half an FFT window")
        # MelSpectrogram(power=2.0)'s arithmetic with its own window and filterbank, two steps
        # cheaper: |X|^2 as re^2 + im^2 (abs() takes a square root that pow(2) then undoes;
        # together they were a third of the frontend on CPU), and the filterbank applied as
        # fb^T @ power, without the two transposes MelScale makes.
        stft = self.mel.spectrogram
        spec = torch.stft(
            waveform,
            self.n_fft,
            self.hop_length,
            win_length=stft.win_length,
            window=stft.window,
            center=stft.center,
            pad_mode=stft.pad_mode,
            normalized=False,  # as __init__ builds it: no window normalisation
            onesided=True,
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel.mel_scale.fb.t(), power)
        return torch.log(mel + self.eps).unsqueeze(1)
