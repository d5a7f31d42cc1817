"""An artifact's module prepared for CPU inference: frozen, batch norms folded into the
convolutions and the convolutions run by oneDNN (``torch.jit.optimize_for_inference``).

    fast = optimize_for_cpu(load("models/demo.pt", "cpu"))   # or None: serve the original

The network after the frontend runs 2-2.6x faster on one thread for the demo model
(docs/PERFORMANCE.md, "The CPU pass"). The rewrite is torch's, not ours, and changes the
arithmetic a little (folded weights, another convolution kernel), so an optimised module is
served only if it scores a fixed probe like the original, within ``TOLERANCES``; otherwise,
or if torch cannot rewrite this artifact at all, the caller keeps the original.
"""

import logging
import time
from dataclasses import dataclass, replace
from typing import cast

import torch

from popscore.artifact.errors import first_line
from popscore.artifact.protocol import STAGED_METHODS, ScoringModule, StagedScoringModule
from popscore.artifact.store import Artifact, quiet_torchscript

log = logging.getLogger(__name__)

TOLERANCES = {"popularity": 0.01, "hit_probability": 1e-4, "hit_logit": 1e-3}
"""Largest difference from the original on the probe: a hundredth of a popularity point, the GPU
check's hit-probability tolerance for CUDA with TF32 off (docs/PERFORMANCE.md, "GPU check"),
and the logit itself, which a saturated sigmoid would hide."""

_PROBE_SEED = 0


@dataclass(frozen=True)
class Parity:
    """How far the optimised module's scores are from the original's on the probe."""

    popularity: float
    hit_probability: float
    hit_logit: float

    @property
    def holds(self) -> bool:
        return all(getattr(self, key) <= limit for key, limit in TOLERANCES.items())


def optimize_for_cpu(artifact: Artifact) -> Artifact | None:
    """``artifact`` (loaded on the CPU) with its module frozen and optimised for CPU
    inference, or None when torch cannot rewrite it or the rewrite does not score the probe
    like the original."""
    started = time.perf_counter()
    try:
        fast = _rewrite(artifact)
    except Exception as exc:  # torch's rewrite refused this artifact: serve it as it is
        log.warning("model kept unoptimised: torch could not optimise it (%.300s)", first_line(exc))
        return None
    try:
        parity = compare(artifact, fast)
    except Exception as exc:  # the probe itself failed (on either module): serve as saved
        log.warning("model kept unoptimised: scoring the probe failed (%.300s)", first_line(exc))
        return None
    if not parity.holds:
        log.warning(
            "model kept unoptimised: the optimised module scores differently (%s; tolerances %s)",
            parity,
            TOLERANCES,
        )
        return None
    log.info("model optimised for CPU in %.2f s (probe: %s)", time.perf_counter() - started, parity)
    staged = cast(StagedScoringModule, fast) if artifact.staged is not None else None
    return replace(artifact, module=fast, staged=staged)


def _rewrite(artifact: Artifact) -> ScoringModule:
    module = cast(torch.jit.ScriptModule, artifact.module)
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        raise ValueError("the artifact is not on the CPU")
    methods = list(STAGED_METHODS) if artifact.staged is not None else []
    with quiet_torchscript():
        frozen = torch.jit.freeze(module, preserved_attrs=methods)
        return cast(ScoringModule, torch.jit.optimize_for_inference(frozen, other_methods=methods))


def compare(artifact: Artifact, candidate: ScoringModule) -> Parity:
    """Score one fixed probe with the artifact's module and ``candidate``, through every method
    serving calls (``forward``, and both calls when the artifact has them)."""
    waves, feats, mask = _probe(artifact)
    with torch.inference_mode():
        outputs = [_scores(artifact.module, None, waves, feats, mask)]
        outputs.append(_scores(candidate, None, waves, feats, mask))
        if artifact.staged is not None:
            staged = cast(StagedScoringModule, candidate)
            outputs.append(_scores(candidate, staged, waves, feats, mask))
    reference = outputs[0]
    worst = [
        max(float((out[i] - reference[i]).abs().max()) for out in outputs[1:]) for i in range(3)
    ]
    return Parity(*worst)


def _probe(artifact: Artifact) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four rows: with audio at a music-like and a loud level, without audio on silence and on
    quiet noise; features missing (imputed: scores mid-range, where the clamp to 0..100 and the
    sigmoid hide nothing) and present (seeded noise)."""
    meta = artifact.meta
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    samples = meta.clip_samples if artifact.uses_audio else 1
    levels = torch.tensor([0.1, 0.3, 0.0, 0.01]).unsqueeze(1)
    waves = levels * torch.randn(4, samples, generator=generator)
    feats = torch.randn(4, len(meta.features), generator=generator)
    feats[0::2] = float("nan")
    mask = torch.tensor([artifact.uses_audio, artifact.uses_audio, False, False])
    return waves, feats, mask


def _scores(
    module: ScoringModule,
    staged: StagedScoringModule | None,
    waves: torch.Tensor,
    feats: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(popularity, hit probability, hit logit)."""
    if staged is None:
        popularity, logit = module(waves, feats, mask)
    else:
        popularity, logit = staged.score_spectrogram(staged.spectrogram(waves), feats, mask)
    return popularity.float(), torch.sigmoid(logit.float()), logit.float()
