"""Hot reload of a scorer: SIGHUP (or a changed artifact file) swaps the model between batches.

    main loop      Reloader.poll(): a request (the SIGHUP flag, or the watched file changed)
                   starts ``vet`` on the loader thread; a finished vet is counted, logged and,
                   when loaded, its swap submitted to the device stage
    loader thread  vet(): load the artifact on the serving device, compare it with the one
                   serving, score the built-in batch (``self_test``), and on CUDA warm it up
                   at the serving batch shape (as at start)
    device stage   the swap runs between two batches: every batch submitted before it is scored
                   by the old model, every one after by the new one

Polling, commits and scoring go on while a candidate loads. An artifact that cannot load, needs
other audio than the one serving (batches already decoded for it must stay valid), or fails the
self-test is refused, and the old one serves on. Nothing here touches Kafka or Redis, so a swap
neither drops nor repeats an event. The reloader swaps "a scorer": one per model served.
"""

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consumer.device import Scorer
from consumer.metrics import RELOAD_LOADED as LOADED
from consumer.metrics import RELOAD_REFUSED as REFUSED
from consumer.metrics import RELOAD_UNCHANGED as UNCHANGED
from consumer.metrics import Metrics
from popscore.artifact import extract
from schemas.events import ReleaseEvent

log = logging.getLogger(__name__)

# The built-in batch: a full event, one with every optional group missing, one half filled.
_SELF_TEST_EVENTS = tuple(
    ReleaseEvent.from_json(json.dumps(
        {"event_id": f"self-test-{i}", "track_id": f"self-test-{i}",
         "emitted_at": "2026-01-01T00:00:00Z", "audio_uri": "file:///dev/null", **groups}
    )).model_dump()
    for i, groups in enumerate([
        {
            "artist": {"popularity": 62.0, "followers": 1_250_000},
            "release": {"title": "Song (Radio Edit)", "date": "2025-06-01", "explicit": False,
                        "duration_ms": 201_000},
            "audio_features": {"acousticness": 0.1, "danceability": 0.7, "energy": 0.8,
                               "instrumentalness": 0.0, "liveness": 0.1, "loudness": -5.5,
                               "speechiness": 0.05, "valence": 0.6, "tempo": 120.0,
                               "time_signature": 4, "key": 5, "mode": 1},
            "engagement": {"streams": 90_000, "saves": 4_000, "playlist_adds": 1_500,
                           "skips": 20_000, "shares": 300},
        },
        {},
        {"artist": {"followers": 300}, "release": {"date": "1999"}},
    ])
)  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """What became of one reload: its outcome, the log line's detail, and the scorer to swap in
    (only when loaded)."""

    outcome: str
    detail: str
    scorer: Scorer | None = None


def self_test(scorer: Scorer) -> str | None:
    """Why the scorer cannot serve, judged on the built-in batch (silence and noise of the
    artifact's clip, feature rows with missing values); None when it can."""
    feats = np.stack([extract(event, scorer.meta.features) for event in _SELF_TEST_EVENTS])
    rows = len(feats)
    if scorer.listens:
        noise = np.random.default_rng(0).standard_normal((rows, scorer.meta.clip_samples))
        waves = (0.3 * noise).astype(np.float32)
        waves[0] = 0.0  # silence: a log-Mel frontend must not turn it into -inf
        mask = np.ones(rows, dtype=bool)
    else:  # as the pipeline feeds a features-only artifact: one dummy sample per row
        waves, mask = np.zeros((rows, 1), np.float32), np.zeros(rows, dtype=bool)
    try:
        scores = scorer.score(waves, feats, mask)
    except Exception as exc:  # whatever it raises refuses it
        return f"self-test raised {type(exc).__name__}: {str(exc).strip()[:200]}"
    popularity, probability = scores.popularity, scores.hit_probability
    if popularity.shape != (rows,) or probability.shape != (rows,):
        return f"self-test: {rows} rows gave shapes {popularity.shape}, {probability.shape}"
    if not (np.isfinite(popularity).all() and np.isfinite(probability).all()):
        return "self-test: non-finite scores"
    if not ((popularity >= 0) & (popularity <= 100)).all():
        return f"self-test: popularity outside 0..100 ({popularity.min()}..{popularity.max()})"
    if not ((probability >= 0) & (probability <= 1)).all():
        return "self-test: hit probability outside 0..1"
    return None


def incompatibility(serving: Scorer, candidate: Scorer) -> str | None:
    """Why ``candidate`` cannot take over from ``serving`` without a restart; None when it can.
    Batches in flight were decoded for the serving artifact's audio input and run on its
    device, so the candidate must take the same."""
    old, new = serving.meta, candidate.meta
    pairs = {
        "listens": (serving.listens, candidate.listens),
        "sample_rate": (old.sample_rate, new.sample_rate),
        "clip_seconds": (old.clip_seconds, new.clip_seconds),
        "device": (serving.device, candidate.device),
    }
    differ = [f"{key} {a} -> {b}" for key, (a, b) in pairs.items() if a != b]
    if differ:
        return f"needs other audio input or device ({', '.join(differ)}): restart to switch"
    return None


def vet(
    path: Path,
    device: str,
    serving: Scorer,
    taken: frozenset[str] = frozenset(),
    warm_batch: int = 0,
) -> Verdict:
    """Load ``path`` on ``device`` and judge it against ``serving`` (on the loader thread);
    ``taken``: versions another scorer of this process serves (the shadow's). With
    ``warm_batch``, a model that passes is warmed up at that batch size before it is swapped
    in, so its first batches do not pay for TorchScript's profiling runs and the fuser."""
    try:
        candidate = Scorer(path, device, optimize=serving.optimize)
    except Exception as exc:  # a broken file or a missing device: the old model serves on
        return Verdict(REFUSED, f"cannot load: {str(exc).strip()[:300] or type(exc).__name__}")
    version = candidate.meta.model_version
    if version == serving.meta.model_version:
        return Verdict(UNCHANGED, f"{path} is {version} again (bump model_version to reload)")
    problem = incompatibility(serving, candidate) or self_test(candidate)
    if version in taken:
        # Two scorers of one version would write one namespace twice and compare it with
        # itself; and the old primary would stop being scored (its rollback incomplete).
        problem = "the shadow model (POPSCORE_SHADOW_MODEL) has this version: roll out instead"
    if problem:
        return Verdict(REFUSED, f"{version}: {problem}")
    detail = f"{serving.meta.model_version} -> {version}"
    if warm_batch:
        try:
            took = candidate.warm_up(warm_batch)
        except Exception as exc:  # the serving shape fails where the self-test passed
            return Verdict(REFUSED, f"{version}: warm-up raised {type(exc).__name__}: "
                                    f"{str(exc).strip()[:200]}")  # fmt: skip
        detail += f" (warmed up at batch {warm_batch}, first call {took:.2f} s)"
    if candidate.optimize and candidate.device.type == "cpu" and not candidate.optimized:
        # Served as saved: slower on CPU than an optimised one (the warning above says why).
        detail += " (not optimised for CPU: see the warning before)"
    return Verdict(LOADED, detail, candidate)


Signature = tuple[int, int, int] | None


def signature(path: Path) -> Signature:
    """(mtime, size, inode) of the file ``path`` leads to; None while it is missing. A volume
    update that swaps a symlink changes the inode, an in-place copy the mtime or size."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class FileWatch:
    """Says when a file changed and then stayed the same for one check interval, so a copy
    still being written is not loaded half way."""

    def __init__(self, path: Path, every_s: float, clock: Callable[[], float]) -> None:
        self.path = path
        self.every_s = every_s
        self._clock = clock
        self._seen = signature(path)
        self._pending: Signature = self._seen
        self._next = clock() + every_s

    def changed(self) -> bool:
        """True once per settled change; cheap between checks."""
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.every_s
        current = signature(self.path)
        settled = current == self._pending
        self._pending = current
        if settled and current != self._seen and current is not None:
            self._seen = current
            return True
        return False


class Reloader:
    """Reloads one scorer from its artifact path on request; driven by the main loop."""

    def __init__(
        self,
        path: Path,
        device: str,
        serving: Scorer,
        *,
        loader: Executor,
        stage: Executor,
        swap: Callable[[Scorer], None],
        metrics: Metrics,
        watch: FileWatch | None = None,
        taken: frozenset[str] = frozenset(),
        warm_batch: int = 0,
    ) -> None:
        self.path = path
        self.taken = taken
        self.warm_batch = warm_batch
        """Warm a loaded model up at this batch size before the swap (0: do not)."""
        self.device = device
        self.serving = serving
        """The scorer serving, or swapped in and serving from the next batch on."""
        self._loader = loader
        self._stage = stage
        self._swap = swap
        self._metrics = metrics
        self._watch = watch
        self._requested = False
        self._job: Future[Verdict] | None = None

    def request(self) -> None:
        """Ask for a reload. Only sets a flag, so a signal handler may call it."""
        self._requested = True

    def poll(self) -> Future[None] | None:
        """One step on the main loop: take a finished vet, start one if asked. Returns the
        swap's future when a new model was swapped in (tests wait on it)."""
        if self._watch is not None and self._watch.changed():
            log.info("%s changed; reloading", self.path)
            self._requested = True
        swapped = None
        if self._job is not None and self._job.done():
            swapped = self._finish(self._job.result())
            self._job = None
        if self._requested and self._job is None:
            self._requested = False  # a request during the load starts another after it
            self._job = self._loader.submit(
                vet, self.path, self.device, self.serving, self.taken, self.warm_batch
            )
        return swapped

    def _finish(self, verdict: Verdict) -> Future[None] | None:
        self._metrics.model_reloads.labels(verdict.outcome).inc()
        if verdict.scorer is None:
            level = logging.ERROR if verdict.outcome == REFUSED else logging.INFO
            log.log(level, "model reload %s, %s serves on: %s",
                    verdict.outcome, self.serving.meta.model_version, verdict.detail)  # fmt: skip
            return None
        log.info("model reload: %s from the next batch on", verdict.detail)
        self.serving = verdict.scorer
        # In the device stage's queue, behind the batches already submitted.
        return self._stage.submit(self._swap, verdict.scorer)
