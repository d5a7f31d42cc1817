"""The model artifact (CONTRACT §9): one TorchScript file with its metadata embedded.

    export_artifact(model, "models/demo.pt", meta)   # script + save, atomically
    module, meta = load_artifact("models/demo.pt")   # module.forward(waveform, features, mask)

The metadata travels as the `_extra_files` entry `popscore.json`, so a file can never be
separated from the sample rate, clip length and feature order it was trained with.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_FILE = "popscore.json"
DEFAULT_HIT_THRESHOLD = 70.0
REQUIRED_META = ("model_version", "sample_rate", "clip_seconds", "features", "hit_threshold")


class ArtifactError(ValueError):
    """An artifact (or the metadata given for one) is missing, unreadable or incomplete."""


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # torch 2.11 marks every torch.jit entry point deprecated; TorchScript is still the
    # artifact format the contract names, so silence exactly that message and nothing else.
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


def _complete_meta(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    expected = getattr(model, "feature_paths", None)
    full = {"hit_threshold": DEFAULT_HIT_THRESHOLD, **meta}
    if "features" not in full and expected is not None:
        full["features"] = list(expected)
    missing = [key for key in REQUIRED_META if key not in full]
    if missing:
        raise ArtifactError(f"artifact metadata lacks {', '.join(missing)}")
    if expected is not None and list(full["features"]) != list(expected):
        raise ArtifactError("meta['features'] differs from the model's feature order")
    rate = getattr(model, "sample_rate", None)
    if rate is not None and int(full["sample_rate"]) != int(rate):
        raise ArtifactError(f"meta sample_rate {full['sample_rate']} != model's {rate}")
    return full


def _save_atomically(scripted: torch.jit.ScriptModule, target: Path, meta_json: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        # Saved through a file object: given a path, torch names the archive's top folder
        # after the file, here the random temporary name, instead of a stable "archive".
        with open(tmp, "wb") as out:
            torch.jit.save(scripted, out, _extra_files={META_FILE: meta_json})
        # mkstemp creates 0600; the artifact is read by the service, often as another user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_artifact(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Script `model` (an eval-mode CPU copy; the caller's model is left as it was) and save it
    with `meta` embedded; the file appears atomically so a reader never sees half of it."""
    full = _complete_meta(model, meta)
    frozen = copy.deepcopy(model).cpu().eval()
    target = Path(path)
    with _quiet_torchscript():
        _save_atomically(torch.jit.script(frozen), target, json.dumps(full, indent=2))
    return target


def load_artifact(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an artifact onto `device` in eval mode -> (module, metadata)."""
    extra = {META_FILE: ""}
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"cannot load model artifact {path}: {exc}") from exc
    if not extra[META_FILE]:
        raise ArtifactError(f"{path}: no embedded {META_FILE}; not a popscore artifact")
    try:
        meta = json.loads(extra[META_FILE])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: {META_FILE} is not valid JSON") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: {META_FILE} is not a JSON object")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: {META_FILE} lacks {', '.join(missing)}")
    module.eval()
    return module, meta


def resave_artifact(module: torch.jit.ScriptModule, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write an already scripted artifact again with new metadata (`popscore export`)."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ArtifactError(f"artifact metadata lacks {', '.join(missing)}")
    target = Path(path)
    with _quiet_torchscript():
        _save_atomically(module, target, json.dumps(meta, indent=2))
    return target
