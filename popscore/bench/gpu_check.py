"""GPU check of the artifact with only torch, torchaudio and numpy (no popscore install needed).

    python -m popscore.bench.gpu_check [--model models/demo.pt] [--device cuda|cpu] [--out DIR]

1. parity: frontend and full model on CPU vs the device, same random inputs (max abs diff);
2. throughput: frontend + model clips/s at batch 1..256, fp32 and bf16/fp16 autocast;
3. host→device copy of one batch: pinned vs pageable, float32 vs int16 (converted on device);
4. the saturating batch size: the smallest batch within 10 % of the best fp32 clips/s;
5. the service's own device stage (consumer.device.Scorer, consumer.resample.BatchResampler;
   they and popscore.artifact import only torch/torchaudio/numpy): CPU vs device parity with
   missing features and an audio-less row, and events/s per batch size with the resample on the
   pool or the device.
Writes gpu-check-<device>.json to --out (default: $OUT, else bench/results). --device cpu is a
smoke test.
"""

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from consumer.device import Scorer
from consumer.resample import BatchResampler, Clip, Resampler
from popscore.artifact import ArtifactMeta, load

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(
    batch: int, samples: int, n_features: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    wave = (torch.rand(batch, samples, generator=gen) * 2 - 1) * 0.5
    feats = torch.rand(batch, n_features, generator=gen) * 10
    mask = torch.ones(batch, dtype=torch.bool)
    return wave.to(device), feats.to(device), mask.to(device)


def parity(model_path: Path, device: torch.device, samples: int, nf: int) -> dict[str, Any]:
    on_cpu, on_device = load(model_path, "cpu"), load(model_path, device)
    wave, feats, mask = inputs(8, samples, nf, torch.device("cpu"), seed=1)
    with torch.inference_mode():
        ref_pop, ref_hit = on_cpu.module(wave, feats, mask)
        pop, hit = on_device.module(wave.to(device), feats.to(device), mask.to(device))
        out = {
            "popularity_max_abs_diff": float((pop.cpu() - ref_pop).abs().max()),
            "hit_logit_max_abs_diff": float((hit.cpu() - ref_hit).abs().max()),
        }
        if on_cpu.staged is None or on_device.staged is None or not on_cpu.uses_audio:
            return out  # no frontend to compare apart
        ref_mel = on_cpu.staged.spectrogram(wave)
        mel = on_device.staged.spectrogram(wave.to(device)).cpu()
    return {
        "frontend_max_abs_diff": float((mel - ref_mel).abs().max()),
        "frontend_max_rel_diff": float(
            ((mel - ref_mel).abs() / ref_mel.abs().clamp_min(1e-3)).max()
        ),
        **out,
    }


def throughput(
    module: Any,
    device: torch.device,
    samples: int,
    nf: int,
    batches: list[int],
    dtype: str,
    seconds: float,
) -> list[dict[str, Any]]:
    out = []
    amp = dtype != "fp32"
    amp_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    for batch in batches:
        wave, feats, mask = inputs(batch, samples, nf, device)
        with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=amp):
            step = partial(module, wave, feats, mask)
            row = _measured(step, seconds, device, {"batch": batch, "dtype": dtype}, "clips_per_s")
        out.append(row)
        if "clips_per_s" in row:
            print(f"  {dtype} batch {batch:>4}: {row['clips_per_s']:10.1f} clips/s", flush=True)
    return out


def copies(device: torch.device, batch: int, samples: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch, "samples": samples}
    for name, dtype in (("float32", torch.float32), ("int16", torch.int16)):
        host = torch.zeros(batch, samples, dtype=dtype)
        for pinned in (False, True):
            if pinned and device.type != "cuda":
                continue
            src = host.pin_memory() if pinned else host
            src.to(device, non_blocking=pinned)
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                moved = src.to(device, non_blocking=pinned)
                if dtype == torch.int16:
                    moved = moved.float() / 32768.0
            sync(device)
            ms = (time.perf_counter() - start) / repeats * 1e3
            key = f"{name}_{'pinned' if pinned else 'pageable'}_ms"
            out[key] = round(ms, 3)
            out[key.replace("_ms", "_gb_per_s")] = round(
                src.numel() * src.element_size() / ms / 1e6, 2
            )
    return out


def resample(device: torch.device, batch: int, seconds: float, repeats: int) -> dict[str, Any]:
    """44.1 -> 22.05 kHz of `batch` windows: batched on `device` (POPSCORE_RESAMPLE_ON=device)
    vs one item at a time on one CPU thread (the decode pool's way), ms per batch."""
    source = round(44_100 * seconds)
    host = 0.1 * torch.randn(batch, source)
    out: dict[str, Any] = {"batch": batch, "source_rate": 44_100, "target_rate": 22_050}
    kernel = torchaudio.transforms.Resample(44_100, 22_050).to(device)
    moved = host.to(device)
    with torch.inference_mode():
        kernel(moved)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            kernel(host.to(device))  # the copy of the 44.1 kHz batch is part of the cost
        sync(device)
        out["device_batched_ms"] = round((time.perf_counter() - start) / repeats * 1e3, 3)
        cpu_kernel, threads = (
            torchaudio.transforms.Resample(44_100, 22_050),
            torch.get_num_threads(),
        )
        torch.set_num_threads(1)
        cpu_kernel(host[0])
        start = time.perf_counter()
        for row in host:
            cpu_kernel(row)
        out["cpu_per_item_one_thread_ms"] = round((time.perf_counter() - start) * 1e3, 3)
        torch.set_num_threads(threads)
    return out


SOURCE_RATES = (44_100, 48_000, 22_050)


def service_inputs(
    batch: int, meta: ArtifactMeta, rates: tuple[int, ...] = (44_100,), seed: int = 0
) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Decoded windows as the decode pool hands them over (consumer.resample.Clip at their
    source rates; every fourth one 10 s long), features with NaNs, the last row audio-less."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(batch):
        rate = rates[i % len(rates)]
        seconds = 10.0 if i % 4 == 3 else meta.clip_seconds
        samples = (0.1 * rng.standard_normal(round(rate * seconds))).astype(np.float32)
        clips.append(Clip(samples, rate, seconds))
    features = (rng.random((batch, len(meta.features))) * 10).astype(np.float32)
    features[::3, 0] = np.nan  # missing values: the artifact imputes them
    mask = np.ones(batch, dtype=bool)
    mask[-1] = batch == 1  # an event whose audio could not be fetched scores on features only
    return clips, features, mask


def service_parity(model_path: Path, device: torch.device, meta: ArtifactMeta) -> dict[str, Any]:
    """The serving path on CPU (per-item resample, Scorer) vs on the device (BatchResampler,
    Scorer), with mixed source rates, short clips, NaN features and an audio-less row."""
    threads = torch.get_num_threads()  # Scorer("cpu") sets the serving thread count
    clips, features, mask = service_inputs(8, meta, SOURCE_RATES, seed=2)
    rate, seconds = meta.sample_rate, meta.clip_seconds
    per_item = np.stack([Resampler(rate, seconds)(clip) for clip in clips])
    batched = BatchResampler(rate, seconds, device)(clips)
    cpu = Scorer(model_path, "cpu").score(per_item, features, mask)
    dev = Scorer(model_path, str(device)).score(batched, features, mask)
    torch.set_num_threads(threads)
    return {
        "resample_max_abs_diff": float(np.abs(batched.cpu().numpy() - per_item).max()),
        "popularity_max_abs_diff": float(np.abs(dev.popularity - cpu.popularity).max()),
        "hit_probability_max_abs_diff": float(
            np.abs(dev.hit_probability - cpu.hit_probability).max()
        ),
        "all_finite": bool(
            np.isfinite(dev.popularity).all() and np.isfinite(dev.hit_probability).all()
        ),
        "device_frontend_s": dev.frontend_s,
    }


def service_throughput(
    model_path: Path, device: torch.device, meta: ArtifactMeta, batches: list[int], seconds: float
) -> list[dict[str, Any]]:
    """The service's device stage per batch: Scorer.score on host windows already resampled by
    the decode pool (POPSCORE_RESAMPLE_ON=pool), or BatchResampler + Scorer.score on the 44.1 kHz
    windows (device) -- copies, frontend, network and scores back to the host included."""
    threads = torch.get_num_threads()
    scorer = Scorer(model_path, str(device))
    rate, clip_s = meta.sample_rate, meta.clip_seconds
    batch_resampler = BatchResampler(rate, clip_s, device)
    out: list[dict[str, Any]] = []
    for batch in batches:
        out += _service_batch(scorer, batch_resampler, batch, meta, seconds)
    torch.set_num_threads(threads)
    return out


def _service_batch(
    scorer: Scorer,
    batch_resampler: BatchResampler,
    batch: int,
    meta: ArtifactMeta,
    seconds: float,
) -> list[dict[str, Any]]:
    clips, features, mask = service_inputs(batch, meta)
    host = np.stack(
        [Resampler(scorer.meta.sample_rate, scorer.meta.clip_seconds)(c) for c in clips]
    )
    steps = {
        "pool": lambda: scorer.score(host, features, mask),
        "device": lambda: scorer.score(batch_resampler(clips), features, mask),
    }
    rows: list[dict[str, Any]] = []
    for mode, step in steps.items():
        head = {"batch": batch, "resample_on": mode}
        row = _measured(step, seconds, scorer.device, head, "events_per_s")
        rows.append(row)
        if "events_per_s" in row:
            print(f"  service resample={mode:<6} batch {batch:>4}: {row['events_per_s']:9.1f} ev/s")
    return rows


def _measured(
    step: Any, seconds: float, device: torch.device, head: dict[str, Any], rate_key: str
) -> dict[str, Any]:
    """``head`` plus items per second under ``rate_key`` and ms per batch, or plus the error
    that stopped the measurement (an out-of-memory batch size is a result, not a crash)."""
    try:
        runs, elapsed = _timed(step, seconds, device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**head, "error": str(exc).splitlines()[0][:200]}
    return {
        **head,
        rate_key: round(head["batch"] * runs / elapsed, 2),
        "ms_per_batch": round(elapsed / runs * 1e3, 3),
    }


def _timed(step: Any, seconds: float, device: torch.device) -> tuple[int, float]:
    """(runs, seconds) of ``step`` for at least ``seconds`` and 3 runs, after 3 warm-up calls
    (TorchScript's profiling executor optimises on early calls); the device is synchronised
    before and after, as its kernels run asynchronously."""
    for _ in range(3):
        step()
    sync(device)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        step()
        runs += 1
    sync(device)
    return runs, time.perf_counter() - start


def saturating(rows: list[dict[str, Any]]) -> int | None:
    ok = [r for r in rows if "clips_per_s" in r]
    if not ok:
        return None
    best = max(r["clips_per_s"] for r in ok)
    return int(min(r["batch"] for r in ok if r["clips_per_s"] >= 0.9 * best))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo.pt"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per point")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr
        )
        return 2
    artifact = load(args.model, device)
    module, meta = artifact.module, artifact.meta
    samples = meta.clip_samples
    nf = len(meta.features)
    batches = [b for b in BATCHES if b <= args.max_batch]
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "host_cpu": cpu_name(),
        "host_cores": len(os.sched_getaffinity(0)),
        "model_version": meta.model_version,
        "clip_samples": samples,
    }
    half = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    service_batches = [b for b in batches if b >= 8] or batches
    small = min(32, args.max_batch)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("parity", lambda: parity(args.model, device, samples, nf)),
        (
            "throughput_fp32",
            lambda: throughput(module, device, samples, nf, batches, "fp32", args.seconds),
        ),
        (
            f"throughput_{half}",
            lambda: throughput(module, device, samples, nf, batches, half, args.seconds),
        ),
        ("h2d_copy", lambda: copies(device, small, samples, 20)),
        ("resample", lambda: resample(device, small, meta.clip_seconds, 5)),
        ("service_parity", lambda: service_parity(args.model, device, meta)),
        (
            "service",
            lambda: service_throughput(args.model, device, meta, service_batches, args.seconds),
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"gpu-check-{device.type}.json"
    failed = 0
    for name, run in sections:
        print(name, flush=True)
        try:
            doc[name] = run()
        except Exception as exc:  # one failing section must not cost the others' numbers
            traceback.print_exc()
            doc[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            failed += 1
        if isinstance(doc[name], dict):
            print(" ", doc[name], flush=True)
        if name.startswith("throughput_") and isinstance(doc[name], list):
            doc[f"saturating_batch_{name.split('_', 1)[1]}"] = saturating(doc[name])
        # Written after every section: the one GPU run a task gets keeps what it measured.
        target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {target}" + (f" ({failed} section(s) failed)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
