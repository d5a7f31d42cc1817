"""The dashboard and the rules against the real thing: Debian's Prometheus scrapes a live
consumer (1 s interval) while it scores events and dead-letters a few; every Grafana panel's
PromQL and every recording rule must then return data through the Prometheus HTTP API (the
drift panels too: the demo artifact carries a drift reference)."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.kafka import ensure_topics
from popscore.artifact import load, resave
from popscore.cli import produce
from tests.conftest import free_port
from tests.integration.conftest import ROOT
from tests.integration.test_service import http_get, produce_synthetic, wait_for

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "deploy" / "grafana" / "popscore.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval
SCORED, BAD = 10, 3


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def ready(port: int) -> bool:
    try:
        return http_get(port, "/-/ready")[0] == 200
    except urllib.error.URLError:
        return False


def has_data(result: list[dict[str, Any]]) -> bool:
    """Some series has some sample that is a number (histogram_quantile of nothing is NaN)."""
    return any(
        not math.isnan(float(value))
        for series in result
        for _, value in series.get("values", [series.get("value", [0, "NaN"])])
    )


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Debian's Prometheus on a free port; the scrape target is written by the test."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found: run deploy/local/install-tools.sh (Debian 'prometheus')")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("{}\n")
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: ready(port), 30, "Prometheus ready")
        yield port, config
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def scrape(port: int, config: Path, target_port: int) -> None:
    """Point Prometheus at the consumer and load the rules; reload without a restart."""
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "popscore",
                        "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                    }
                ],
            }
        )
    )
    request = urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (
            panel["title"],
            target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$job", "popscore"),
        )
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def recordings() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["record"] for g in groups for r in g["rules"] if "record" in r]


def shadow_of(model: Path, folder: Path) -> Path:
    artifact = load(model)
    meta = artifact.meta.replace(model_version=f"{artifact.meta.model_version}-shadow")
    return resave(artifact.module, folder / "shadow.pt", meta)


def test_every_panel_and_recording_returns_data(
    consumer_env: dict[str, str], prometheus: tuple[int, Path], tmp_path: Path
) -> None:
    prom_port, config = prometheus
    started = time.time()
    config_kafka = {"bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"]}

    http_port = free_port()
    scrape(prom_port, config, http_port)
    env = {**os.environ, **consumer_env, "POPSCORE_HTTP_PORT": str(http_port)}
    env["POPSCORE_BATCH_SIZE"] = "4"
    # The drift panels need their gauges, which wait for this many scored events.
    env["POPSCORE_DRIFT_MIN_EVENTS"] = "4"
    # The shadow panels need a shadow: the demo model again under another version.
    env["POPSCORE_SHADOW_MODEL"] = str(shadow_of(Path(consumer_env["POPSCORE_MODEL"]), tmp_path))
    env["POPSCORE_SHADOW_TOPIC"] = consumer_env["POPSCORE_OUTPUT_TOPIC"] + "-shadow"
    ensure_topics(config_kafka, [env["POPSCORE_SHADOW_TOPIC"]], 3)
    proc = subprocess.Popen([sys.executable, "-m", "popscore", "consume"], env=env, cwd=ROOT)
    try:
        # The events go in only once Prometheus has scraped the idle consumer: a rate needs a
        # sample from before them, and the service may score them all within one scrape.
        def scraped() -> bool:
            return bool(api(prom_port, "query", query="popscore_batch_size_count")["result"])

        wait_for(scraped, 90, "Prometheus to scrape the idle consumer")
        produce_synthetic(consumer_env, SCORED, seed=int(started))
        bad = iter([(f"bad-{i}".encode(), b"{not json") for i in range(BAD)])
        produce.send(config_kafka, consumer_env["POPSCORE_INPUT_TOPIC"], bad)

        # Prometheus saw the consumer finish every event (and so every rate window has it).
        def all_handled() -> bool:
            data = api(prom_port, "query", query="sum(popscore_events_total)")
            return bool(data["result"]) and float(data["result"][0]["value"][1]) >= SCORED + BAD

        wait_for(all_handled, 90, "Prometheus to see every event handled")
        window = {"start": str(started), "end": str(time.time()), "step": "1"}

        def without_data(exprs: list[str]) -> list[str]:
            window["end"] = str(time.time())
            return [
                e
                for e in exprs
                if not has_data(api(prom_port, "query_range", query=e, **window)["result"])
            ]

        # Rates need two samples after the last batch: wait for the rule evaluations.
        exprs = [expr for _title, expr in panel_queries()] + recordings()
        with contextlib.suppress(AssertionError):  # the assertions below name what has none
            wait_for(lambda: not without_data(exprs), 30, "every panel and rule to have data")
        empty = [
            f"{title}: {expr}"
            for title, expr in panel_queries()
            if not has_data(api(prom_port, "query_range", query=expr, **window)["result"])
        ]
        assert not empty, "panels without data:\n" + "\n".join(empty)
        missing = without_data(recordings())
        assert not missing, f"recording rules without data: {missing}"
        reasons = api(prom_port, "query", query="sum by (reason) (popscore_dead_letters_total) > 0")
        assert {r["metric"]["reason"] for r in reasons["result"]} == {"invalid_json"}
        rules = api(prom_port, "rules")
        health = {r["name"]: r["health"] for g in rules["groups"] for r in g["rules"]}
        assert set(health.values()) == {"ok"}, health
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
