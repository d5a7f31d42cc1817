"""The costs of rolling out a model, measured side by side in one invocation:

- ``shadow``: the end-to-end maximum with and without a shadow model (the primary's weights
  under another version, so the extra work is exactly one more model on the same audio);
- ``backfill``: live events at a fixed rate alone, then the same rate while a backfill process
  (``popscore backfill run``: nice 10, yielding to the live group) re-scores a catalog.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from consumer.kafka import ensure_topics
from consumer.settings import Settings
from popscore.artifact import load, resave
from popscore.bench import e2e
from popscore.bench.stats import ModeResult
from schemas.events import ReleaseEvent

BACKFILL_START_S = 15.0  # torch import, model load, group join: before live is measured


def shadow_copy(model: Path, folder: Path) -> Path:
    """The primary artifact again under another model_version."""
    artifact = load(model)
    meta = artifact.meta.replace(model_version=f"{artifact.meta.model_version}-shadow")
    return resave(artifact.module, folder / "shadow.pt", meta)


def shadow(base: Settings, plain: Settings, events: list[ReleaseEvent]) -> ModeResult:
    """The e2e maximum with a shadow model beside the primary (``plain`` names its topics)."""
    with tempfile.TemporaryDirectory() as folder:
        copy = shadow_copy(base.model, Path(folder))
        topic = f"{plain.output_topic}-shadow"
        ensure_topics(plain.kafka_config("admin"), [topic], 3)
        settings = plain.model_copy(update={"shadow_model": copy, "shadow_topic": topic})
        return e2e.run(settings, events, None, "e2e_shadow_max")


def backfill(
    alone: Settings,
    beside: Settings,
    live: tuple[list[ReleaseEvent], list[ReleaseEvent]],
    catalog: list[ReleaseEvent],
    rate: float,
) -> list[ModeResult]:
    """Live at ``rate`` alone, then beside a backfill process over ``catalog``."""
    results = [e2e.run(alone, live[0], rate, "live_alone")]
    topic = f"{beside.input_topic}-backfill"
    ensure_topics(beside.kafka_config("admin"), [topic], 8)
    e2e.send(beside.kafka_config("producer"), topic, catalog, None)
    ensure_topics(beside.kafka_config("admin"), [beside.input_topic], 3)
    process = _backfill_process(beside, topic)
    try:
        time.sleep(BACKFILL_START_S)
        started = time.monotonic()
        with_backfill = e2e.run(beside, live[1], rate, "live_with_backfill")
        elapsed = time.monotonic() - started
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    scored = _scored(out)
    with_backfill.notes["backfill"] = {
        "events_scored": scored,
        "events_per_s_during_live_run": round(scored / elapsed, 3) if scored else None,
        "nice": 10,
    }
    return [*results, with_backfill]


def _backfill_process(live: Settings, topic: str) -> "subprocess.Popen[str]":
    env = {
        **os.environ,
        "POPSCORE_KAFKA_BOOTSTRAP": live.kafka_bootstrap,
        "POPSCORE_REDIS_URL": live.redis_url.get_secret_value(),
        "POPSCORE_AUDIO_FILE_ROOTS": ",".join(str(p) for p in live.audio_file_roots),
        "POPSCORE_DEVICE": live.device,
        "POPSCORE_BATCH_SIZE": str(live.batch_size),
        "POPSCORE_DECODE_WORKERS": str(live.decode_workers),
        "POPSCORE_INPUT_TOPIC": live.input_topic,  # what the backfill yields to
        "POPSCORE_GROUP_ID": live.group_id,
    }
    command = [sys.executable, "-m", "popscore", "--log-level", "WARNING", "backfill", "run",
               "--model", str(live.model), "--topic", topic, "--group", f"{live.group_id}-bf",
               "--http-port", "0", "--nice", "10", "--follow"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _scored(output: str) -> int:
    """The events the backfill scored, from its last line (``backfill: N events scored``)."""
    for line in reversed(output.splitlines()):
        if line.startswith("backfill: "):
            return int(line.split()[1])
    return 0
