"""The text the demo prints: a table of this run's scores and a metrics summary."""

import statistics
import time
from collections.abc import Iterable

from consumer.metrics import STAGES, Metrics
from schemas.scores import ScoreRecord

TABLE_ROWS = 50


def score_table(records: Iterable[ScoreRecord], limit: int = TABLE_ROWS) -> str:
    """Records sorted by predicted popularity, best first."""
    rows = sorted(records, key=lambda r: r.popularity, reverse=True)
    head = f"{'track_id':<22} {'popularity':>10} {'p(hit)':>7} {'hit':>4} {'latency_ms':>11}"
    lines = [head, "-" * len(head)]
    for r in rows[:limit]:
        hit = "yes" if r.is_hit else "no"
        lines.append(
            f"{r.track_id[:22]:<22} {r.popularity:>10.1f} {r.hit_probability:>7.2f} "
            f"{hit:>4} {r.latency_ms:>11.0f}"
        )
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return "\n".join(lines)


def metrics_summary(
    metrics: Metrics,
    records: list[ScoreRecord],
    dead_letters: dict[str, int],
    first_event_at: float | None,
    last_write_at: float | None,
) -> str:
    """Counts, throughput, latency percentiles and mean stage times from the live registry."""
    get = metrics.registry.get_sample_value
    scored = int(get("popscore_events_total", {"outcome": "scored"}) or 0)
    dead = int(get("popscore_events_total", {"outcome": "dead_lettered"}) or 0)
    busy = (last_write_at or time.monotonic()) - (first_event_at or time.monotonic())
    reasons = dict(sorted(dead_letters.items()))
    lines = [f"events scored: {scored}   dead-lettered: {dead} {reasons}"]
    if busy > 0:
        lines.append(f"throughput: {(scored + dead) / busy:.1f} events/s over {busy:.1f} s")
    latencies = sorted(r.latency_ms for r in records)
    if len(latencies) >= 2:
        q = statistics.quantiles(latencies, n=100)
        lines.append(f"e2e latency ms: p50 {q[49]:.0f}  p95 {q[94]:.0f}  max {latencies[-1]:.0f}")
    stage_parts = []
    for stage in STAGES:
        total = get("popscore_stage_seconds_sum", {"stage": stage}) or 0.0
        count = get("popscore_stage_seconds_count", {"stage": stage}) or 0.0
        if count:
            stage_parts.append(f"{stage} {1000 * total / count:.1f}")
    label = "mean stage ms (per event: fetch, decode; per batch: the rest): "
    lines.append(label + ", ".join(stage_parts))
    batches = get("popscore_batch_size_count") or 0
    if batches:
        lines.append(f"batches: {int(batches)}, mean size {scored / batches:.1f}")
    return "\n".join(lines)
