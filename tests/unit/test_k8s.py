"""deploy/k8s/, validated offline: every manifest against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the GPU overlay after applying its patches, and the things a
schema cannot see — probes, settings, selectors, grace period, autoscaling bounds, the Secrets
kept out of kustomize, the backfill's model delivery. With kubectl on the PATH, kustomize itself
builds every entry point."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import kubernetes_validate
import pytest
import yaml
from moto.server import ThreadedMotoServer

from consumer.app import DNS_ALLOWANCE_S
from consumer.audio import WORST_FETCH_FACTOR
from consumer.settings import Settings, load_settings
from tests.unit.aws_helpers import fake_aws
from tests.unit.deploy_helpers import DEPLOY, load_yaml, load_yaml_docs

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor we support
SECRET_KEYS = {"POPSCORE_REDIS_URL", "POPSCORE_KAFKA_PROPERTIES"}
# Kinds of CRDs (KEDA, prometheus-operator) that kubernetes-validate has no schema for.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor"}
# After the drain (POPSCORE_SHUTDOWN_GRACE_S) and the fetches still running: closing the
# transactional producer and the consumer (a leave-group), with room to spare.
KAFKA_CLOSE_S = 10


def manifests(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """kind → the one object of that kind listed in the folder's kustomization (following
    folders it lists, as kustomize does)."""
    kustomization = load_yaml(folder / "kustomization.yaml")
    out: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        path = folder / resource
        docs = list(manifests(path).values()) if path.is_dir() else load_yaml_docs(path)
        for doc in docs:
            assert doc["kind"] not in out
            out[doc["kind"]] = doc
    return out


BASE = manifests()
HPA = load_yaml(K8S / "base" / "hpa.yaml")
# The Secrets, by name: an example kustomize never applies (created out of band).
SECRETS = {doc["metadata"]["name"]: doc for doc in load_yaml_docs(K8S / "secret.example.yaml")}
LIVE_SECRET = SECRETS["popscore"]


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


GPU_OVERLAY = load_yaml(K8S / "gpu" / "kustomization.yaml")


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Enough of RFC 6902 for our patches: replace and add of an existing path's value."""
    out = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in {"replace", "add"}
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].split("/")[1:]]
        node = out
        for key in parents:
            node = node[key]
        if op["op"] == "replace":
            assert last in node or isinstance(node, list), op["path"]
        node[last] = op["value"]
    return out


def gpu_deployment() -> dict[str, Any]:
    assert GPU_OVERLAY["resources"] == ["../base"]
    [patch] = [p for p in GPU_OVERLAY["patches"] if "target" not in p]
    return strategic_merge(
        copy.deepcopy(BASE["Deployment"]), load_yaml(K8S / "gpu" / patch["path"])
    )


def gpu_scaled_object() -> dict[str, Any]:
    [patch] = [
        p for p in GPU_OVERLAY["patches"] if p.get("target", {}).get("kind") == "ScaledObject"
    ]
    assert patch["target"]["name"] == BASE["ScaledObject"]["metadata"]["name"]
    return json_patch(BASE["ScaledObject"], load_yaml(K8S / "gpu" / patch["path"]))


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    found = [(f"{kind}", doc) for kind, doc in BASE.items()]
    secrets = [(f"Secret {name}", doc) for name, doc in SECRETS.items()]
    return [
        *found,
        *secrets,
        ("HorizontalPodAutoscaler", HPA),
        ("Deployment (gpu)", gpu_deployment()),
    ]


@pytest.mark.parametrize(
    "obj", [o for _, o in all_objects() if o["kind"] not in CUSTOM_KINDS], ids=lambda o: o["kind"]
)
def test_valid_against_the_kubernetes_schemas(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_the_conventional_pieces() -> None:
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= set(BASE)
    assert "ScaledObject" in BASE, "KEDA is the default autoscaler; hpa.yaml the alternative"
    assert {"TriggerAuthentication", "PodMonitor"} <= set(BASE)


def test_secrets_are_an_example_kustomize_never_applies() -> None:
    """`kubectl apply -k` would overwrite the real, out-of-band Secrets with placeholders."""
    assert "Secret" not in BASE and "Secret" not in manifests(K8S / "backfill")
    assert not (K8S / "secret.yaml").exists() and not (K8S / "base" / "secret.yaml").exists()
    assert set(SECRETS) == {"popscore", "popscore-kafka-scaler"}
    for secret in SECRETS.values():
        assert (
            secret["metadata"]["namespace"]
            == load_yaml(K8S / "base" / "kustomization.yaml")["namespace"]
        ), "`kubectl apply -f` of a filled-in copy lands beside the pods"
    refs = {
        r["secretRef"]["name"] for r in container(BASE["Deployment"])["envFrom"] if "secretRef" in r
    }
    assert refs == {"popscore"}, "the pods read only popscore's own Secret"


def settings_from_manifests(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    env: dict[str, str] = {**BASE["ConfigMap"]["data"], **LIVE_SECRET["stringData"]}
    for item in container(deployment).get("env", []):
        env[item["name"]] = item["value"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_config_and_secret_hold_valid_popscore_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config, secret = BASE["ConfigMap"]["data"], LIVE_SECRET["stringData"]
    fields = {f"POPSCORE_{name.upper()}" for name in Settings.model_fields}
    assert set(config) | set(secret) <= fields
    assert set(secret) == SECRET_KEYS
    assert not set(config) & SECRET_KEYS, "secrets stay out of the ConfigMap"
    assert isinstance(json.loads(secret["POPSCORE_KAFKA_PROPERTIES"]), dict)
    settings = settings_from_manifests(BASE["Deployment"], monkeypatch)
    refs = {next(iter(r.values()))["name"] for r in container(BASE["Deployment"])["envFrom"]}
    assert refs == {BASE["ConfigMap"]["metadata"]["name"], LIVE_SECRET["metadata"]["name"]}
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
    # ... and above the whole shutdown, so SIGKILL never cuts a commit: the drain of the
    # batches in hand, then the decode pool waiting for the fetches still running, then the
    # Kafka clients' close.
    running_fetch_s = worst_fetch_s + DNS_ALLOWANCE_S
    shutdown_s = settings.shutdown_grace_s + running_fetch_s + KAFKA_CLOSE_S
    assert pod["terminationGracePeriodSeconds"] >= shutdown_s
    assert pod["automountServiceAccountToken"] is False, "popscore never calls the API"
    if variant == "gpu":
        assert settings.device == "cuda"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_rollout_replaces_one_pod_at_a_time_without_a_surge_pod() -> None:
    """A surge pod never becomes ready when replicas == partitions (readiness needs an
    assignment, and every partition is held), so a rollout with maxSurge > 0 would never end
    — exactly when lag has scaled the Deployment to the partition count."""
    strategy = BASE["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    partitions = int(BASE["ScaledObject"]["metadata"]["annotations"]["popscore/input-partitions"])
    assert BASE["ScaledObject"]["spec"]["maxReplicaCount"] == partitions, "the case above occurs"


@pytest.mark.parametrize("folder", ["base", "backfill"])
def test_replicas_are_left_to_the_autoscaler(folder: str) -> None:
    """A replica count in the manifest would rescale the Deployment on every apply."""
    deployment = manifests(K8S / folder)["Deployment"]
    assert "replicas" not in deployment["spec"]
    assert (
        manifests(K8S / folder)["ScaledObject"]["spec"]["scaleTargetRef"]["name"]
        == (deployment["metadata"]["name"])
    )


def test_service_and_pdb_select_the_pods() -> None:
    labels = BASE["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, pdb = BASE["Service"], BASE["PodDisruptionBudget"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert BASE["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == container(BASE["Deployment"])["ports"][0]["name"]
    assert pdb["spec"]["maxUnavailable"] == 1
    # Readiness follows Kafka and Redis: in their outage every pod is unready, and the default
    # policy (IfHealthyBudget) would then block every node drain.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


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
    assert trigger["authenticationRef"] == {
        "name": BASE["TriggerAuthentication"]["metadata"]["name"]
    }
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval"}
    known |= {"cooldownPeriod", "advanced", "triggers", "idleReplicaCount", "fallback"}
    assert set(spec) <= known
    # The HPA config KEDA generates is a real autoscaling/v2 behavior: validate it as such.
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = copy.deepcopy(HPA)
    hpa["spec"]["behavior"] = behavior
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_keda_logs_in_to_kafka_as_the_consumers_do() -> None:
    """The TriggerAuthentication reads the scaler Secret, whose values say what the pods'
    POPSCORE_KAFKA_PROPERTIES say, in KEDA's spelling."""
    auth = BASE["TriggerAuthentication"]
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"sasl", "username", "password", "tls"}
    scaler: dict[str, str] = {}
    for parameter, ref in refs.items():
        secret = SECRETS[ref["name"]]
        assert ref["name"] != LIVE_SECRET["metadata"]["name"], "the pods never see it"
        scaler[parameter] = secret["stringData"][ref["key"]]
    kafka = json.loads(LIVE_SECRET["stringData"]["POPSCORE_KAFKA_PROPERTIES"])
    mechanism = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256"}
    mechanism["SCRAM-SHA-512"] = "scram_sha512"
    assert scaler["sasl"] == mechanism[kafka["sasl.mechanism"]]
    assert scaler["username"] == kafka["sasl.username"]
    assert scaler["password"] == kafka["sasl.password"]
    tls = {"SASL_SSL": "enable", "SASL_PLAINTEXT": "disable"}
    assert scaler["tls"] == tls[kafka["security.protocol"]]


def test_the_gpu_overlay_bounds_keda_by_the_gpus_and_the_partitions() -> None:
    scaled, base = gpu_scaled_object()["spec"], BASE["ScaledObject"]["spec"]
    partitions = int(BASE["ScaledObject"]["metadata"]["annotations"]["popscore/input-partitions"])
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] < base["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= partitions
    [trigger], [base_trigger] = scaled["triggers"], base["triggers"]
    # A GPU pod does more per replica: a larger target lag, everything else as the base's.
    assert int(trigger["metadata"]["lagThreshold"]) > int(base_trigger["metadata"]["lagThreshold"])
    assert {k: v for k, v in trigger.items() if k != "metadata"} == {
        k: v for k, v in base_trigger.items() if k != "metadata"
    }
    assert all(isinstance(v, str) for v in trigger["metadata"].values())


@pytest.mark.parametrize(
    ("folder", "component", "job"),
    [("base", "consumer", "popscore"), ("backfill", "backfill", "popscore-backfill")],
)
def test_pod_monitors_scrape_each_component_as_the_job_the_alerts_expect(
    folder: str, component: str, job: str
) -> None:
    found = manifests(K8S / folder)
    monitor, deployment = found["PodMonitor"], found["Deployment"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert (
        selector.items() <= labels.items() and selector["app.kubernetes.io/component"] == component
    )
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    [port] = container(deployment)["ports"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # The operator names the job "<namespace>/<PodMonitor>"; a relabelling sets it exactly.
    jobs = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    assert jobs == [{"action": "replace", "targetLabel": "job", "replacement": job}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_plain_hpa_alternative_is_bounded_by_the_partition_count() -> None:
    partitions = int(HPA["metadata"]["annotations"]["popscore/input-partitions"])
    assert 1 <= HPA["spec"]["minReplicas"] <= HPA["spec"]["maxReplicas"] <= partitions
    assert HPA["spec"]["scaleTargetRef"]["name"] == BASE["Deployment"]["metadata"]["name"]
    assert "hpa.yaml" not in load_yaml(K8S / "base" / "kustomization.yaml")["resources"], "not both"


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (its kustomize) is not installed")
@pytest.mark.parametrize("entry", ["", "gpu", "backfill"])
def test_kustomize_builds_each_entry_point_without_a_secret(entry: str) -> None:
    """`kubectl kustomize` renders what `kubectl apply -k` would apply."""
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / entry)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rendered = {d["kind"]: d for d in yaml.safe_load_all(done.stdout) if d}
    assert "Secret" not in rendered
    assert all(
        d["metadata"].get("namespace") == "popscore"
        for d in rendered.values()
        if d["kind"] != "PriorityClass"
    )
    if entry == "gpu":
        expected = gpu_deployment()["spec"]["template"]["spec"]
        got = rendered["Deployment"]["spec"]["template"]["spec"]
        assert got["nodeSelector"] == expected["nodeSelector"]
        assert (
            container(rendered["Deployment"])["resources"]
            == container(gpu_deployment())["resources"]
        )
        assert container(rendered["Deployment"])["image"].endswith("-cu130")
        assert rendered["ScaledObject"]["spec"] == gpu_scaled_object()["spec"]
    elif entry == "":
        assert rendered["ScaledObject"]["spec"] == BASE["ScaledObject"]["spec"]


BACKFILL = manifests(K8S / "backfill")


@pytest.mark.parametrize(
    "obj", [o for o in BACKFILL.values() if o["kind"] not in CUSTOM_KINDS], ids=lambda o: o["kind"]
)
def test_backfill_manifests_are_valid(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_backfill_consumers_are_backfills_below_live_scaled_from_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment, config = BACKFILL["Deployment"], BACKFILL["ConfigMap"]["data"]
    refs = [next(iter(r.values()))["name"] for r in container(deployment)["envFrom"]]
    assert refs == ["popscore", "popscore-backfill", "popscore"], "the backfill's keys win"
    env = {**BASE["ConfigMap"]["data"], **config, **LIVE_SECRET["stringData"]}
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
    assert trigger["authenticationRef"] == {
        "name": BASE["TriggerAuthentication"]["metadata"]["name"]
    }
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (
        spec["terminationGracePeriodSeconds"]
        == (BASE["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    )
    assert spec["automountServiceAccountToken"] is False


def test_backfill_model_is_delivered_into_a_volume_the_consumer_reads() -> None:
    """The image holds only the shipped models on a read-only root: the candidate comes in
    through a volume an init container fills, at the path POPSCORE_MODEL names."""
    config = BACKFILL["ConfigMap"]["data"]
    spec = BACKFILL["Deployment"]["spec"]["template"]["spec"]
    [init] = spec["initContainers"]
    model = Path(config["POPSCORE_MODEL"])
    mounts = {m["name"]: m for m in container(BACKFILL["Deployment"])["volumeMounts"]}
    [volume] = [m for m in mounts.values() if model.is_relative_to(m["mountPath"])]
    assert volume["readOnly"] is True
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts[volume["name"]] == volume["mountPath"], "the init container writes it"
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == volume["name"])
    assert init["image"] == container(BACKFILL["Deployment"])["image"], "its python and boto3"
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    refs = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in init["env"]}
    for name, ref in refs.items():
        assert ref == {"name": BACKFILL["ConfigMap"]["metadata"]["name"], "key": name}
        assert name in config
    assert config["BACKFILL_MODEL_S3_URI"].startswith("s3://")


def test_backfill_init_container_copies_the_model_from_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its exact command, run against an S3 server (moto, in-process): the object lands at
    POPSCORE_MODEL, whole; a bad URI fails the container with one line."""
    [init] = BACKFILL["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    argv = init["command"]
    assert argv[0] == "python"
    fake_aws(monkeypatch)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        artifact = os.urandom(300_000)
        s3.put_object(Bucket="models", Key="candidates/new.pt", Body=artifact)
        dest = tmp_path / "candidate.pt"
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "POPSCORE_MODEL": str(dest)}

        def run(uri: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, *argv[1:]],
                env={**env, "BACKFILL_MODEL_S3_URI": uri},
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )

        done = run("s3://models/candidates/new.pt")
        assert done.returncode == 0, done.stderr
        assert dest.read_bytes() == artifact
        assert sorted(p.name for p in tmp_path.iterdir()) == ["candidate.pt"], "no part file"
        bad = run("/app/models/candidate.pt")
        assert bad.returncode == 1 and "not s3://bucket/key" in bad.stderr
        missing = run("s3://models/candidates/none.pt")
        assert missing.returncode != 0
    finally:
        server.stop()
