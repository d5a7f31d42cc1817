"""How the e2e_max run with and without the warmed producer was compared (2026-12-03): one
192-event e2e_max run per call, in-process, as ``popscore bench`` runs it; ``cold`` makes the
driver's producer just before the send, as the bench did before. Writes one JSON per call.

    python bench/results/warm-producer-side-by-side/alternate.py warm|cold OUT.json
"""

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Producer

from consumer.kafka import client, delete_topics, producer_config
from consumer.pipeline import Pipeline
from consumer.settings import Settings
from popscore.bench import corpus, e2e
from popscore.cli.bench import unique_settings


def main(variant: str, out: Path) -> None:
    paths = corpus.build(Path(".bench/corpus"), "MP3", 44100, 2, 180.0, 240.0, 8, 0, workers=2)
    torch.set_num_threads(1)
    run = f"alternate-{uuid.uuid4().hex[:8]}"
    roots = tuple(sorted({p.parent for p in paths}))
    s = unique_settings(Settings().model_copy(update={"audio_file_roots": roots}), run, "max")
    if variant == "cold":

        def cold(config: dict[str, Any], _admin: Any, _topic: str, rate: Any = None) -> Producer:
            return client(lambda: Producer(producer_config(config, {"linger.ms": 5})))

        e2e.warmed_producer = cold  # type: ignore[assignment]
    starts: list[float] = []
    prepare = Pipeline.prepare

    def timed(self: Pipeline, messages: Any) -> Any:
        starts.append(time.perf_counter())
        return prepare(self, messages)

    Pipeline.prepare = timed  # type: ignore[method-assign]
    sends: list[float] = []
    send = e2e.send

    def noted(*args: Any) -> float:
        sends.append(send(*args))
        return sends[-1]

    e2e.send = noted  # type: ignore[assignment]
    result = e2e.run(s, corpus.events(paths, 192, 0, run), None, "e2e_max")
    delete_topics(s.kafka_config("admin"), f"bench-{run}-")
    out.write_text(json.dumps({
        "variant": variant,
        "events": result.events,
        "seconds": round(result.seconds, 3),
        "events_per_s": round(result.events_per_s, 3),
        "first_batch_starts_after_first_send_s": round(min(starts) - sends[0], 3),
        "cpu": result.notes["cpu"],
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
