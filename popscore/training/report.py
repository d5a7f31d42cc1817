"""The evaluation report's files: the JSON and the out-of-fold CSV beside it, the summary an
artifact embeds, and reading a report back (docs/INTERFACE.md, "Evaluation report"). No
scikit-learn here: ``popscore export`` runs where only the service is installed.
"""

import csv
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from consumer.errors import UsageError

log = logging.getLogger(__name__)


def oof_path(report_path: str | Path) -> Path:
    path = Path(report_path)
    return path.with_name(path.name.removesuffix(".json") + ".oof.csv")


def write_report(report: dict[str, Any], prediction: np.ndarray, target: np.ndarray,
                 path: str | Path) -> Path:  # fmt: skip
    """The report JSON at `path` and the OOF CSV (row, target, prediction) beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    oof = oof_path(path)
    report = {**report, "oof": oof.name}
    path.write_text(json.dumps(_no_nan(report), indent=2, default=_plain, allow_nan=False) + "\n")
    with oof.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["row", "target", "prediction"])
        for i, (y, p) in enumerate(zip(target, prediction, strict=True)):
            out.writerow([i, f"{float(y):g}", f"{float(p):.4f}"])
    return oof


def _no_nan(value: Any) -> Any:
    # NaN (e.g. ROC-AUC with one class present) is not JSON: it is written as null.
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    # numpy scalars become plain Python numbers.
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers an artifact carries about its evaluation (its ``training.evaluation``)."""

    def brief(block: dict[str, Any]) -> dict[str, float | None]:
        m = block["metrics"]
        out = {"mae": m["mae"], "rmse": m["rmse"], "r2": m["r2"]}
        for t, at in m["at"].items():
            out |= {f"roc_auc@{t}": at["roc_auc"], f"macro_f1@{t}": at["macro_f1"]}
            if "roc_auc_fold_mean" in at:  # reports from before it have none
                out[f"roc_auc_fold_mean@{t}"] = at["roc_auc_fold_mean"]
        return {k: None if v is None else round(v, 4) for k, v in out.items()}

    model = report["models"][report["model"]]
    out = {
        "source": report["data"]["source"],
        "split": {k: report["split"][k] for k in ("method", "folds", "seed")},
        "model": brief(model),
        "baselines": {name: brief(b) for name, b in report["baselines"].items()},
    }
    # The headline intervals (reports written before they existed have none).
    intervals = report.get("intervals", {})
    kept = {
        name: {metric: [round(v["low"], 4), round(v["high"], 4)] for metric, v in block.items()}
        for name, block in intervals.items()
        if name in {"model", "model - ridge", "model - blend"}
    }
    if kept:
        out["intervals_95"] = kept
    return out


@dataclass(frozen=True)
class Trained:
    """What an evaluation report must describe to be embedded in a model's artifact: what is
    known of the model (None: not known, not checked)."""

    features: tuple[str, ...]
    variant: str | None = None
    rows: int | None = None
    seed: int | None = None
    train: dict[str, Any] | None = None  # the TrainConfig as a dict (its seed is not compared)
    source: str | None = None  # where the rows came from: a catalog, or a generator
    synthetic: bool = False  # generated rows: `source` is what identifies them
    sha256: str | None = None  # the catalog's digest: what identifies a catalog


def read_evaluation(path: Path, trained: Trained | None = None) -> dict[str, Any]:
    """The report's summary and per-fold cuts; it must be an ``evaluate`` report, and of the
    model described by ``trained`` when given (UsageError naming the first difference)."""
    try:
        report = json.loads(path.read_text())
        evaluation = {
            **summary(report),
            "fold_cuts": report["models"][report["model"]]["fold_cuts"],
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--evaluation {path}: not a `popscore evaluate` report ({exc!r})"
        ) from None
    mismatch = None if trained is None else _first_mismatch(report, path, trained)
    if mismatch:
        raise UsageError(f"--evaluation {path}: {mismatch}")
    return evaluation


def _first_mismatch(report: dict[str, Any], path: Path, trained: Trained) -> str | None:
    data = report["data"]
    evaluated, rows = report["model"], data["rows"]
    if (trained.variant or evaluated, trained.rows or rows) != (evaluated, rows):
        return (
            f"it evaluated {evaluated} on {rows} rows; "
            f"this run trains {trained.variant} on {trained.rows}"
        )
    features = tuple(data.get("features") or ())
    if features != trained.features:
        return _feature_difference(features, trained.features)
    if not _same_data(report, path, trained):
        return f"it evaluated the data {data['source']}, not this model's {trained.source}"
    seed = report["split"].get("seed")
    if trained.seed is not None and seed != trained.seed:
        return f"it evaluated seed {seed}, this model's seed is {trained.seed}"
    recorded = report["models"][evaluated].get("train")
    if trained.train is not None and recorded is not None:
        for key, value in trained.train.items():
            if key != "seed" and recorded.get(key) != value:
                return f"its {key} is {recorded.get(key)!r}, this model's {value!r}"
    return None


def _feature_difference(evaluated: tuple[str, ...], trained: tuple[str, ...]) -> str:
    if not evaluated:
        return "it records no feature list to check against this model's"
    first = next(
        i for i in range(max(len(evaluated), len(trained)))
        if evaluated[i : i + 1] != trained[i : i + 1]
    )  # fmt: skip
    ours = trained[first] if first < len(trained) else "nothing"
    theirs = evaluated[first] if first < len(evaluated) else "nothing"
    return (
        f"its {len(evaluated)} features are not this model's {len(trained)} "
        f"(feature {first + 1}: {theirs} in the report, {ours} here)"
    )


def _same_data(report: dict[str, Any], path: Path, trained: Trained) -> bool:
    if trained.synthetic:
        return bool(report["data"]["source"] == trained.source)
    if trained.sha256 is None:  # an older artifact: its catalog is not known
        return True
    recorded = report["data"].get("sha256")
    if not recorded:  # a report from before the digest: its catalog, if it is still there
        found = report_source(report, path)
        if not found.is_file():
            log.warning(
                "%s: its catalog %s is not found to compare; taken as this model's",
                path, report["data"]["source"],
            )  # fmt: skip
            return True
        recorded = file_digest(found)
    return bool(recorded == trained.sha256)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes. Read once per process while the file is unchanged: a train
    run asks it of its catalog for the report check, for the artifact and for an older report."""
    info = path.stat()
    return _digest_of(str(path.resolve()), info.st_size, info.st_mtime_ns)


@cache
def _digest_of(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def catalog_identity(path: Path) -> dict[str, str]:
    """What a report records of its catalog besides the path as typed: where it lies and its
    digest, so that it is found and matched wherever the report is read from."""
    return {"resolved": str(path.resolve()), "sha256": file_digest(path)}


def report_source(report: dict[str, Any], path: Path) -> Path:
    """The catalog a report was made from. Reports before `resolved` hold the path as typed,
    relative to where evaluate ran: it is looked for from the report's folder upwards."""
    data = report["data"]
    if data.get("resolved"):
        return Path(data["resolved"])
    source = Path(data["source"])
    if source.is_absolute():
        return source
    folder = path.resolve().parent
    for base in (folder, *folder.parents, Path.cwd()):
        if (base / source).exists():
            return (base / source).resolve()
    return folder / source  # absent: the reader's error names it
