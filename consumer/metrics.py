"""Prometheus metrics (docs/INTERFACE.md, "Metrics"). Names and labels are the dashboards'
contract: change neither."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.dead_letter import DeadLetterReason

OUTCOME = "outcome"
REASON = "reason"
STAGE = "stage"
TOPIC = "topic"
PARTITION = "partition"
FEATURE = "feature"
SCORE = "score"

OUTCOME_SCORED = "scored"
OUTCOME_DEAD_LETTERED = "dead_lettered"
OUTCOME_DUPLICATE = "duplicate"
# popscore_model_reloads_total: swapped in, refused (the old model serves on), same version
RELOAD_LOADED = "loaded"
RELOAD_REFUSED = "refused"
RELOAD_UNCHANGED = "unchanged"

STAGES = ("fetch", "decode", "frontend", "inference", "redis", "produce", "commit")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Shadow minus primary popularity, in points of the 0-100 scale: symmetric around zero.
_DIFFERENCE_BUCKETS = (-50, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50)
SHADOW_OUTCOMES = ("scored", "failed", "duplicate", "skipped", "late")


class Metrics:
    """Every metric the service exports, on its own registry (so tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "popscore_events_total", "Events handled, by outcome.", [OUTCOME], registry=r
        )
        self.dead_letters = Counter(
            "popscore_dead_letters_total",
            "Events sent to the DLQ, by reason.",
            [REASON],
            registry=r,
        )
        self.processed_alone = Counter(
            "popscore_records_alone_total",
            "Records processed one at a time: they were in hand when a consumer of their "
            "partition died without committing them.",
            registry=r,
        )
        self.redelivered = Counter(
            "popscore_records_redelivered_total",
            "Records the Kafka client handed out again, below an offset already handed out for "
            "their partition: dropped unprocessed (they were scored once already).",
            registry=r,
        )
        self.e2e_latency = Histogram(
            "popscore_e2e_latency_seconds",
            "emitted_at to score written in Redis.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "popscore_stage_seconds",
            "Seconds in each pipeline stage: per event for fetch and decode, per batch otherwise.",
            [STAGE],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "popscore_batch_size",
            "Events per scored micro-batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "popscore_consumer_lag",
            "Records behind the last stable offset (what a read_committed reader can reach).",
            [TOPIC, PARTITION],
            registry=r,
        )
        self.inflight = Gauge(
            "popscore_inflight_events", "Events consumed but not yet committed.", registry=r
        )
        self.rebalances = Counter(
            "popscore_rebalances_total",
            "Partitions assigned, revoked or lost in rebalances.",
            ["event"],
            registry=r,
        )
        self.transactions = Counter(
            "popscore_transactions_total",
            "Batch transactions, by how they ended: committed or aborted (then replayed).",
            ["outcome"],
            registry=r,
        )
        self.model_info = Gauge(
            "popscore_model_info",
            "The loaded model (value 1), and what it was trained on.",
            ["model_version", "device", "training_data", "synthetic", "cpu_optimized"],
            registry=r,
        )
        self.view_fed = Gauge(
            "popscore_view_fed",
            "1 while this consumer's scores reach the view (popscore:score:*, the day "
            "leaderboards): no version promoted and it is the live primary, or the promoted "
            "version is its model or its shadow; 0 while they reach only its model's namespace.",
            registry=r,
        )
        self.yielding = Gauge(
            "popscore_yielding",
            "1 while this consumer pauses for live traffic (POPSCORE_YIELD_TO_GROUP lags).",
            registry=r,
        )
        self.remaining = Gauge(
            "popscore_remaining_records",
            "Records between this consumer's positions and the ends of its partitions.",
            registry=r,
        )
        self.eta = Gauge(
            "popscore_eta_seconds",
            "popscore_remaining_records at the last minute's rate: a backfill's ETA "
            "(-1 while nothing was committed in the last minute).",
            registry=r,
        )
        self._shadow_metrics()
        self.model_reloads = Counter(
            "popscore_model_reloads_total",
            "Model reloads (SIGHUP or a changed artifact file), by outcome: loaded, refused "
            "(the old model serves on), unchanged (the same model_version).",
            [OUTCOME],
            registry=r,
        )
        self._add_drift(r)
        for outcome in (OUTCOME_SCORED, OUTCOME_DEAD_LETTERED, OUTCOME_DUPLICATE):
            self.events.labels(outcome)  # export zeros, so rate() works from the first scrape
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for outcome in (RELOAD_LOADED, RELOAD_REFUSED, RELOAD_UNCHANGED):
            self.model_reloads.labels(outcome)
        for ended in ("committed", "aborted"):
            self.transactions.labels(ended)
        for reason in DeadLetterReason:
            self.dead_letters.labels(reason.value)

    def _shadow_metrics(self) -> None:
        """The shadow model's (POPSCORE_SHADOW_MODEL) outcomes and its comparison with the
        primary; exported at zero without a shadow, so dashboards need no special case."""
        r = self.registry
        self.shadow_events = Counter(
            "popscore_shadow_events_total",
            "Events the shadow model handled: scored, failed (counted, never dead-lettered), "
            "duplicate, skipped (the shadow fell behind), late (scored after the commit's wait).",
            [OUTCOME],
            registry=r,
        )
        self.shadow_difference = Histogram(
            "popscore_shadow_score_difference",
            "Shadow minus primary predicted popularity, per event both scored.",
            buckets=_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.shadow_agreement = Counter(
            "popscore_shadow_hit_agreement_total",
            "Events both models scored, by whether their is_hit agreed (true, false).",
            ["agree"],
            registry=r,
        )
        self.shadow_info = Gauge(
            "popscore_shadow_model_info",
            "The shadow model (value 1), when one is loaded.",
            ["model_version"],
            registry=r,
        )
        for outcome in SHADOW_OUTCOMES:
            self.shadow_events.labels(outcome)
        for agree in ("true", "false"):
            self.shadow_agreement.labels(agree)

    def _add_drift(self, r: CollectorRegistry) -> None:
        # Set by consumer.drift; absent while the model has no reference or the window is short.
        self.feature_missing_ratio = Gauge(
            "popscore_feature_missing_ratio",
            "Share of the drift window's events missing the feature.",
            [FEATURE],
            registry=r,
        )
        self.feature_missing_ratio_reference = Gauge(
            "popscore_feature_missing_ratio_reference",
            "Share of the model's training rows missing the feature.",
            [FEATURE],
            registry=r,
        )
        self.feature_psi = Gauge(
            "popscore_feature_psi",
            "Population stability index of the feature's present values, drift window vs training.",
            [FEATURE],
            registry=r,
        )
        self.score_psi = Gauge(
            "popscore_score_psi",
            "Population stability index of the score, drift window vs the model's training rows.",
            [SCORE],
            registry=r,
        )
