"""The evaluation report's files: the JSON and the out-of-fold CSV beside it, the summary an
artifact embeds, and reading a report back (docs/INTERFACE.md, "Evaluation report"). No
scikit-learn here: ``popscore export`` runs where only the service is installed.
"""

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from consumer.errors import UsageError


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

    def brief(block: dict[str, Any]) -> dict[str, float]:
        m = block["metrics"]
        out = {"mae": m["mae"], "rmse": m["rmse"], "r2": m["r2"]}
        for t, at in m["at"].items():
            out |= {f"roc_auc@{t}": at["roc_auc"], f"macro_f1@{t}": at["macro_f1"]}
        return {k: round(v, 4) for k, v in out.items()}

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


def read_evaluation(
    path: Path, variant: str | None = None, rows: int | None = None
) -> dict[str, Any]:
    """The report's summary and per-fold cuts; it must be an ``evaluate`` report, and of the
    variant and row count being trained when those are given."""
    try:
        report = json.loads(path.read_text())
        evaluation = {
            **summary(report),
            "fold_cuts": report["models"][report["model"]]["fold_cuts"],
        }
        evaluated, evaluated_rows = report["model"], report["data"]["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--evaluation {path}: not a `popscore evaluate` report ({exc!r})"
        ) from None
    if (variant, rows) != (None, None) and (evaluated, evaluated_rows) != (variant, rows):
        raise UsageError(
            f"--evaluation {path}: it evaluated {evaluated} on {evaluated_rows} rows; "
            f"this run trains {variant} on {rows}"
        )
    return evaluation
