"""GPU training check: mixed precision on CUDA, the way `popscore train` runs it.

One synthetic catalog is prepared once (the service's decode path, `popscore.training.cache`),
then streamed from its cache for ``--epochs`` epochs twice from the same seed, after an untimed
warm-up epoch in each precision: in float32 (TF32 off: the reference), and with mixed precision
(float16 autocast and gradient scaling, `Stream.amp`, on by default on CUDA). Per run: the loss
of every epoch, clips/s and peak GPU memory. PASS when every loss is finite, mixed precision's
last loss is within ``--loss-tolerance`` (relative, default 10 %) of float32's — about twice the
seed-to-seed spread of the final loss measured on CPU (sd 4.4 % at 4,000 tracks,
docs/MODEL.md), as float16's rounding changes a run about as much as another seed does — and
its loss drops over the epochs by at least half as much as float32's. Output under ``--out``:
``gpu-train-<device>.json`` and the console's lines in ``gpu-train-<device>.log``; exit 0 only
on PASS.

    bench/gpu_train_check.sh --out bench/results                   # on a GPU machine
    bench/gpu_train_check.sh --device cpu --tracks 64 --epochs 1   # CPU smoke: both float32

Needs what training imports, not only torch: soundfile, soxr, pyarrow, pydantic, boto3 and
confluent-kafka among others (docs/MODEL.md, "Training at catalog scale").
"""

import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consumer.audio import AudioPolicy
from popscore.bench.gpu_check import tf32
from popscore.bench.training import RATE, SECONDS, make_catalog, make_sources
from popscore.training.cache import prepare, read_table
from popscore.training.data import PAPER_FEATURES
from popscore.training.evaluate import FUSION
from popscore.training.stream import CachedClips, Stream, train_stream

CROP_SECONDS = 6.0


def catalog_clips(work: Path, tracks: int, unique: int, workers: int) -> CachedClips:
    """``tracks`` rows over ``unique`` synthetic 30 s FLAC files, prepared into a cache."""
    sources = make_sources(work / "sources", unique, seed=0)
    catalog = work / f"catalog-{tracks}-of-{unique}.parquet"
    if not catalog.exists():  # rewritten, it would no longer match its prepared cache
        make_catalog(catalog, tracks, sources)
    cache = work / f"cache-{tracks}-of-{unique}"
    policy = AudioPolicy.create((work,))
    prepare(catalog, "audio", cache, policy, PAPER_FEATURES, RATE, SECONDS, workers=workers,
            progress=False)  # fmt: skip
    table = read_table(cache)
    return CachedClips(cache, table, np.arange(len(table.rows)), round(CROP_SECONDS * RATE), True)


def one_run(
    clips: CachedClips, epochs: int, device: torch.device, amp: bool, loaders: int
) -> dict[str, Any]:
    """Train a fresh FUSION net from seed 0; its losses, speed and peak GPU memory."""
    torch.manual_seed(0)
    net = FUSION.build(PAPER_FEATURES, RATE, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    config = replace(FUSION.config, epochs=epochs)
    # The float32 run is the reference: without TF32, which cuDNN's convolutions use by default.
    with tf32(amp):
        losses = train_stream(net, clips, config, Stream(workers=loaders, amp=amp), device, False)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "mixed_precision": amp and device.type == "cuda",
        "losses": [round(x, 5) for x in losses],
        "seconds": round(seconds, 2),
        "clips_per_s": round(len(clips) * epochs / seconds, 1),
        "peak_gpu_allocated_mb": None if peak is None else round(peak, 1),
    }


def verdict(fp32: dict[str, Any], amp: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """PASS when every loss is finite, the mixed-precision run ends within ``tolerance``
    (relative) of the float32 run, and it learns at least half as much over the epochs (the
    gap alone would let a run that barely learns pass when float32 learns little too)."""
    finite = all(math.isfinite(x) for x in fp32["losses"] + amp["losses"])
    last, ref = amp["losses"][-1], fp32["losses"][-1]
    gap = abs(last - ref) / max(abs(ref), 1e-12)
    learned = fp32["losses"][0] - ref, amp["losses"][0] - last
    learns = learned[0] <= 0 or learned[1] >= 0.5 * learned[0]
    return {
        "all_finite": finite,
        "final_loss_relative_gap": round(gap, 4),
        "tolerance": tolerance,
        "loss_drop": {"fp32": round(learned[0], 5), "amp": round(learned[1], 5)},
        "pass": finite and gap <= tolerance and learns,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m popscore.bench.gpu_train")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tracks", type=int, default=1024)
    parser.add_argument("--unique", type=int, default=64, help="distinct source files")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="decode processes (prepare)")
    parser.add_argument("--loaders", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--loss-tolerance", type=float, default=0.10)
    parser.add_argument("--work", type=Path, default=Path(".bench/gpu-train"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (--device cpu for a smoke test)")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # A MIG slice's name has dots ("1g.5gb"), others may have slashes: neither in a file name.
    stem = str(args.out / f"gpu-train-{re.sub(r'[^A-Za-z0-9_-]+', '-', name)}")
    with open(stem + ".log", "w", buffering=1) as log:

        def say(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")

        say(f"device {name}, torch {torch.__version__}, {args.tracks} tracks, {args.epochs} epochs")
        started = time.perf_counter()
        clips = catalog_clips(args.work.resolve(), args.tracks, args.unique, args.workers)
        say(f"prepared {len(clips)} clips in {time.perf_counter() - started:.1f} s")
        # Untimed: CUDA's context, cuDNN's autotuning and the DataLoader's first workers would
        # otherwise all land in the first timed run.
        for amp in (False, True):
            one_run(clips, 1, device, amp, args.loaders)
        runs = {}
        for amp in (False, True):
            runs["amp" if amp else "fp32"] = run = one_run(
                clips, args.epochs, device, amp, args.loaders
            )
            say(f"{'mixed precision' if run['mixed_precision'] else 'float32'}: {run}")
        result = verdict(runs["fp32"], runs["amp"], args.loss_tolerance)
        report = {
            "device": name,
            "torch": torch.__version__,
            "tracks": len(clips),
            "epochs": args.epochs,
            "crop_seconds": CROP_SECONDS,
            "fp32_without_tf32": True,
            **runs,
            "verdict": result,
        }
        Path(stem + ".json").write_text(json.dumps(report, indent=1) + "\n")
        say(f"{'PASS' if result['pass'] else 'FAIL'}: {result}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
