"""``popscore bench``: the modes on one corpus, a table, and JSON (docs/INTERFACE.md, "Benchmark
report"). The benchmark itself is ``popscore.bench``, which the runtime image leaves out."""

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.errors import UsageError
from consumer.settings import Settings
from popscore.cli.argtypes import (
    Subparsers,
    device_name,
    existing_dir,
    existing_file,
    finite_positive_float,
    folder_to_fill,
    int_at_least,
    positive_float,
    positive_int,
    settings_with,
    writable_path,
)
from popscore.cli.service import load_scorer

MODES = (
    "decode",
    "compute",
    "e2e",
    "naive",
    "compute_process",
    "soak",
    "shadow",
    "backfill",
    "promote",
)
DEFAULT_MODES = ("decode", "compute", "e2e", "naive")
KAFKA_MODES = {"e2e", "naive", "soak", "shadow", "backfill"}  # their topics: bench-<run id>-*
# Debian's wesnoth-1.16-music: real music, OGG/Vorbis 44.1 kHz stereo, 5 s to 9 min.
WESNOTH_GLOB = "/usr/share/games/wesnoth/*/data/core/music"


def register(sub: Subparsers) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    bench = sub.add_parser("bench", help="benchmark: compute ceiling, end to end, naive consumer")
    bench.set_defaults(handler=_bench)
    bench.add_argument("--events", type=positive_int, default=192, help="events per mode")
    bench.add_argument(
        "--clip",
        type=finite_positive_float,
        metavar="SECONDS",
        help="releases of this length (e.g. 30) instead of full-length 3-4 min",
    )
    # Of synthesized audio only (None here: refused beside --audio-dir / --wesnoth, then
    # SYNTHETIC_DEFAULTS).
    bench.add_argument("--format", choices=["MP3", "WAV", "FLAC", "OGG", "M4A"], help="default MP3")
    bench.add_argument("--sample-rate", type=positive_int, help="default 44100")
    bench.add_argument("--channels", type=positive_int, help="default 2")
    bench.add_argument(
        "--unique-files", type=positive_int, help="distinct audio files (cached; default 8)"
    )
    bench.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated, of: decode (fetch + decode of the window alone: the floor), "
        "compute, e2e, naive (these four the default), compute_process (the "
        "compute ceiling with a process pool instead of threads), soak, shadow (the e2e max "
        "with a shadow model beside the primary), backfill (live p99 at --rate alone and "
        "beside a backfill process), promote (popscore promote of --events x 1000 tracks, in "
        "Redis database 15 of POPSCORE_REDIS_URL, which must be empty and is emptied after)",
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument(
        "--audio-dir", type=existing_dir, help="real audio files to use instead of synthesized"
    )
    source.add_argument(
        "--wesnoth",
        action="store_true",
        help="real music: the OGG files of Debian's wesnoth-1.16-music, when installed",
    )
    bench.add_argument(
        "--rate-seconds",
        type=positive_int,
        default=60,
        help="the latency run sends at least this long at --rate, so its p99 has samples",
    )
    bench.add_argument(
        "--soak-seconds",
        type=positive_int,
        default=600,
        help="length of the soak mode, sent at --rate (or half the e2e max)",
    )
    bench.add_argument(
        "--rate",
        type=positive_float,
        help="offered events/s of the latency run (default: half the measured max)",
    )
    bench.add_argument("--batch-size", type=positive_int, help="default: POPSCORE_BATCH_SIZE")
    bench.add_argument(
        "--batch-wait-ms", type=int_at_least(0), help="default: POPSCORE_BATCH_WAIT_MS"
    )
    bench.add_argument("--decode-workers", type=positive_int, help="POPSCORE_DECODE_WORKERS")
    bench.add_argument("--torch-threads", type=positive_int, help="default: half the usable cores")
    bench.add_argument(
        "--resample-on", choices=["auto", "pool", "device"], help="POPSCORE_RESAMPLE_ON"
    )
    bench.add_argument(
        "--device", type=device_name, help="auto | cpu | cuda | cuda:N (default: POPSCORE_DEVICE)"
    )
    bench.add_argument("--model", type=existing_file, help="default: POPSCORE_MODEL")
    bench.add_argument(
        "--corpus-dir",
        type=folder_to_fill,
        default=Path(".bench/corpus"),
        help="synthesized files are cached here; one made before may be read-only",
    )
    bench.add_argument("--seed", type=int_at_least(0), default=0)
    bench.add_argument("--json", type=writable_path, metavar="FILE", help="write the report here")


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    _require_benchmark()
    from consumer.audio import AudioPolicy
    from consumer.kafka import delete_topics
    from consumer.pipeline import batch_resampler_for
    from popscore.bench import compute, corpus
    from popscore.bench.stats import ModeResult, Workload, report, table

    modes = _checked_modes(args)
    if modes is None:
        return 2
    _check_source(args)
    base = settings_with(settings, _overrides(args), BENCH_FLAGS)  # before anything slow
    if "promote" in modes:  # its database, before every other mode has run
        from popscore.bench import rollout as bench_rollout

        bench_rollout.promotion_database(base).close()
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the Scorer keeps it
        torch.set_num_threads(args.torch_threads)
    # Seconds, before the corpus: synthesizing one can take minutes.
    scorer = load_scorer(args.model, args.device, base)
    try:
        paths, shape = _corpus(args)
    except corpus.CorpusError as exc:
        print(f"popscore bench: {exc}", file=sys.stderr)
        return 2
    roots = tuple(sorted({p.parent for p in paths}))
    base = settings_with(base, {"audio_file_roots": roots}, BENCH_FLAGS)
    run_id = f"{int(time.time())}-{uuid.uuid4().hex[:6]}"
    resampler = batch_resampler_for(base.resample_on, scorer)
    workload = Workload(
        events=args.events,
        **shape,
        batch_size=base.batch_size,
        batch_wait_ms=base.batch_wait_ms,
        decode_workers=base.decode_workers,
        torch_threads=torch.get_num_threads(),
        device=str(scorer.device),
        model_version=scorer.meta.model_version,
        resample_on="pool" if resampler is None else "device",
        cpu_optimized=scorer.optimized,
    )
    policy = AudioPolicy.create(base.audio_file_roots, max_bytes=base.audio_max_bytes)

    def fresh(mode: str, n: int = args.events) -> list[Any]:
        return corpus.events(paths, n, args.seed, f"{run_id}-{mode}")

    results: list[ModeResult] = []
    if "decode" in modes:
        results.append(compute.decode_floor(policy, fresh("decode"), scorer.meta.clip_seconds,
                                            base.decode_workers))  # fmt: skip
    for kind in ("thread", "process"):
        if ("compute" if kind == "thread" else "compute_process") in modes:
            results.append(compute.run(scorer, policy, fresh("compute"), base.batch_size,
                                       base.decode_workers, kind,
                                       resampler))  # fmt: skip
    try:
        results += _service_modes(args, modes, base, run_id, fresh, scorer, policy)
    finally:
        if set(modes) & KAFKA_MODES:  # decode and compute alone never reach a broker
            delete_topics(base.kafka_config("admin"), f"bench-{run_id}-")
    doc = report(workload, results, machine_info())
    print(table(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# The flag that sets each setting the benchmark overrides: an error about one names it.
BENCH_FLAGS = {
    "batch_size": "--batch-size",
    "batch_wait_ms": "--batch-wait-ms",
    "decode_workers": "--decode-workers",
    "device": "--device",
    "model": "--model",
    "resample_on": "--resample-on",
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the benchmark's flags give, where given."""
    given = {
        field: getattr(args, flag[2:].replace("-", "_")) for field, flag in BENCH_FLAGS.items()
    }
    return {field: value for field, value in given.items() if value is not None}


def _service_modes(
    args: argparse.Namespace,
    modes: list[str],
    base: Settings,
    run_id: str,
    fresh: Callable[..., list[Any]],
    scorer: Any,
    policy: Any,
) -> list[Any]:
    """The modes that run the service through Kafka and Redis, in order."""
    from popscore.bench import e2e, naive, rollout, soak

    results: list[Any] = []
    rate = args.rate

    def own(mode: str) -> Settings:
        return unique_settings(base, run_id, mode)

    if "e2e" in modes or "shadow" in modes:
        maxed = e2e.run(own("max"), fresh("max"), None, "e2e_max")
        results.append(maxed)
        rate = rate or maxed.events_per_s / 2
    if "shadow" in modes:
        results.append(rollout.shadow(base, own("shadow"), fresh("shadow")))
    if "e2e" in modes and rate:
        n = max(args.events, round(rate * args.rate_seconds))
        results.append(e2e.run(own("rate"), fresh("rate", n), rate, "e2e_rate"))
    if "backfill" in modes and rate:
        n = max(args.events, round(rate * args.rate_seconds))
        live = (fresh("alone", n), fresh("beside", n))
        catalog = fresh("catalog", max(1000, 20 * args.rate_seconds))
        results += rollout.backfill(own("alone"), own("beside"), live, catalog, rate)
    if "promote" in modes:
        results.append(rollout.promotion(base, args.events * 1000))
    if "naive" in modes:
        results.append(naive.run(own("naive"), scorer, policy, fresh("naive")))
    if "soak" in modes and rate:
        n = max(1, round(rate * args.soak_seconds))
        results.append(soak.run(own("soak"), fresh("soak", n), rate))
    return results


def _require_benchmark() -> None:
    """The runtime image leaves the benchmark out: one line saying so (exit 2), no traceback."""
    if importlib.util.find_spec("popscore.bench") is None:
        raise UsageError(
            "the benchmark is not in this install (the runtime image leaves it out): "
            "run it from a source checkout, `make bench`"
        )


def _corpus(args: argparse.Namespace) -> tuple[list[Path], dict[str, Any]]:
    """The audio files of this run and the Workload fields that describe them: real files
    (--audio-dir, --wesnoth) as they are, or synthesized releases (cached)."""
    from popscore.bench import corpus

    if args.wesnoth or args.audio_dir:
        folder = args.audio_dir or _wesnoth_dir()
        return corpus.from_dir(folder)
    lo, hi = (args.clip, args.clip) if args.clip is not None else (180.0, 240.0)
    try:
        paths = corpus.build(args.corpus_dir, args.format, args.sample_rate, args.channels, lo, hi,
                             args.unique_files, args.seed, workers=os.cpu_count() or 2)  # fmt: skip
    except OSError as exc:  # a read-only corpus missing a file this run needs
        raise UsageError(f"--corpus-dir: cannot write {exc.filename}: {exc.strerror}") from None
    except RuntimeError as exc:  # libsndfile's own "System error" opening the file to write
        raise UsageError(f"--corpus-dir: cannot write in {args.corpus_dir}: {exc}") from None
    return paths, {
        "audio_format": args.format,
        "clip_seconds": args.clip,
        "min_seconds": lo,
        "max_seconds": hi,
        "sample_rate": args.sample_rate,
        "channels": args.channels,
        "unique_files": args.unique_files,
    }


def _checked_modes(args: argparse.Namespace) -> list[str] | None:
    """The modes --modes names, or None once it has said (one line) why they cannot run."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        print(f"popscore bench: unknown modes {sorted(unknown)}", file=sys.stderr)
        return None
    if not modes:
        print(f"popscore bench: --modes names no mode (of: {', '.join(MODES)})", file=sys.stderr)
        return None
    for needs_rate in ("soak", "backfill"):
        if needs_rate in modes and not args.rate and "e2e" not in modes:
            print(f"popscore bench: the {needs_rate} mode needs --rate or the e2e mode",
                  file=sys.stderr)  # fmt: skip
            return None
    return modes


SYNTHETIC_DEFAULTS = {
    "format": "MP3",
    "sample_rate": 44_100,
    "channels": 2,
    "clip": None,
    "unique_files": 8,
}


def _check_source(args: argparse.Namespace) -> None:
    """Real audio is used as it is: a flag describing synthesized audio beside it would be
    ignored, so it is refused; --wesnoth's folder is found before the model loads."""
    if args.wesnoth or args.audio_dir:
        given = [f"--{name.replace('_', '-')}" for name in SYNTHETIC_DEFAULTS
                 if getattr(args, name) is not None]  # fmt: skip
        if given:
            source = "--wesnoth" if args.wesnoth else "--audio-dir"
            raise UsageError(f"{', '.join(given)}: describes synthesized audio; {source} files "
                             "are used as they are")  # fmt: skip
        if args.wesnoth:
            from popscore.bench.corpus import CorpusError

            try:
                args.audio_dir, args.wesnoth = _wesnoth_dir(), False
            except CorpusError as exc:
                raise UsageError(f"--wesnoth: {exc}") from None
    for name, default in SYNTHETIC_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _wesnoth_dir() -> Path:
    import glob

    from popscore.bench.corpus import CorpusError

    found = sorted(glob.glob(WESNOTH_GLOB))
    if not found:
        raise CorpusError(
            f"no {WESNOTH_GLOB}: install Debian's wesnoth-1.16-music, or use --audio-dir"
        )
    return Path(found[-1])


def unique_settings(settings: Settings, run_id: str, mode: str) -> Settings:
    """Topics, group and transactional id of their own for one mode of one run."""
    tag = f"bench-{run_id}-{mode}"
    return settings.model_copy(
        update={
            "input_topic": f"{tag}-in",
            "output_topic": f"{tag}-out",
            "dlq_topic": f"{tag}-dlq",
            "group_id": tag,
            "transactional_id": tag,
            "http_port": 0,
        }
    )


def machine_info() -> dict[str, Any]:
    """CPU model and count, Python and torch versions."""
    import torch

    from popscore.bench.stats import cpu_model, reset_peak_rss

    return {
        "cpu_model": cpu_model(platform.processor()),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # False: the kernel's high-water mark could not be reset, so every mode's peak RSS
        # is the process's peak so far.
        "peak_rss_per_mode": reset_peak_rss(),
    }
