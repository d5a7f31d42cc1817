"""Two evaluation reports of the same data and folds, compared with a paired artist bootstrap:
`popscore compare A.json B.json` (docs/MODEL.md).

    compare(Path("with_title.json"), Path("without_title.json"))
    # {"a": ..., "b": ..., "intervals": {"a": {...}, "b": {...}, "a - b": {"mae": {...}}}}

Each report names its data (`data.resolved`, or in older reports `data.source` as typed,
looked for from the report's folder upwards) and its out-of-fold CSV; the per-row decision cut
at 70 is rebuilt from the report's `fold_cuts` on the report's own folds (`split`), so any
report `popscore evaluate` wrote can be compared.
"""

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from consumer.errors import UsageError
from popscore.training.catalog import read_catalog
from popscore.training.intervals import Scored, artist_bootstrap
from popscore.training.metrics import group_folds
from popscore.training.report import oof_path, report_source


def _read(path: Path) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(path.read_text())
        fold_cuts = report["models"][report["model"]]["fold_cuts"]
        if report["split"]["folds"] != len(fold_cuts) or not report["data"]["source"]:
            raise ValueError("its split and fold_cuts disagree")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a `popscore evaluate` report ({exc!r})") from None
    return report


def _groups(source: Path, rows: int) -> np.ndarray:
    # The report's data, read as evaluate read it (CSV or Parquet): the folds are rebuilt from it.
    try:
        groups = np.array([g for batch in read_catalog(source) for g in batch.groups])
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise UsageError(f"the reports' data {source} cannot be read ({exc!r})") from None
    if len(groups) != rows:
        raise UsageError(f"{source} has {len(groups)} rows; the reports evaluated {rows}")
    return groups


def _same_data(first: dict[str, Any], a: Path, second: dict[str, Any], b: Path) -> bool:
    # The digests where both reports have one; else the catalogs they name, found on disk.
    digests = first["data"].get("sha256"), second["data"].get("sha256")
    return digests[0] == digests[1] if all(digests) else a == b


def _oof(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(target, prediction) from the report's out-of-fold CSV."""
    try:
        with oof_path(path).open(newline="") as handle:
            rows = [(float(r["target"]), float(r["prediction"])) for r in csv.DictReader(handle)]
    except (OSError, KeyError, ValueError) as exc:
        raise UsageError(f"{oof_path(path)}: not the report's OOF CSV ({exc!r})") from None
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows])


def _scored(prediction: np.ndarray, report: dict[str, Any], folds: list[np.ndarray]) -> Scored:
    cut = np.empty(len(prediction))
    for test, chosen in zip(folds, report["models"][report["model"]]["fold_cuts"], strict=True):
        cut[test] = float(chosen["70"])
    return Scored(prediction, cut)


def compare(a: Path, b: Path, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Intervals of A, B and A - B; the reports must share their data, rows and split."""
    first, second = _read(a), _read(b)
    source = report_source(first, a)
    if (
        not _same_data(first, source, second, report_source(second, b))
        or first["data"]["rows"] != second["data"]["rows"]
        or first["split"] != second["split"]
    ):
        raise UsageError(f"{a} and {b} are not of the same data and folds: nothing to pair")
    groups = _groups(source, first["data"]["rows"])
    folds = group_folds(groups, first["split"]["folds"], first["split"]["seed"])
    (target, pred_a), (_, pred_b) = _oof(a), _oof(b)
    scored = {"a": _scored(pred_a, first, folds), "b": _scored(pred_b, second, folds)}
    return {
        "a": {"report": str(a), "features": first["data"]["features"]},
        "b": {"report": str(b), "features": second["data"]["features"]},
        "intervals": artist_bootstrap(target, groups, scored, [("a", "b")], resamples, seed=seed),
    }
