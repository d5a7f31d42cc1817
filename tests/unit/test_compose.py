"""deploy/compose.yaml, checked without Docker: the services and profile exist, every file it
mounts or builds from exists, and popscore's settings, ports and audio folder line up."""

from pathlib import Path
from typing import Any

import pytest

from consumer.settings import Settings, load_settings
from tests.unit.deploy_helpers import DEPLOY, load_yaml

COMPOSE = load_yaml(DEPLOY / "compose.yaml")
SERVICES: dict[str, Any] = COMPOSE["services"]


def env_of(service: str) -> dict[str, str]:
    env = SERVICES[service]["environment"]
    return {k: str(v) for k, v in env.items()}


def test_the_services_and_the_demo_profile() -> None:
    assert {"kafka", "redis", "prometheus", "grafana", "popscore", "demo"} <= set(SERVICES)
    assert SERVICES["demo"]["profiles"] == ["demo"]
    assert all("profiles" not in s for name, s in SERVICES.items() if name != "demo")
    demo = SERVICES["demo"]["command"]
    assert demo[:2] == ["produce", "--synthetic"]


def test_kafka_runs_kraft_from_the_apache_image() -> None:
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")
    assert "healthcheck" in kafka and "healthcheck" in SERVICES["redis"]


def bind_mounts() -> list[tuple[str, Path, str]]:
    out = []
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                out.append((name, (DEPLOY / source).resolve(), target))
    return out


@pytest.mark.parametrize(("service", "source", "target"), bind_mounts())
def test_every_bind_mount_exists(service: str, source: Path, target: str) -> None:
    assert source.exists(), f"{service}: {source} (mounted at {target}) does not exist"


def test_popscore_is_built_from_the_repo_dockerfile_and_the_others_reuse_the_image() -> None:
    """The topics service builds it (it runs first: popscore creates no topic itself)."""
    build = SERVICES["topics"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    assert build["args"]["TORCH_VARIANT"] in {"cpu", "cu130"}
    assert SERVICES["demo"]["image"] == SERVICES["popscore"]["image"] == SERVICES["topics"]["image"]
    assert SERVICES["topics"]["command"] == ["topics", "--create"]
    waits = SERVICES["popscore"]["depends_on"]["topics"]
    assert waits == {"condition": "service_completed_successfully"}


def test_popscore_settings_are_valid_and_line_up(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of("popscore")
    fields = {f"POPSCORE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {set(env) - fields}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.kafka_bootstrap.split(":")[0] == "kafka"
    assert settings.redis_url.get_secret_value().startswith("redis://redis:")
    # The demo writes audio where the consumer may read it: the same volume and folder.
    demo = SERVICES["demo"]["command"]
    out_dir = demo[demo.index("--out-dir") + 1]
    assert settings.audio_file_roots == (Path(out_dir),)
    volume = {v.split(":")[0]: v.split(":")[1] for v in SERVICES["popscore"]["volumes"]}
    demo_volume = {v.split(":")[0]: v.split(":")[1] for v in SERVICES["demo"]["volumes"]}
    assert volume["audio"] == demo_volume["audio"] == out_dir
    assert "audio" in COMPOSE["volumes"]
    assert f"{settings.http_port}:{settings.http_port}" in SERVICES["popscore"]["ports"]


def test_prometheus_scrapes_popscore_and_loads_the_rules() -> None:
    mounts = {t: s for _, s, t in bind_mounts()}
    config = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "popscore"]
    port = env_of("popscore")["POPSCORE_HTTP_PORT"]
    assert job["static_configs"][0]["targets"] == [f"popscore:{port}"]
    assert config["rule_files"] == ["/etc/prometheus/rules.yaml"]
    assert mounts["/etc/prometheus/rules.yaml"] == DEPLOY / "prometheus" / "rules.yaml"


def test_grafana_provisions_the_dashboard_and_its_datasource() -> None:
    mounts = {t: s for _, s, t in bind_mounts()}
    provisioning = mounts["/etc/grafana/provisioning"]
    [provider] = load_yaml(provisioning / "dashboards" / "popscore.yaml")["providers"]
    folder = provider["options"]["path"]
    assert mounts[f"{folder}/popscore.json"] == DEPLOY / "grafana" / "popscore.json"
    [source] = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    dashboard = load_yaml(DEPLOY / "grafana" / "popscore.json")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    # The dashboard opens on the job compose's Prometheus scrapes popscore as.
    [scrape] = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    assert variables["job"]["current"]["value"] == scrape["job_name"]
