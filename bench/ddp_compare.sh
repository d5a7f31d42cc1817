#!/usr/bin/env bash
# DDP against one process at the same global batch, at catalog scale (issue 14): for each seed,
# `popscore train` once alone and once as 2 gloo processes under torchrun, on the bench-train
# catalog of 4,000 tracks (make bench-train TRAIN_TRACKS=4000 makes it), then the per-epoch
# losses of both and the spread of the single runs across seeds, as JSON.
#   bench/ddp_compare.sh [OUT.json] [EPOCHS] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/ddp-vs-one-4000-cpu-2core.json}
epochs=${2:-2}
seeds=("${@:3}")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
catalog=.bench/train/catalog-4000.parquet cache=.bench/train/cache-4000 work=.bench/ddp
mkdir -p "$work"
train=(train --data "$catalog" --audio-column audio --cache "$cache" --no-evaluation
       --epochs "$epochs" --workers 1 --device cpu --quiet)
for seed in "${seeds[@]}"; do
  if [ ! -f "$work/one-s$seed.pt.ckpt" ]; then
    OMP_NUM_THREADS=2 .venv/bin/popscore --log-level WARNING "${train[@]}" \
      --out "$work/one-s$seed.pt" --seed "$seed"
  fi
  if [ ! -f "$work/ddp-s$seed.pt.ckpt" ]; then
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node 2 \
      --master-port $((29500 + seed)) -m popscore --log-level WARNING "${train[@]}" \
      --out "$work/ddp-s$seed.pt" --seed "$seed"
  fi
done
.venv/bin/python - "$out" "$work" "${seeds[@]}" <<'PY'
import json, platform, sys
import numpy as np, torch
out, work, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
hist = lambda kind, s: [float(x) for x in torch.load(f"{work}/{kind}-s{s}.pt.ckpt", weights_only=True)["history"]]
one = {s: hist("one", s) for s in seeds}
ddp = {s: hist("ddp", s) for s in seeds}
final_one = np.array([one[s][-1] for s in seeds]); final_ddp = np.array([ddp[s][-1] for s in seeds])
diff = final_ddp - final_one
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
doc = {
    "what": "popscore train on the 4,000-track bench catalog: 1 process at batch 32 vs 2 gloo processes at 16 each (torchrun), same seeds",
    "machine": {"cpu_model": cpu, "cpus": 2, "torch": torch.__version__},
    "loss_per_epoch": {"one": one, "ddp": ddp},
    "final_loss": {"one_mean": round(float(final_one.mean()), 4), "one_sd_across_seeds": round(float(final_one.std(ddof=1)), 4) if len(seeds) > 1 else None,
                   "ddp_mean": round(float(final_ddp.mean()), 4), "ddp_minus_one_per_seed": [round(float(d), 4) for d in diff],
                   "ddp_minus_one_mean": round(float(diff.mean()), 4)},
}
open(out, "w").write(json.dumps(doc, indent=2) + "\n")
print(json.dumps(doc["final_loss"], indent=2))
PY
