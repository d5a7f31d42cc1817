"""GPU check of the artifact with only torch, torchaudio and numpy (no popscore install needed).

    python -m popscore.bench.gpu_check [--model models/demo.pt] [--device cuda|cpu] [--out DIR]

1. parity, TF32 off and on: frontend and full model on CPU vs the device, same inputs, compared
   after the warm-up calls (TorchScript's profiling runs done: the fused, optimised graph) and
   on the first call, against the tolerances in TOLERANCES, with a pass/fail flag;
2. first-call latency: a fresh Scorer's first, second and steady calls at batch 1 and 32;
3. throughput: frontend + model clips/s at batch 1..256, fp32 and bf16/fp16 autocast, with the
   peak device memory of each batch size;
4. host→device copy of one batch: pinned vs pageable, float32 vs int16 (converted on device);
5. the saturating batch size: the smallest batch within 10 % of the best fp32 clips/s;
6. the service's own device stage (consumer.device.Scorer, consumer.resample.BatchResampler;
   they and popscore.artifact import only torch/torchaudio/numpy): CPU vs device parity after
   warm-up with missing features and an audio-less row (pass/fail), and events/s per batch size
   with the resample on the pool or the device.
A section that fails on the TorchScript fuser or NVRTC is run again with the fuser off (and so
is every section after it). Writes gpu-check-<device>.json to --out (default: $OUT, else
bench/results) after every section, and the console output, flushed line by line, to
gpu-check-<device>.log beside it. --device cpu is a smoke test. The whole run keeps within
--budget-s (default 480 s): the sweeps stop early, saying so, rather than lose the JSON.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torchaudio

from consumer.device import Scorer
from consumer.resample import BatchResampler, Clip, Resampler
from popscore.artifact import ArtifactMeta, load

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SERVING_BATCH = 32  # POPSCORE_BATCH_SIZE's default
# TorchScript's profiling executor profiles the first call(s) (torch._C._jit_get_num_profiled_runs,
# 1 by default) and runs the optimised, fused graph only after: compare after this many calls.
WARM_UP_CALLS = 3
# Largest CPU↔device difference accepted, per output. Popularity is 0..100 points, the hit
# probability 0..1, the frontend the natural log of mel power. fp32 on both sides differs only
# in summation order and FFT algorithm (≈1e-6 relative): bounds far above that, far below what
# anyone reading a score would notice. TF32 rounds matmul/conv operands to 10 mantissa bits,
# bf16 to 8 (4x coarser): the TF32 bounds are half of what bf16 autocast moved the demo model's
# outputs on CPU (max over 3 batches of 8: popularity 0.16, probability 1.1e-3, frontend
# 8.3e-3), rounded up (docs/PERFORMANCE.md, "GPU check").
TOLERANCES: dict[str, dict[str, float]] = {
    "tf32_off": {"popularity": 0.01, "hit_probability": 1e-4, "frontend": 1e-3},
    "tf32_on": {"popularity": 0.1, "hit_probability": 6e-4, "frontend": 5e-3},
}
# What a failing fuser or runtime compiler says (a rerun with the fuser off can avoid it).
FUSER_FAULTS = re.compile(
    r"nvrtc|NVRTC|fuser|[Ff]usion|tensorexpr|TensorExpr|kernel compilation|ptxas|nvJitLink"
    r"|CUDA_ERROR_INVALID_PTX|jit_utils"
)


class Budget:
    """The run's time limit: sweeps stop early instead of running the GPU lease out."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last reset_peak: allocated by tensors, and reserved by the
    caching allocator (what the GPU lends the process); empty on CPU."""
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
    }


def inputs(
    batch: int, samples: int, n_features: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    wave = (torch.rand(batch, samples, generator=gen) * 2 - 1) * 0.5
    feats = torch.rand(batch, n_features, generator=gen) * 10
    mask = torch.ones(batch, dtype=torch.bool)
    return wave.to(device), feats.to(device), mask.to(device)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for matmuls and cuDNN convolutions on or off (no effect on CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tf32_state() -> dict[str, bool]:
    """Whether TF32 is on now, for cuDNN convolutions and for matmuls."""
    return {
        "cudnn": torch.backends.cudnn.allow_tf32,
        "matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def _outputs(artifact: Any, args: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The artifact's outputs (and frontend) on ``args``, already on its device, to the host."""
    pop, hit = artifact.module(*args)
    out = {"popularity": pop, "hit_probability": torch.sigmoid(hit)}
    if artifact.staged is not None and artifact.uses_audio:
        out["frontend"] = artifact.staged.spectrogram(args[0])
    return {k: v.float().cpu() for k, v in out.items()}


def _diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"{k}_max_abs_diff": float((a[k] - b[k]).abs().max()) for k in a}


def _judged(diffs: dict[str, float], limits: dict[str, float]) -> dict[str, Any]:
    checked = {k: v for k, v in limits.items() if f"{k}_max_abs_diff" in diffs}
    failed = [k for k, limit in checked.items() if not diffs[f"{k}_max_abs_diff"] <= limit]
    return {"tolerance": checked, "pass": not failed, "failed": failed}


def parity(model_path: Path, device: torch.device, samples: int, nf: int, tf32_on: bool) -> Any:
    """CPU vs ``device`` on the same 8 inputs, each side freshly loaded: on the first call and
    after WARM_UP_CALLS (the optimised graph), the latter judged against TOLERANCES."""
    wave, feats, mask = inputs(8, samples, nf, torch.device("cpu"), seed=1)
    with tf32(tf32_on), torch.inference_mode():
        on_cpu, on_device = load(model_path, "cpu"), load(model_path, device)
        cpu_args = (wave, feats, mask)
        dev_args = tuple(a.to(device) for a in cpu_args)
        sync(device)
        t0 = time.perf_counter()
        first_dev = _outputs(on_device, dev_args)
        first_s = time.perf_counter() - t0
        first_cpu = _outputs(on_cpu, cpu_args)
        for _ in range(WARM_UP_CALLS - 1):
            _outputs(on_cpu, cpu_args), _outputs(on_device, dev_args)
        warm = _diffs(_outputs(on_cpu, cpu_args), _outputs(on_device, dev_args))
    limits = TOLERANCES["tf32_on" if tf32_on else "tf32_off"]
    return {
        "tf32": tf32_on,
        "warm_up_calls": WARM_UP_CALLS,
        "after_warm_up": warm,
        "first_call": _diffs(first_cpu, first_dev),
        "first_call_s": round(first_s, 4),
        **_judged(warm, limits),
    }


def first_call(model_path: Path, device: torch.device, batches: list[int]) -> list[dict[str, Any]]:
    """A fresh Scorer per batch size: load, the first call (profiling, the fuser's compile, the
    allocator's first blocks), the second, and the steady median of five."""
    rows = []
    for batch in batches:
        t0 = time.perf_counter()
        scorer = Scorer(model_path, str(device))
        load_s = time.perf_counter() - t0
        calls = [scorer.warm_up(batch, rounds=1) for _ in range(2 + 5)]
        rows.append({
            "batch": batch,
            "load_s": round(load_s, 4),
            "first_call_s": round(calls[0], 4),
            "second_call_s": round(calls[1], 4),
            "steady_call_s": round(float(np.median(calls[2:])), 4),
        })  # fmt: skip
        print(f"  first call batch {batch}: {rows[-1]}", flush=True)
    return rows


def throughput(
    model_path: Path,
    device: torch.device,
    samples: int,
    nf: int,
    batches: list[int],
    dtype: str,
    seconds: float,
    budget: Budget,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    module = load(model_path, device).module
    amp = dtype != "fp32"
    amp_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    for batch in batches:
        if budget.left() < 4 * seconds + 60:  # keep time for the sections after
            out.append({"batch": batch, "dtype": dtype, "skipped": "time budget"})
            continue
        reset_peak(device)
        wave, feats, mask = inputs(batch, samples, nf, device)
        with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=amp):
            step = partial(module, wave, feats, mask)
            row = _measured(step, seconds, device, {"batch": batch, "dtype": dtype}, "clips_per_s")
        out.append({**row, **peak_mb(device)})
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
    Scorer), both warmed up at the batch shape first (as the service does at start), with mixed
    source rates, short clips, NaN features and an audio-less row; judged against TOLERANCES
    for the TF32 setting torch has now (cuDNN convolutions: on by default)."""
    threads = torch.get_num_threads()  # Scorer("cpu") sets the serving thread count
    clips, features, mask = service_inputs(8, meta, SOURCE_RATES, seed=2)
    rate, seconds = meta.sample_rate, meta.clip_seconds
    per_item = np.stack([Resampler(rate, seconds)(clip) for clip in clips])
    batched = BatchResampler(rate, seconds, device)(clips)
    # The CPU side as saved: the optimised CPU module is held to the saved one apart (its
    # probe), so its own small differences are not stacked onto the device's here.
    cpu_scorer = Scorer(model_path, "cpu", optimize=False)
    dev_scorer = Scorer(model_path, str(device))
    for scorer in (cpu_scorer, dev_scorer):
        scorer.warm_up(len(clips), rounds=WARM_UP_CALLS)
    cpu = cpu_scorer.score(per_item, features, mask)
    dev = dev_scorer.score(batched, features, mask)
    torch.set_num_threads(threads)
    tf32_now = device.type == "cuda" and any(tf32_state().values())
    diffs = {
        "popularity_max_abs_diff": float(np.abs(dev.popularity - cpu.popularity).max()),
        "hit_probability_max_abs_diff": float(
            np.abs(dev.hit_probability - cpu.hit_probability).max()
        ),
    }
    return {
        "resample_max_abs_diff": float(np.abs(batched.cpu().numpy() - per_item).max()),
        **diffs,
        "all_finite": bool(
            np.isfinite(dev.popularity).all() and np.isfinite(dev.hit_probability).all()
        ),
        "device_frontend_s": dev.frontend_s,
        "tf32": tf32_state(),
        **_judged(diffs, TOLERANCES["tf32_on" if tf32_now else "tf32_off"]),
    }


def service_throughput(
    model_path: Path,
    device: torch.device,
    meta: ArtifactMeta,
    batches: list[int],
    seconds: float,
    budget: Budget,
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
        if budget.left() < 8 * seconds + 20:
            out.append({"batch": batch, "skipped": "time budget"})
            continue
        reset_peak(device)
        rows = _service_batch(scorer, batch_resampler, batch, meta, seconds)
        out += [{**row, **peak_mb(device)} for row in rows]
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


class _Tee:
    """Console output also into the log file, flushed at every write: what a run printed
    survives a lease that ends mid-run."""

    def __init__(self, console: TextIO, log: TextIO) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        self.console.flush()
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo.pt"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results"))
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per point")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's limit")
    return parser


def _header(device: torch.device, meta: ArtifactMeta) -> dict[str, Any]:
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    torch.zeros(1, device=device)  # CUDA's context: its cost is not any section's
    sync(device)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,  # type: ignore[no-untyped-call]
        "host_cpu": cpu_name(),
        "host_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "model_version": meta.model_version,
        "clip_samples": meta.clip_samples,
        "context_init_s": round(time.perf_counter() - t0, 3),
        "tf32_default": tf32_state(),
        "tolerances": TOLERANCES,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _sections(
    args: argparse.Namespace, device: torch.device, meta: ArtifactMeta, budget: Budget
) -> list[tuple[str, Callable[[], Any]]]:
    """In order of what the one GPU run must not miss: parity, first call, throughput."""
    samples, nf, model = meta.clip_samples, len(meta.features), args.model
    batches = [b for b in BATCHES if b <= args.max_batch]
    half = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    service_batches = [b for b in batches if b >= 8] or batches
    small = min(SERVING_BATCH, args.max_batch)
    secs = args.seconds
    return [
        ("parity_tf32_off", lambda: parity(model, device, samples, nf, tf32_on=False)),
        ("parity_tf32_on", lambda: parity(model, device, samples, nf, tf32_on=True)),
        ("service_parity", lambda: service_parity(model, device, meta)),
        ("first_call", lambda: first_call(model, device, sorted({1, small}))),
        ("throughput_fp32",
         lambda: throughput(model, device, samples, nf, batches, "fp32", secs, budget)),
        (f"throughput_{half}",
         lambda: throughput(model, device, samples, nf, batches, half, secs, budget)),
        ("h2d_copy", lambda: copies(device, small, samples, 20)),
        ("resample", lambda: resample(device, small, meta.clip_seconds, 5)),
        ("service",
         lambda: service_throughput(model, device, meta, service_batches, secs, budget)),
    ]  # fmt: skip


class Fuser:
    """Whether the TorchScript fuser is still on; ``turn_off`` keeps it off until the run ends."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.off = False

    def turn_off(self) -> None:
        self.stack.enter_context(torch.jit.fuser("none"))  # type: ignore[attr-defined]
        self.off = True


def _run_section(
    name: str, run: Callable[[], Any], device: torch.device, fuser: Fuser
) -> tuple[Any, bool]:
    """(result, failed). A failure the fuser or NVRTC caused is run again with the fuser off,
    which then stays off for the rest of the run."""
    reset_peak(device)
    try:
        return run(), False
    except Exception as exc:  # one failing section must not cost the others' numbers
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"[:500]
    if not FUSER_FAULTS.search(error) or fuser.off:
        return {"error": error}, True
    print(f"  {name}: the fuser or NVRTC failed; again with the TorchScript fuser off", flush=True)
    fuser.turn_off()
    reset_peak(device)
    try:
        result = run()
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:500], "fuser_error": error}, True
    return {"fuser_off_after": error, "result": result}, False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available (use --device cpu for a smoke test)", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"gpu-check-{device.type}.json"
    with (
        (args.out / f"gpu-check-{device.type}.log").open("w") as log,
        contextlib.redirect_stdout(_Tee(sys.stdout, log)),
        contextlib.redirect_stderr(_Tee(sys.stderr, log)),
        contextlib.ExitStack() as stack,
    ):
        return _run_all(args, device, target, Fuser(stack))


def _run_all(args: argparse.Namespace, device: torch.device, target: Path, fuser: Fuser) -> int:
    start = time.perf_counter()
    budget = Budget(args.budget_s)
    meta = load(args.model, "cpu").meta
    doc: dict[str, Any] = _header(device, meta)
    print(json.dumps({k: v for k, v in doc.items() if k != "tolerances"}), flush=True)
    failed: list[str] = []
    peaks: dict[str, Any] = {}
    for name, run in _sections(args, device, meta, budget):
        print(name, flush=True)
        doc[name], broke = _run_section(name, run, device, fuser)
        failed += [name] if broke else []
        if peak := peak_mb(device):
            peaks[name] = peak
        if isinstance(doc[name], dict):
            print(" ", doc[name], flush=True)
        _summarise(doc, name, peaks, start)
        # Written after every section: the one GPU run a task gets keeps what it measured.
        target.write_text(json.dumps(doc, indent=2) + "\n")
    verdict = "PASS" if doc["parity_pass"] and not failed else "FAIL"
    print(f"wrote {target}: parity {'pass' if doc['parity_pass'] else 'FAIL'}"
          + (f", {len(failed)} section(s) failed: {', '.join(failed)}" if failed else "")
          + f"; {verdict} in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return 0 if verdict == "PASS" else 1


def _summarise(doc: dict[str, Any], name: str, peaks: dict[str, Any], start: float) -> None:
    """The run's verdict and figures so far, at the top level of the JSON."""
    if name.startswith("throughput_") and isinstance(doc[name], list):
        doc[f"saturating_batch_{name.split('_', 1)[1]}"] = saturating(doc[name])
    judged = [_unwrapped(doc[k]) for k in ("parity_tf32_off", "parity_tf32_on", "service_parity")
              if k in doc]  # fmt: skip
    doc["parity_pass"] = bool(judged) and all(j.get("pass") is True for j in judged)
    doc["peak_memory_mb_per_section"] = peaks
    doc["fuser_off"] = any("fuser_off_after" in v for v in doc.values() if isinstance(v, dict))
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)


def _unwrapped(section: Any) -> dict[str, Any]:
    """A section's result, also when it ran again with the fuser off."""
    if isinstance(section, dict) and "fuser_off_after" in section:
        return dict(section["result"])
    return section if isinstance(section, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
