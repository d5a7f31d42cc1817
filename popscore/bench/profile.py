"""Where the service's busy time goes, from a py-spy raw profile (``make profile``).

    python -m popscore.bench.profile PROFILE.raw [--top 12]

py-spy's raw format is one line per distinct stack, ``frame;frame;...;leaf COUNT``. Samples
whose leaf is a blocking wait (a queue, a condition, Kafka's poll, the HTTP server's select)
are idle and left out; every busy sample is put in the stage of the frame nearest its leaf
that a stage names, so the table says how much of the busy time is the audio and the model
and how much is the per-event Python around them (parsing, records, Kafka, Redis).
"""

import argparse
import importlib.util
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Leaves where a thread is blocked, not working (py-spy's idle detection misses GIL-free waits).
IDLE_LEAVES = (
    "Condition.wait",
    "Event.wait",
    "_worker (concurrent/futures/thread.py:",  # the pool's own loop: blocked in queue.get
    "KafkaSource.fetch (consumer/source.py",  # inside librdkafka's poll
    "_PollLikeSelector.select",
    "select (selectors.py",
    "Thread._wait_for_tstate_lock",
)


def _scorer_calls() -> tuple[str, str]:
    """py-spy's names for the two artifact calls in Scorer._in_two_calls ("consumer/device.py:N"),
    found in the source, so an edit to device.py cannot silently move their samples."""
    spec = importlib.util.find_spec("consumer.device")
    assert spec is not None and spec.origin is not None
    lines = Path(spec.origin).read_text().splitlines()

    def line_of(call: str) -> str:
        return f"consumer/device.py:{next(i for i, t in enumerate(lines, 1) if call in t)})"

    return line_of("logmel = module.spectrogram("), line_of("= module.score_spectrogram(")


FRONTEND_CALL, NETWORK_CALL = _scorer_calls()
# (stage, substrings of a frame). Walking from the leaf up, the first frame that matches any
# pattern decides, in this order: a torch pad called by the resampler is resample time.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "decode (libsndfile) and mixdown",
        ("soundfile.py", "mix_down", "decode_window", "_read_blocks"),
    ),
    ("resample (libsoxr or torchaudio)", ("resample", "Resampler")),
    ("frontend (artifact spectrogram)", (FRONTEND_CALL,)),
    ("network (artifact score_spectrogram)", (NETWORK_CALL,)),
    ("start-up (imports, model load)", ("importlib", "torch/jit/_serialization", "_uses_audio")),
    ("audio fetch and batch assembly", ("consumer/audio.py", "consumer/device.py", "numpy")),
    ("Kafka transaction (produce, commit)", ("consumer/commit.py",)),
    ("Redis write", ("consumer/sinks.py", "redis/")),
    ("Kafka consume, lag, pause", ("consumer/source.py",)),
    ("event parse and records (Python)", ("pydantic", "schemas/", "consumer/pipeline.py", "json")),
    ("bench driver (sends events, reads Redis)", ("bench/e2e.py", "bench/corpus.py")),
)


@dataclass(frozen=True)
class Profile:
    """Samples per stage (busy only), idle samples, and the busiest leaf frames."""

    stages: Counter[str]
    idle: int
    leaves: Counter[str]

    @property
    def busy(self) -> int:
        return sum(self.stages.values())


def parse(lines: Iterable[str]) -> Profile:
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    idle = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE_LEAVES):
            idle += int(count)
            continue
        stages[stage_of(frames)] += int(count)
        leaves[frames[-1]] += int(count)
    return Profile(stages, idle, leaves)


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, patterns in STAGES:
            if any(p in frame for p in patterns):
                return stage
    return "other"


def render(profile: Profile, top: int) -> str:
    busy = max(1, profile.busy)
    total = busy + profile.idle
    lines = [
        f"{total} samples: {profile.busy} busy, {profile.idle} idle (blocked waits, left out)",
        "",
        f"{'share of busy':>13}  {'samples':>7}  stage",
    ]
    for stage, n in profile.stages.most_common():
        lines.append(f"{100 * n / busy:12.1f}%  {n:7d}  {stage}")
    lines += ["", f"busiest {top} leaf frames:"]
    for leaf, n in profile.leaves.most_common(top):
        lines.append(f"{100 * n / busy:12.1f}%  {n:7d}  {leaf}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if not args.raw.is_file():
        parser.error(f"{args.raw} is not a file")
    with args.raw.open() as fh:
        print(render(parse(fh), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
