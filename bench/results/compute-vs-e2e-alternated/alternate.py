"""The compute mode and the e2e_max mode alternated in one process, three rounds (2026-12-03):
does the service beat the compute mode, or was that the order of `make bench`? Prints ev/s.

    python bench/results/compute-vs-e2e-alternated/alternate.py
"""

import uuid
from pathlib import Path

import torch

from consumer.audio import AudioPolicy
from consumer.device import Scorer
from consumer.kafka import delete_topics
from consumer.settings import Settings
from popscore.bench import compute, corpus, e2e
from popscore.cli.bench import unique_settings

torch.set_num_threads(1)
paths = corpus.build(Path(".bench/corpus"), "MP3", 44100, 2, 180.0, 240.0, 8, 0, workers=2)
roots = tuple(sorted({p.parent for p in paths}))
scorer = Scorer(Path("models/demo.pt"), "cpu", optimize=True)
policy = AudioPolicy.create(roots, max_bytes=200_000_000)
for i in range(3):
    events = corpus.events(paths, 192, 0, f"c{i}{uuid.uuid4().hex[:4]}")
    r = compute.run(scorer, policy, events, 32, 4, "thread", None)
    run = f"alt-{uuid.uuid4().hex[:8]}"
    s = unique_settings(Settings().model_copy(update={"audio_file_roots": roots}), run, "max")
    q = e2e.run(s, corpus.events(paths, 192, 0, run), None, "e2e_max")
    delete_topics(s.kafka_config("admin"), f"bench-{run}-")
    print(f"round {i}: compute {r.events_per_s:.1f}  e2e_max {q.events_per_s:.1f}", flush=True)
