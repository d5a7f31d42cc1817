"""deploy/grafana/popscore.json, offline: the panels the runbook relies on exist, every query
parses as PromQL (promtool) and names only metrics the service exports. The integration test
tests/integration/test_observability.py runs every query against a live consumer."""

import re
from pathlib import Path
from typing import Any

import yaml

from tests.unit.deploy_helpers import (
    DEPLOY,
    exported_series_names,
    load_yaml,
    promtool_passes,
)

DASHBOARD = load_yaml(DEPLOY / "grafana" / "popscore.json")


def panel_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in DASHBOARD["panels"]
        for target in panel.get("targets", [])
    ]


def as_promql(expr: str, rate_interval: str = "1m", job: str = "popscore") -> str:
    """A Grafana query with its variables filled in, as Prometheus receives it."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return expr.replace("$job", job)


def test_the_dashboard_covers_the_contract() -> None:
    assert DASHBOARD["uid"] == "popscore"
    joined = " ".join(expr for _, expr in panel_queries())
    for needle in [
        "popscore_events_total",  # throughput and outcomes
        "popscore_consumer_lag",  # lag per partition
        "histogram_quantile(0.5, sum by (le) (rate(popscore_e2e_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(popscore_e2e_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(popscore_e2e_latency_seconds_bucket",
        "popscore_stage_seconds",
        "popscore_batch_size",
        "popscore_dead_letters_total",
        "popscore_model_info",
    ]:
        assert needle in joined, needle
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] for p in DASHBOARD["panels"])


def test_queries_name_only_exported_metrics() -> None:
    exported = exported_series_names()
    for title, expr in panel_queries():
        names = set(re.findall(r"\bpopscore_[a-z0-9_]+", expr))
        assert names and names <= exported, f"{title}: {names - exported}"


def test_every_query_parses(tmp_path: Path) -> None:
    rules: list[dict[str, Any]] = [
        {"record": f"dashboard:panel_{i}", "expr": as_promql(expr)}
        for i, (_, expr) in enumerate(panel_queries())
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_passes("check", "rules", str(path))


def test_every_query_selects_the_chosen_job() -> None:
    """Live consumers (job popscore) and a backfill's (popscore-backfill) export the same
    metrics: the $job variable picks one, defaulting to the live service."""
    [job] = [v for v in DASHBOARD["templating"]["list"] if v["name"] == "job"]
    assert job["type"] == "query" and "label_values(popscore_model_info, job)" in job["definition"]
    assert job["current"]["value"] == "popscore" and not job["multi"] and not job["includeAll"]
    for title, expr in panel_queries():
        for match in re.finditer(r"\b(popscore_[a-z0-9_]+)\b(\{[^}]*\})?", expr):
            assert 'job="$job"' in (match.group(2) or ""), f"{title}: {match.group(1)}"
