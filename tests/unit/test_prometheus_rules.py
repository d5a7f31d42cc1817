"""deploy/prometheus/: `promtool check rules` and `promtool test rules`, plus that every alert
is exercised both firing and quiet, has a runbook section, and uses only exported metrics."""

import re
from pathlib import Path

import yaml

from tests.unit.deploy_helpers import (
    DEPLOY,
    ROOT,
    exported_series_names,
    load_yaml,
    load_yaml_docs,
    promtool_passes,
)

RULES = DEPLOY / "prometheus" / "rules.yaml"
TESTS = DEPLOY / "prometheus" / "tests.yaml"
SCRAPE_K8S = DEPLOY / "prometheus" / "kubernetes-pods.yml"
RUNBOOK = ROOT / "docs" / "OPERATIONS.md"
# Series that come from Prometheus itself or kube-state-metrics, not from popscore.
EXTERNAL = {"up", "kube_pod_container_status_ready"}


def rules() -> list[dict[str, str]]:
    return [r for group in load_yaml(RULES)["groups"] for r in group["rules"]]


def alerts() -> list[dict[str, str]]:
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules() -> None:
    promtool_passes("check", "rules", str(RULES))


def test_promtool_test_rules() -> None:
    promtool_passes("test", "rules", str(TESTS), cwd=TESTS.parent, timeout=120)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing, quiet = set(), set()
    for case in load_yaml(TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"


def test_the_required_alerts_and_recordings_exist() -> None:
    exprs = {r.get("record") or r["alert"]: r["expr"] for r in rules()}
    assert {
        "popscore:events:rate5m",
        "popscore:e2e_latency_seconds:p99_5m",
        "popscore:dead_letters:rate5m",
    } <= set(exprs)
    assert {
        "PopscoreConsumerLagGrowing",
        "PopscoreNoScoresWritten",
        "PopscoreDeadLetterSpike",
        "PopscoreLatencyP99OverBudget",
        "PopscoreTargetDown",
        "PopscoreNoConsumerUp",
        "PopscorePodNotReady",
        "PopscoreModelVersionChanged",
    } <= set(exprs)


def test_every_alert_has_a_severity_summary_and_a_runbook_section() -> None:
    text = RUNBOOK.read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    }
    for alert in alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        assert alert["annotations"]["summary"]
        path, _, anchor = alert["annotations"]["runbook"].partition("#")
        assert path == "docs/OPERATIONS.md"
        assert anchor == alert["alert"].lower() and anchor in anchors, alert["alert"]


def test_rules_use_only_metrics_the_service_exports() -> None:
    exported = exported_series_names()
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        names = set(re.findall(r"\b(popscore_[a-z0-9_]+|up|kube_[a-z_]+)\b", rule["expr"]))
        unknown = names - exported - EXTERNAL - recorded
        assert not unknown, f"{rule.get('record') or rule['alert']}: {unknown}"


def test_every_popscore_series_is_selected_by_the_live_job() -> None:
    """Backfill consumers (job popscore-backfill) export the same metrics; a rule without the
    job selector would count them as live (docs/OPERATIONS.md: the alerts select job="popscore")."""
    for rule in rules():
        expr = re.sub(r"\s+", " ", rule["expr"])
        for match in re.finditer(r"\b(popscore_[a-z0-9_]+|up)\b(\{[^}]*\})?", expr):
            name, selector = match.group(1), match.group(2) or ""
            assert 'job="popscore"' in selector, f"{rule.get('record') or rule['alert']}: {name}"


def test_a_backfill_is_part_of_the_rule_tests() -> None:
    series = [s["series"] for case in load_yaml(TESTS)["tests"] for s in case["input_series"]]
    assert any('job="popscore-backfill"' in s for s in series)


def test_the_annotation_scrape_names_each_component_as_its_job(tmp_path: Path) -> None:
    """deploy/prometheus/kubernetes-pods.yml: promtool checks its relabelling (on static
    targets: Debian's promtool has no Kubernetes discovery), and the job rules match the pods'
    labels as Prometheus matches them (anchored regex, source labels joined with ';')."""
    config = load_yaml(SCRAPE_K8S)
    [job] = config["scrape_configs"]
    sd = job.pop("kubernetes_sd_configs")
    assert sd == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["10.0.0.1:9400"]}]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool_passes("check", "config", str(checked))
    expected = {"consumer": "popscore", "backfill": "popscore-backfill"}
    for folder, component in [("base", "consumer"), ("backfill", "backfill")]:
        [deployment] = [
            d
            for d in load_yaml_docs(DEPLOY / "k8s" / folder / "deployment.yaml")
            if d["kind"] == "Deployment"
        ]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        meta = {
            f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_')}": v
            for k, v in labels.items()
        }
        jobs = [
            r["replacement"]
            for r in job["relabel_configs"]
            if r.get("target_label") == "job"
            and re.fullmatch(r["regex"], ";".join(meta.get(s, "") for s in r["source_labels"]))
        ]
        assert jobs == [expected[component]], folder
