"""``popscore.json``, the metadata inside every artifact: its typed form and its one builder.

    meta = ArtifactMeta.for_model(model, model_version="v1", clip_seconds=30.0, training=...)
    ArtifactMeta.from_json(meta.to_json()) == meta

The keys are documented in docs/INTERFACE.md ("Model artifact"). Keys this version does not
know are kept in ``extra`` and written back unchanged, so re-exporting never loses them.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from popscore.artifact.errors import ArtifactError
from popscore.artifact.protocol import STAGED_METHODS, ArtifactModel
from popscore.artifact.reference import Reference

META_FILE = "popscore.json"
DEFAULT_HIT_THRESHOLD = 70.0
REQUIRED_KEYS = ("model_version", "sample_rate", "clip_seconds", "features", "hit_threshold")


@dataclass(frozen=True)
class TrainingSummary:
    """What the model was trained on and how it evaluated (the ``training`` key)."""

    data: str | None = None
    """Where the rows came from: a catalog's path, or a synthetic generator's description."""
    synthetic: bool | None = None
    """Whether the rows were generated rather than real releases; None in older artifacts."""
    rows: int | None = None
    seed: int | None = None
    variant: str | None = None
    """The model variant, e.g. ``features_only`` or ``fusion``."""
    evaluation: dict[str, Any] | None = None
    """The summary of the grouped ``popscore evaluate`` report of this data and variant."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else the trainer recorded (losses, held-out metrics, the generator's knobs)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the set fields, with the details at the same level."""
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {**self.details, **{k: v for k, v in known.items() if v is not None}}

    @classmethod
    def from_dict(cls, raw: Any) -> "TrainingSummary | None":
        """Leniently: what artifacts written before this type recorded under other keys, or
        with other types, is kept in ``details`` and written back as it was."""
        if not isinstance(raw, Mapping):
            return None
        typed = {key: raw[key] for key, kind in _SUMMARY_TYPES.items() if _is(raw.get(key), kind)}
        return cls(**typed, details={k: v for k, v in raw.items() if k not in typed})


_SUMMARY_TYPES: dict[str, type] = {
    "data": str, "synthetic": bool, "rows": int, "seed": int, "variant": str, "evaluation": dict,
}  # fmt: skip


@dataclass(frozen=True)
class ArtifactMeta:
    """The typed ``popscore.json``."""

    model_version: str
    sample_rate: int
    """Hz of the waveforms forward() takes."""
    clip_seconds: float
    """Length of the mono window serving decodes and passes (cropped or zero-padded)."""
    features: tuple[str, ...]
    """Dotted ReleaseEvent paths, in the order of the feature columns."""
    hit_threshold: float = DEFAULT_HIT_THRESHOLD
    """The decision cut: ``is_hit = popularity >= hit_threshold``."""
    hit_label_threshold: float | None = None
    """The popularity the hit head was trained to detect; None: ``hit_threshold``."""
    uses_audio: bool | None = None
    """Whether the model has an audio branch; None in artifacts written before the key."""
    exports: tuple[str, ...] | None = None
    """The module's methods; None in artifacts written before the key."""
    training: TrainingSummary | None = None
    reference: Reference | None = None
    """The training distribution drift is measured against; None in artifacts without it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, written back as they were."""

    @property
    def synthetic(self) -> bool | None:
        """Whether the model learnt from generated data; for artifacts written before the key,
        read off the data's name (the synthetic generators name themselves so)."""
        training = self.training
        if training is None:
            return None
        if training.synthetic is not None:
            return training.synthetic
        return None if training.data is None else training.data.startswith("synthetic")

    def provenance(self) -> str:
        """One line: the model, what it learnt from, and its grouped evaluation, if any."""
        training = self.training or TrainingSummary()
        rows = f", {training.rows} rows" if training.rows is not None else ""
        kind = {True: "SYNTHETIC data", False: "real data", None: "unknown data"}[self.synthetic]
        line = f"{self.model_version}: trained on {kind} ({training.data or 'unnamed'}{rows})"
        evaluation = training.evaluation or {}
        model = evaluation.get("model")
        if isinstance(model, dict) and "mae" in model:
            line += f"; grouped evaluation MAE {model['mae']}"
            interval = evaluation.get("intervals_95", {}).get("model", {}).get("mae")
            if isinstance(interval, list) and len(interval) == 2:
                line += f" (95 % {interval[0]:.2f}-{interval[1]:.2f})"
            baselines = evaluation.get("baselines", {})
            shown = [
                f"{name} {baselines[name]['mae']}"
                for name in ("mean", "ridge", "blend")
                if isinstance(baselines.get(name), dict) and "mae" in baselines[name]
            ]
            if shown:
                line += f" vs {', '.join(shown)}"
        return line

    @property
    def clip_samples(self) -> int:
        """Samples in one waveform row."""
        return round(self.sample_rate * self.clip_seconds)

    @classmethod
    def for_model(
        cls,
        model: ArtifactModel,
        *,
        model_version: str,
        clip_seconds: float,
        training: TrainingSummary,
        hit_threshold: float = DEFAULT_HIT_THRESHOLD,
        hit_label_threshold: float | None = None,
        reference: Reference | None = None,
        **extra: Any,
    ) -> "ArtifactMeta":
        """The one builder: the sample rate, feature order and audio use are read off the
        model, so the metadata cannot disagree with the weights."""
        return cls(
            model_version=model_version,
            sample_rate=int(model.sample_rate),
            clip_seconds=float(clip_seconds),
            features=tuple(model.feature_paths),
            hit_threshold=float(hit_threshold),
            hit_label_threshold=hit_label_threshold,
            uses_audio=bool(model.use_audio),
            exports=("forward", *STAGED_METHODS),
            training=training,
            reference=reference,
            extra=extra,
        ).checked()

    def replace(self, **changes: Any) -> "ArtifactMeta":
        """A copy with ``changes`` (``popscore export``), checked."""
        return replace(self, **changes).checked()

    def checked(self) -> "ArtifactMeta":
        """Self, or ArtifactError naming the first key with an unusable value."""
        if not self.model_version.strip():
            raise ArtifactError("model_version is empty")
        if any(c in self.model_version for c in ":{}") or len(self.model_version) > 256:
            # It names a Redis namespace (popscore:model:<version>:...): a ":" would let one
            # version's keys match another's prefix, a brace would move them to the wrong
            # Redis Cluster hash slot.
            raise ArtifactError(f"model_version {self.model_version[:80]!r}: at most 256 "
                                "characters, no ':' and no braces")  # fmt: skip
        if self.sample_rate <= 0 or not self.clip_seconds > 0 or self.clip_samples < 1:
            raise ArtifactError(f"sample_rate {self.sample_rate} x clip_seconds "
                                f"{self.clip_seconds} holds no sample")  # fmt: skip
        if not self.features or not all(isinstance(p, str) and p for p in self.features):
            raise ArtifactError("features must be a non-empty list of dotted paths")
        if not math.isfinite(self.hit_threshold):
            raise ArtifactError(f"hit_threshold {self.hit_threshold} is not a number")
        if self.reference is not None and list(self.reference.features) != list(self.features):
            raise ArtifactError("reference: its features are not the artifact's, in order")
        if clash := sorted(set(self.extra) & _KNOWN_KEYS):
            raise ArtifactError(f"extra keys {clash} would overwrite the metadata's own")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written into the artifact."""
        out: dict[str, Any] = {
            "model_version": self.model_version,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "features": list(self.features),
            "hit_threshold": self.hit_threshold,
        }
        if self.hit_label_threshold is not None:
            out["hit_label_threshold"] = self.hit_label_threshold
        if self.uses_audio is not None:
            out["uses_audio"] = self.uses_audio
        if self.exports is not None:
            out["exports"] = list(self.exports)
        if self.training is not None:
            out["training"] = self.training.to_dict()
        if self.reference is not None:
            out["reference"] = self.reference.to_dict()
        return {**out, **self.extra}

    def to_json(self) -> str:
        """``popscore.json`` as written."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: Any) -> "ArtifactMeta":
        """The typed view; ArtifactError naming what is missing or malformed."""
        if not isinstance(raw, Mapping):
            raise ArtifactError(f"{META_FILE} is not a JSON object")
        if missing := [key for key in REQUIRED_KEYS if key not in raw]:
            raise ArtifactError(f"{META_FILE} lacks {', '.join(missing)}")
        try:
            label = raw.get("hit_label_threshold")
            exports = raw.get("exports")
            reference = raw.get("reference")
            meta = cls(
                model_version=str(raw["model_version"]),
                sample_rate=int(raw["sample_rate"]),
                clip_seconds=float(raw["clip_seconds"]),
                features=tuple(_paths(raw["features"])),
                hit_threshold=float(raw["hit_threshold"]),
                hit_label_threshold=None if label is None else float(label),
                uses_audio=_optional_bool(raw.get("uses_audio")),
                exports=None if exports is None else tuple(str(m) for m in exports),
                training=TrainingSummary.from_dict(raw.get("training")),
                reference=None if reference is None else Reference.from_dict(reference),
                extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
            )
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{META_FILE}: {exc}") from None
        return meta.checked()

    @classmethod
    def from_json(cls, text: str | bytes) -> "ArtifactMeta":
        """Parse ``popscore.json``."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{META_FILE} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)


def _is(value: Any, kind: type) -> bool:
    # bool is an int subclass, but True rows are not a count
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _paths(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError("features must be a list of dotted paths")
    return value


def _optional_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


_KNOWN_KEYS = frozenset(f.name for f in fields(ArtifactMeta)) - {"extra"}
