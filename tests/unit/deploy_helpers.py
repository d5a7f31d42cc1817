"""Shared by the deploy/ tests: paths, YAML loading, the metric names the service exports."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from consumer.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def exported_series_names() -> set[str]:
    """Every sample name the consumer's registry can export (docs/INTERFACE.md, "Metrics")."""
    families: list[Metric] = list(Metrics().registry.collect())
    return {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}


def promtool() -> str:
    """The promtool binary, or skip: `deploy/local/install-tools.sh` installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: run deploy/local/install-tools.sh (Debian 'prometheus')")
    return path


def promtool_passes(*args: str, cwd: Path | None = None, timeout: float = 60) -> None:
    """Run ``promtool ARGS`` and fail the test with its output unless it passes."""
    done = subprocess.run(
        [promtool(), *args], check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert done.returncode == 0, done.stdout + done.stderr
