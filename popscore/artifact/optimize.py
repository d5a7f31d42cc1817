"""An artifact's module prepared for CPU inference: frozen, batch norms folded into the
convolutions and the convolutions run by oneDNN (``torch.jit.optimize_for_inference``).

    fast = optimize_for_cpu(load("models/demo.pt", "cpu"))   # or None: serve the original

The network after the frontend runs ~2.5x faster on one thread for the demo model
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

from popscore.artifact.protocol import STAGED_METHODS, ScoringModule, StagedScoringModule
from popscore.artifact.store import Artifact, quiet_torchscript

log = logging.getLogger(__name__)

TOLERANCES = {"popularity": 0.01, "hit_probability": 1e-4}
"""Largest difference from the original on the probe: a hundredth of a popularity point, and
the GPU check's tolerance for CUDA with TF32 off (docs/PERFORMANCE.md, "GPU check")."""

_PROBE_SEED = 0


@dataclass(frozen=True)
class Parity:
    """How far the optimised module's scores are from the original's on the probe."""

    popularity: float
    hit_probability: float

    @property
    def holds(self) -> bool:
        return (
            self.popularity <= TOLERANCES["popularity"]
            and self.hit_probability <= TOLERANCES["hit_probability"]
        )


def optimize_for_cpu(artifact: Artifact) -> Artifact | None:
    """``artifact`` (loaded on the CPU) with its module frozen and optimised for CPU
    inference, or None when torch cannot rewrite it or the rewrite does not score the probe
    like the original."""
    started = time.perf_counter()
    methods = list(STAGED_METHODS) if artifact.staged is not None else []
    try:
        with quiet_torchscript():
            module = cast(torch.jit.ScriptModule, artifact.module)
            frozen = torch.jit.freeze(module, preserved_attrs=methods)
            fast = torch.jit.optimize_for_inference(frozen, other_methods=methods)
        parity = compare(artifact, cast(ScoringModule, fast))
    except Exception as exc:  # torch's rewrite refused this artifact: serve it as it is
        log.warning("model kept unoptimised: torch could not optimise it (%s)", _first(exc))
        return None
    if not parity.holds:
        log.warning(
            "model kept unoptimised: the optimised module scores differently (popularity %.3g, "
            "hit probability %.3g; tolerances %s)",
            parity.popularity,
            parity.hit_probability,
            TOLERANCES,
        )
        return None
    log.info(
        "model optimised for CPU in %.2f s (probe: popularity within %.2g, hit probability "
        "within %.2g)",
        time.perf_counter() - started,
        parity.popularity,
        parity.hit_probability,
    )
    staged = cast(StagedScoringModule, fast) if artifact.staged is not None else None
    return replace(artifact, module=cast(ScoringModule, fast), staged=staged)


def compare(artifact: Artifact, candidate: ScoringModule) -> Parity:
    """Score one fixed probe (noise with and without audio, features missing and present)
    with the artifact's module and ``candidate``, through every method serving calls."""
    waves, feats, mask = _probe(artifact)
    with torch.inference_mode():
        outputs = [_scores(artifact.module, None, waves, feats, mask)]
        outputs.append(_scores(candidate, None, waves, feats, mask))
        if artifact.staged is not None:
            staged = cast(StagedScoringModule, candidate)
            outputs.append(_scores(candidate, staged, waves, feats, mask))
    reference = outputs[0]
    pop = max(float((out[0] - reference[0]).abs().max()) for out in outputs[1:])
    prob = max(float((out[1] - reference[1]).abs().max()) for out in outputs[1:])
    return Parity(pop, prob)


def _probe(artifact: Artifact) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = artifact.meta
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    samples = meta.clip_samples if artifact.uses_audio else 1
    # Music-like level (RMS ~0.1), so the log-Mel sits where real clips put it.
    waves = 0.1 * torch.randn(2, samples, generator=generator)
    feats = torch.randn(2, len(meta.features), generator=generator)
    feats[0] = float("nan")  # every feature missing: the imputed path
    mask = torch.tensor([artifact.uses_audio, False])
    return waves, feats, mask


def _scores(
    module: ScoringModule,
    staged: StagedScoringModule | None,
    waves: torch.Tensor,
    feats: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if staged is None:
        popularity, logit = module(waves, feats, mask)
    else:
        popularity, logit = staged.score_spectrogram(staged.spectrogram(waves), feats, mask)
    return popularity.float(), torch.sigmoid(logit.float())


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
