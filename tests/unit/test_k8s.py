"""deploy/k8s/, validated offline: every manifest against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the GPU overlay after applying its patch, and the things a
schema cannot see — probes, settings, selectors, grace period, autoscaling bounds."""

import copy
import json
import math
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from consumer.audio import WORST_FETCH_FACTOR
from consumer.settings import Settings, load_settings
from tests.unit.deploy_helpers import DEPLOY, load_yaml, load_yaml_docs

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor we support
SECRET_KEYS = {"POPSCORE_REDIS_URL", "POPSCORE_KAFKA_PROPERTIES"}


def manifests(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """kind → the one object of that kind listed in the folder's kustomization."""
    kustomization = load_yaml(folder / "kustomization.yaml")
    out: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(folder / resource):
            assert doc["kind"] not in out
            out[doc["kind"]] = doc
    return out


BASE = manifests()
HPA = load_yaml(K8S / "hpa.yaml")


def strategic_merge(base: Any, patch: Any) -> Any:
    """Enough of kubectl's strategic merge for our patch: dicts merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all("name" in p for p in patch):
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged.get(item["name"], {}), item)
        return list(merged.values())
    return patch


def gpu_deployment() -> dict[str, Any]:
    overlay = load_yaml(K8S / "gpu" / "kustomization.yaml")
    assert overlay["resources"] == [".."]
    [patch] = overlay["patches"]
    return strategic_merge(
        copy.deepcopy(BASE["Deployment"]), load_yaml(K8S / "gpu" / patch["path"])
    )


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    found = [(f"{kind}", doc) for kind, doc in BASE.items()]
    return [*found, ("HorizontalPodAutoscaler", HPA), ("Deployment (gpu)", gpu_deployment())]


@pytest.mark.parametrize(
    "obj", [o for _, o in all_objects() if o["kind"] != "ScaledObject"], ids=lambda o: o["kind"]
)
def test_valid_against_the_kubernetes_schemas(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_the_conventional_pieces() -> None:
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= set(BASE)
    assert "ScaledObject" in BASE, "KEDA is the default autoscaler; hpa.yaml the alternative"


def settings_from_manifests(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    env: dict[str, str] = {**BASE["ConfigMap"]["data"], **BASE["Secret"]["stringData"]}
    for item in container(deployment).get("env", []):
        env[item["name"]] = item["value"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_config_and_secret_hold_valid_popscore_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config, secret = BASE["ConfigMap"]["data"], BASE["Secret"]["stringData"]
    fields = {f"POPSCORE_{name.upper()}" for name in Settings.model_fields}
    assert set(config) | set(secret) <= fields
    assert set(secret) == SECRET_KEYS
    assert not set(config) & SECRET_KEYS, "secrets stay out of the ConfigMap"
    assert isinstance(json.loads(secret["POPSCORE_KAFKA_PROPERTIES"]), dict)
    settings = settings_from_manifests(BASE["Deployment"], monkeypatch)
    refs = {next(iter(r.values()))["name"] for r in container(BASE["Deployment"])["envFrom"]}
    assert refs == {BASE["ConfigMap"]["metadata"]["name"], BASE["Secret"]["metadata"]["name"]}
    assert settings.device == "auto"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_resources_and_a_grace_period_longer_than_a_batch(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = BASE["Deployment"] if variant == "cpu" else gpu_deployment()
    settings = settings_from_manifests(deployment, monkeypatch)
    c = container(deployment)
    [port] = c["ports"]
    assert port["containerPort"] == settings.http_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "memory" in c["resources"]["limits"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The worst batch: every decode worker waits out the fetch timeout for its share.
    rounds = math.ceil(settings.batch_size / settings.decode_workers)
    worst_fetch_s = WORST_FETCH_FACTOR * settings.audio_fetch_timeout_s
    worst_batch_s = rounds * worst_fetch_s + settings.batch_wait_ms / 1000
    assert pod["terminationGracePeriodSeconds"] > worst_batch_s
    # ... and above the service's own shutdown deadline, so SIGKILL never cuts a commit.
    grace_s = getattr(settings, "shutdown_grace_s", 0)
    assert pod["terminationGracePeriodSeconds"] >= grace_s + 10
    if variant == "gpu":
        assert settings.device == "cuda"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_service_and_pdb_select_the_pods() -> None:
    labels = BASE["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, pdb = BASE["Service"], BASE["PodDisruptionBudget"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert BASE["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == container(BASE["Deployment"])["ports"][0]["name"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_keda_scaled_object_scales_on_the_groups_lag_up_to_the_partition_count() -> None:
    scaled, config = BASE["ScaledObject"], BASE["ConfigMap"]["data"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": BASE["Deployment"]["metadata"]["name"],
    }
    partitions = int(scaled["metadata"]["annotations"]["popscore/input-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["POPSCORE_GROUP_ID"]
    assert meta["topic"] == config["POPSCORE_INPUT_TOPIC"]
    assert meta["bootstrapServers"] == config["POPSCORE_KAFKA_BOOTSTRAP"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval"}
    known |= {"cooldownPeriod", "advanced", "triggers", "idleReplicaCount", "fallback"}
    assert set(spec) <= known
    # The HPA config KEDA generates is a real autoscaling/v2 behavior: validate it as such.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = copy.deepcopy(HPA)
    hpa["spec"]["behavior"] = behavior
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_plain_hpa_alternative_is_bounded_by_the_partition_count() -> None:
    partitions = int(HPA["metadata"]["annotations"]["popscore/input-partitions"])
    assert 1 <= HPA["spec"]["minReplicas"] <= HPA["spec"]["maxReplicas"] <= partitions
    assert HPA["spec"]["scaleTargetRef"]["name"] == BASE["Deployment"]["metadata"]["name"]
    assert "hpa.yaml" not in load_yaml(K8S / "kustomization.yaml")["resources"], "not both"


BACKFILL = manifests(K8S / "backfill")


@pytest.mark.parametrize(
    "obj", [o for o in BACKFILL.values() if o["kind"] != "ScaledObject"], ids=lambda o: o["kind"]
)
def test_backfill_manifests_are_valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_backfill_consumers_are_backfills_below_live_scaled_from_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment, config = BACKFILL["Deployment"], BACKFILL["ConfigMap"]["data"]
    refs = [next(iter(r.values()))["name"] for r in container(deployment)["envFrom"]]
    assert refs == ["popscore", "popscore-backfill", "popscore"], "the backfill's keys win"
    env = {**BASE["ConfigMap"]["data"], **config, **BASE["Secret"]["stringData"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    live = BASE["ConfigMap"]["data"]
    assert settings.role == "backfill" and settings.cpu_nice > 0
    assert settings.shadow_model is None, "a live shadow setting is blanked"
    assert settings.group_id != live["POPSCORE_GROUP_ID"]
    assert settings.yield_to_group == live["POPSCORE_GROUP_ID"]
    assert settings.yield_to_topic == live["POPSCORE_INPUT_TOPIC"]
    for topic in ("input_topic", "output_topic", "dlq_topic"):
        assert getattr(settings, topic) != live[f"POPSCORE_{topic.upper()}"], topic
    spec = deployment["spec"]["template"]["spec"]
    assert BACKFILL["PriorityClass"]["value"] < 0, "below the default priority of live pods"
    assert spec["priorityClassName"] == BACKFILL["PriorityClass"]["metadata"]["name"]
    scaled = BACKFILL["ScaledObject"]["spec"]
    annotations = BACKFILL["ScaledObject"]["metadata"]["annotations"]
    partitions = int(annotations["popscore/input-partitions"])
    assert scaled["minReplicaCount"] == 0 < scaled["maxReplicaCount"] <= partitions
    [trigger] = scaled["triggers"]
    assert trigger["metadata"]["consumerGroup"] == settings.group_id
    assert trigger["metadata"]["topic"] == settings.input_topic
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
