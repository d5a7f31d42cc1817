"""The artifact file: one TorchScript archive with ``popscore.json`` embedded.

    save(model, "models/x.pt", meta)          # script + save, atomically
    artifact = load("models/x.pt", "cpu")     # .module, .staged, .meta, .uses_audio
    resave(artifact.module, "y.pt", meta2)    # new metadata, same weights (popscore export)

The metadata travels as the ``_extra_files`` entry ``popscore.json``, so a file can never be
separated from the sample rate, clip length and feature order it was trained with.
"""

import copy
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from popscore.artifact.errors import ArtifactError, first_line
from popscore.artifact.meta import META_FILE, ArtifactMeta
from popscore.artifact.protocol import (
    STAGED_METHODS,
    ArtifactModel,
    ScoringModule,
    StagedScoringModule,
)

# Long enough for one STFT frame of any sensible frontend: the probe below needs one.
_PROBE_SAMPLES = 4096


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact, in eval mode on its device."""

    module: ScoringModule
    staged: StagedScoringModule | None
    """The same module when it exports spectrogram() and score_spectrogram(), else None."""
    meta: ArtifactMeta
    uses_audio: bool
    """Whether the model reads the waveform; when not, serving never fetches the audio."""


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    # torch 2.11 marks every torch.jit entry point deprecated; TorchScript is still the
    # artifact format, so silence exactly that message and nothing else.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def weights_digest(model: nn.Module, length: int = 8) -> str:
    """Short sha256 over the state dict (names and bytes): names a set of weights stably."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]


def save(model: ArtifactModel, path: str | Path, meta: ArtifactMeta) -> Path:
    """Script ``model`` (an eval-mode CPU copy; the caller's model is left as it was) and save
    it with ``meta``; the file appears atomically, so a reader never sees half of it."""
    if list(meta.features) != list(model.feature_paths):
        raise ArtifactError("meta.features differs from the model's feature order")
    if meta.sample_rate != int(model.sample_rate):
        raise ArtifactError(f"meta.sample_rate {meta.sample_rate} != model's {model.sample_rate}")
    frozen = copy.deepcopy(cast(nn.Module, model)).cpu().eval()
    with quiet_torchscript():
        scripted = torch.jit.script(frozen)
    return _write(scripted, Path(path), meta)


def resave(module: ScoringModule, path: str | Path, meta: ArtifactMeta) -> Path:
    """Write an already scripted artifact again with new metadata."""
    return _write(cast(torch.jit.ScriptModule, module), Path(path), meta)


def load(path: str | Path, device: str | torch.device = "cpu") -> Artifact:
    """Load an artifact onto ``device`` in eval mode; ArtifactError says why it cannot be."""
    if str(path).strip() in ("", "."):
        raise ArtifactError("no model artifact given (an empty path)")
    if Path(path).is_dir():
        raise ArtifactError(f"model artifact {path} is a folder, not a file")
    if not Path(path).is_file():
        raise ArtifactError(f"model artifact {path} does not exist (run `make model`)")
    extra = {META_FILE: ""}
    try:
        with quiet_torchscript():
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device, _extra_files=extra
            )
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"cannot load model artifact {path}: {first_line(exc)}") from exc
    if not extra[META_FILE]:
        raise ArtifactError(f"{path}: no embedded {META_FILE}; not a popscore artifact")
    try:
        meta = ArtifactMeta.from_json(extra[META_FILE])
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    module.eval()
    staged = _staged(module, meta, path)
    return Artifact(module, staged, meta, _uses_audio(staged, meta, torch.device(device)))


def _write(scripted: torch.jit.ScriptModule, target: Path, meta: ArtifactMeta) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        # Through a file object: given a path, torch names the archive's top folder after the
        # file (here the random temporary name) instead of a stable "archive".
        with open(tmp, "wb") as out, quiet_torchscript():
            torch.jit.save(scripted, out, _extra_files={META_FILE: meta.to_json()})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the service often runs as another user
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _staged(
    module: torch.jit.ScriptModule, meta: ArtifactMeta, path: str | Path
) -> StagedScoringModule | None:
    """The module as a StagedScoringModule when it exports both methods. Artifacts written
    before ``exports`` existed are asked for the methods themselves."""
    present = all(hasattr(module, name) for name in STAGED_METHODS)
    if meta.exports is None:
        return cast(StagedScoringModule, module) if present else None
    declared = set(STAGED_METHODS) <= set(meta.exports)
    if declared and not present:
        raise ArtifactError(f"{path}: declares {', '.join(STAGED_METHODS)} but lacks them")
    return cast(StagedScoringModule, module) if declared else None


def _uses_audio(
    staged: StagedScoringModule | None, meta: ArtifactMeta, device: torch.device
) -> bool:
    """Declared in the metadata; for older artifacts, an empty spectrogram means no audio
    branch, and a module without spectrogram() is taken to listen."""
    if meta.uses_audio is not None:
        return meta.uses_audio
    if staged is None:
        return True
    with torch.inference_mode():
        return bool(staged.spectrogram(torch.zeros(1, _PROBE_SAMPLES, device=device)).dim() == 4)
