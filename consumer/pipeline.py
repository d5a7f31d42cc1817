"""One micro-batch from Kafka messages to ScoreRecords: parse, fetch + decode (threads), score.

Nothing here writes anywhere; the app hands the result to the sinks and then commits.
Every per-event failure becomes a ``Rejected`` item, so the rest of the batch is scored.
"""

import logging
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import cast

import numpy as np
import torch
from confluent_kafka import Message
from pydantic import ValidationError

from consumer.audio import AudioPolicy, decode_window, open_uri
from consumer.dead_letters import Rejected, internal_error
from consumer.device import Scorer, Scores, failure_kind
from consumer.drift import DriftMonitor
from consumer.errors import DeadLetter, DeviceFailure
from consumer.metrics import Metrics
from consumer.resample import BatchResampler, Clip, check_resample_rate
from consumer.soxr_resample import SoxrResampler
from popscore.artifact import ArtifactMeta, extract
from schemas.dead_letter import DeadLetterReason as Reason
from schemas.events import ReleaseEvent
from schemas.scores import ScoreRecord, utc_now

log = logging.getLogger(__name__)
# A ReleaseEvent is a few kB; anything this big is abuse or a producer bug.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# How far ahead of this host's clock an emitted_at may be (clocks drift; newer-wins in Redis
# means a far-future event would hold its track's score for ever).
DEFAULT_MAX_FUTURE_SKEW_S = 3600.0


@dataclass(frozen=True)
class _Ready:
    event: ReleaseEvent
    # None for a features-only artifact; the decoded window itself when resampled on the device
    waveform: np.ndarray | Clip | None


@dataclass
class Prepared:
    """A batch after parsing and decoding, before the device."""

    messages: list[Message]
    ready: list[tuple[Message, _Ready]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class BatchResult:
    """What one batch produced: scores (with their messages) and messages to dead-letter."""

    messages: list[Message]
    model_version: str
    """The model that scored the batch: its event-id claims are this version's."""
    scored: list[tuple[Message, ScoreRecord]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates: list[Message] = field(default_factory=list)


def parse_event(
    msg: Message,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
) -> ReleaseEvent:
    """The message's ReleaseEvent, or a DeadLetter naming the first problem."""
    value = msg.value()
    if value is None:
        raise DeadLetter(Reason.INVALID_JSON, "the message has no value")
    if len(value) > max_bytes:
        raise DeadLetter(Reason.MESSAGE_TOO_LARGE, f"{len(value)} bytes > {max_bytes}")
    try:
        event = ReleaseEvent.from_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = Reason.INVALID_JSON if first["type"] == "json_invalid" else Reason.INVALID_EVENT
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise DeadLetter(reason, f"{where}: {first['msg']}") from None
    ahead = (event.emitted_at - utc_now()).total_seconds()
    if ahead > max_future_skew_s:
        detail = f"emitted_at: {ahead:.0f} s in the future (more than {max_future_skew_s:g} s)"
        raise DeadLetter(Reason.INVALID_EVENT, detail)
    return event


def shadow_problem(primary: ArtifactMeta, primary_listens: bool, shadow: Scorer) -> str | None:
    """Why ``shadow`` cannot score beside the primary on the same decoded audio, or None."""
    if not shadow.listens:
        return None
    if not primary_listens:
        return "it listens to audio but the primary model does not, so no audio is decoded"
    mine, theirs = (
        (primary.sample_rate, primary.clip_seconds),
        (
            shadow.meta.sample_rate,
            shadow.meta.clip_seconds,
        ),
    )
    if mine != theirs:
        return f"its audio input (rate, seconds) {theirs} differs from the primary's {mine}"
    return None


def batch_resampler_for(resample_on: str, scorer: Scorer) -> BatchResampler | None:
    """The device-side resampler when POPSCORE_RESAMPLE_ON is ``device``; None (``pool`` and
    ``auto``): resample per item with libsoxr on the decode pool, on every device — the
    resampler training uses, so a GPU pod scores an event as a CPU pod does."""
    if resample_on == "device":
        meta = scorer.meta
        return BatchResampler(meta.sample_rate, meta.clip_seconds, scorer.device)
    return None


class Pipeline:
    """Turns messages into scores with the loaded model."""

    def __init__(
        self,
        scorer: Scorer,
        policy: AudioPolicy,
        pool: Executor,
        metrics: Metrics,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        resample_on: str = "auto",
        max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.scorer = scorer
        self.drift = drift
        self.max_event_bytes = max_event_bytes
        self.max_future_skew_s = max_future_skew_s
        self.policy = policy
        self.pool = pool
        self.metrics = metrics
        meta = scorer.meta
        self.resampler = SoxrResampler(meta.sample_rate, meta.clip_seconds)
        self.batch_resampler = batch_resampler_for(resample_on, scorer)

    def prepare(self, messages: list[Message]) -> Prepared:
        """Parse every message and fetch + decode its audio on the pool (stage 1)."""
        prepared = Prepared(messages)
        parsed: list[tuple[Message, ReleaseEvent]] = []
        for msg in messages:
            try:
                event = parse_event(msg, self.max_event_bytes, self.max_future_skew_s)
                parsed.append((msg, event))
            except DeadLetter as exc:
                prepared.rejected.append(Rejected(msg, exc))
            except Exception as exc:  # whatever else one record raises costs that record alone
                prepared.rejected.append(Rejected(msg, internal_error(exc)))
        loaded = self.pool.map(self._load, [event for _msg, event in parsed])
        for (msg, event), outcome in zip(parsed, loaded, strict=True):
            if isinstance(outcome, DeadLetter):
                prepared.rejected.append(Rejected(msg, outcome, event.event_id))
            else:
                prepared.ready.append((msg, outcome))
        return prepared

    def infer(self, prepared: Prepared) -> BatchResult:
        """Score what was decoded, as one batch on the device (stage 2)."""
        version = self.scorer.meta.model_version
        result = BatchResult(prepared.messages, version, rejected=list(prepared.rejected))
        if not prepared.ready:
            return result
        outcomes = self._score([item for _msg, item in prepared.ready])
        for (msg, item), outcome in zip(prepared.ready, outcomes, strict=True):
            if isinstance(outcome, DeadLetter):
                result.rejected.append(Rejected(msg, outcome, item.event.event_id))
            else:
                result.scored.append((msg, outcome))
        return result

    def score_events(self, events: list[ReleaseEvent]) -> list[ScoreRecord | DeadLetter]:
        """One outcome per event, in order: its score or why it could not be scored."""
        loaded = list(self.pool.map(self._load, events))
        ready = [item for item in loaded if isinstance(item, _Ready)]
        scored = iter(self._score(ready) if ready else [])
        # Scores come back in the order of ``ready``; slot them where their events were.
        return [next(scored) if isinstance(item, _Ready) else item for item in loaded]

    def _load(self, event: ReleaseEvent) -> "_Ready | DeadLetter":
        """Runs on a pool thread: fetch, decode the window, resample."""
        if not self.scorer.listens:
            return _Ready(event, None)  # a features-only artifact: the audio is never read
        start = time.perf_counter()
        try:
            source = open_uri(event.audio_uri, self.policy)
            fetched = time.perf_counter()
            clip = decode_window(source, self.scorer.meta.clip_seconds, self.policy)
            if self.batch_resampler:
                # Refused here, on the pool, so one odd rate cannot fail the device's batch.
                check_resample_rate(clip.source_rate, self.batch_resampler.target_rate)
                waveform: np.ndarray | Clip = clip
            else:
                waveform = self.resampler(clip)
        except DeadLetter as exc:
            return exc
        except Exception as exc:  # unforeseen: this event alone fails
            return _unexpected(event, exc)
        self.metrics.stage_seconds.labels("fetch").observe(fetched - start)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - fetched)
        return _Ready(event, waveform)

    def shadow_records(
        self, shadow: Scorer, ready: list[tuple[Message, _Ready]]
    ) -> tuple[list[tuple[Message, ScoreRecord]], int]:
        """A second model's records for the batch's decoded items (the same audio: decoded
        once), and how many it could not score. Never raises: a shadow failure is counted,
        not dead-lettered."""
        if not ready:
            return [], 0
        items = [item for _msg, item in ready]
        try:
            rows = [extract(item.event.model_dump(), shadow.meta.features) for item in items]
            scores = self._infer(items, rows, shadow)
        except Exception as exc:  # the shadow's batch fails alone; the primary is untouched
            log.warning("shadow model %s failed on %d events: %s", shadow.meta.model_version,
                        len(items), f"{type(exc).__name__}: {exc}"[:300])  # fmt: skip
            return [], len(items)
        at, records = utc_now(), []
        for i, (msg, item) in enumerate(ready):
            try:
                records.append(
                    (msg, score_record(item.event, shadow.meta, scores, i, at, shadow.listens))
                )
            except Exception:  # a non-finite score: that record alone is not emitted
                continue
        return records, len(items) - len(records)

    def _score(self, items: list[_Ready]) -> list[ScoreRecord | DeadLetter]:
        start = time.perf_counter()
        rows = [self._features(item) for item in items]
        outcomes: dict[int, DeadLetter | tuple[Scores, int]] = {
            i: row for i, row in enumerate(rows) if isinstance(row, DeadLetter)
        }
        good = [i for i in range(len(items)) if i not in outcomes]
        scored = self._isolated([items[i] for i in good], [cast(np.ndarray, rows[i]) for i in good])
        outcomes.update(zip(good, scored, strict=True))
        self._observe(time.perf_counter() - start, scored)
        scored_at = utc_now()
        records = [self._record(item, outcomes[i], scored_at) for i, item in enumerate(items)]
        if self.drift is not None:
            self.drift.observe_scored(rows, records)
        return records

    def _observe(self, elapsed: float, scored: list[tuple[Scores, int] | DeadLetter]) -> None:
        """The stage times: the frontend apart where the artifact exposes it; "inference" the
        rest (feature rows, host<->device copies, the network)."""
        calls = list({id(o[0]): o[0] for o in scored if isinstance(o, tuple)}.values())
        if any(call.frontend_s is not None for call in calls):
            frontend = sum(call.frontend_s or 0.0 for call in calls)
            self.metrics.stage_seconds.labels("frontend").observe(frontend)
            elapsed -= frontend
        self.metrics.stage_seconds.labels("inference").observe(elapsed)

    def _features(self, item: _Ready) -> np.ndarray | DeadLetter:
        try:
            return extract(item.event.model_dump(), self.scorer.meta.features)
        except Exception as exc:  # unforeseen: this event alone fails
            return _unexpected(item.event, exc)

    def _isolated(
        self, items: list[_Ready], rows: list[np.ndarray]
    ) -> list[tuple[Scores, int] | DeadLetter]:
        """Each item's scores and row: the batch in one call; when that raises, each half again,
        down to the items that fail on their own (inference_failed), so one item that breaks
        the model costs itself alone and log2(batch) extra calls."""
        if not items:
            return []
        try:
            scores = self._infer(items, rows)
        except Exception as exc:
            kind = failure_kind(exc)
            if kind == "device" or (kind == "oom" and len(items) == 1):
                # Not these events' fault: dead-lettering them would dead-letter every event
                # while the device stays broken. The batch fails uncommitted, and the restart
                # (a fresh device context) scores it again.
                last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                raise DeviceFailure(f"{kind}: {last[:300]}") from exc
            if kind == "oom":
                self.scorer.free_memory()  # then the halves, below, each fit or split again
            elif len(items) == 1:
                return [DeadLetter(Reason.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"[:300])]
            log.warning("inference of %d events failed (%s: %s); splitting the batch",
                        len(items), type(exc).__name__, str(exc)[:200])  # fmt: skip
            half = len(items) // 2
            return self._isolated(items[:half], rows[:half]) + self._isolated(
                items[half:], rows[half:]
            )
        return [(scores, i) for i in range(len(items))]

    def _record(
        self, item: _Ready, outcome: DeadLetter | tuple[Scores, int], at: datetime
    ) -> ScoreRecord | DeadLetter:
        if not isinstance(outcome, tuple):
            return outcome
        scores, i = outcome
        try:
            return score_record(item.event, self.scorer.meta, scores, i, at, self.scorer.listens)
        except Exception as exc:  # a non-finite score, or a record the schema refuses
            return DeadLetter(Reason.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}"[:300])

    def _infer(
        self, items: list[_Ready], rows: list[np.ndarray], scorer: Scorer | None = None
    ) -> Scores:
        """One call of ``scorer`` (default: the primary) on the batch."""
        scorer = scorer or self.scorer
        feats = np.stack(rows)
        mask = np.ones(len(items), dtype=bool)
        if not scorer.listens:  # one dummy sample per row: the artifact reads no audio
            return scorer.score(np.zeros((len(items), 1), np.float32), feats, ~mask)
        if self.batch_resampler is None:  # rows straight into the scorer's staging buffer
            return scorer.score([cast(np.ndarray, item.waveform) for item in items], feats, mask)
        start = time.perf_counter()
        batch = self.batch_resampler([cast(Clip, item.waveform) for item in items])
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)  # to time it: the kernels run async
        resample_s = time.perf_counter() - start
        scores = scorer.score(batch, feats, mask)
        # Resampling on the device is part of the "frontend" stage: signal -> model input.
        frontend_s = (scores.frontend_s or 0.0) + resample_s
        return replace(scores, frontend_s=frontend_s, total_s=scores.total_s + resample_s)


def score_record(
    event: ReleaseEvent,
    meta: ArtifactMeta,
    scores: Scores,
    i: int,
    scored_at: datetime,
    audio_used: bool,
) -> ScoreRecord:
    """Row ``i`` of a batch's scores as the event's ScoreRecord (ValueError when non-finite)."""
    popularity = float(scores.popularity[i])
    probability = float(scores.hit_probability[i])
    if not (math.isfinite(popularity) and math.isfinite(probability)):
        raise ValueError(f"non-finite model output ({popularity}, {probability})")
    latency_ms = (scored_at - event.emitted_at).total_seconds() * 1000.0
    return ScoreRecord(
        event_id=event.event_id,
        track_id=event.track_id,
        model_version=meta.model_version,
        popularity=min(max(popularity, 0.0), 100.0),
        hit_probability=min(max(probability, 0.0), 1.0),
        # A hit by the artifact's decision cut on the popularity scale.
        is_hit=popularity >= meta.hit_threshold,
        audio_used=audio_used,
        emitted_at=event.emitted_at,
        scored_at=scored_at,
        latency_ms=latency_ms,
    )


def _unexpected(event: ReleaseEvent, exc: Exception) -> DeadLetter:
    """An exception no check foresaw, while handling ``event``: its dead letter, logged once."""
    letter = internal_error(exc)
    log.warning("event %s: %s", event.event_id, letter.detail)
    return letter
