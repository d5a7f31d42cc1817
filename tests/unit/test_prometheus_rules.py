"""deploy/prometheus/: `promtool check rules` and `promtool test rules`, plus that every alert
is exercised both firing and quiet, has a runbook section, and uses only exported metrics."""

import re
import subprocess

from tests.unit.deploy_helpers import DEPLOY, ROOT, exported_series_names, load_yaml, promtool

RULES = DEPLOY / "prometheus" / "rules.yaml"
TESTS = DEPLOY / "prometheus" / "tests.yaml"
RUNBOOK = ROOT / "docs" / "OPERATIONS.md"
# Series that come from Prometheus itself or kube-state-metrics, not from popscore.
EXTERNAL = {"up", "kube_pod_container_status_ready"}


def rules() -> list[dict[str, str]]:
    return [r for group in load_yaml(RULES)["groups"] for r in group["rules"]]


def alerts() -> list[dict[str, str]]:
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(TESTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


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
