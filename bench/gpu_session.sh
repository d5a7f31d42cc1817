#!/usr/bin/env bash
# Every GPU figure the open issues wait for, as the one command a device session runs: the GPU
# check (bench/gpu_check.sh: parity TF32 off/on, clips/s, first-call latency, peak memory, the
# service's Scorer) and the training check (bench/gpu_train_check.sh: float32 vs mixed
# precision). Installs the carried wheels first (bench/gpu_wheels.sh, run here beforehand).
# Writes under $OUT (the device tool's folder; else bench/results) and exits non-zero when
# either check failed. About 9 minutes at most on an H200:
#   bench/gpu_wheels.sh                                           # here, once
#   run(command="bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#   GPU_SESSION_SMOKE=1 bench/gpu_session.sh      # both on CPU, small, into a temporary folder
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${GPU_SESSION_SMOKE:-} ]]; then OUT=${OUT:-$(mktemp -d)}; else OUT=${OUT:-bench/results}; fi
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [[ -d .whl && -z ${GPU_SESSION_SMOKE:-} ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu session: the carried wheels did not install"; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -n ${GPU_SESSION_SMOKE:-} ]]; then
  check=(--device cpu --max-batch 8 --seconds 0.2 --budget-s 120)
  train=(--device cpu --tracks 64 --epochs 1 --workers 2 --loaders 1)
else
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  check=(--budget-s 360)
  train=()
fi
started=$SECONDS
timeout 390 bench/gpu_check.sh --out "$OUT" "${check[@]}" 2>&1 | tee "$OUT/gpu-session-check.log"
check_rc=${PIPESTATUS[0]}
timeout 170 bench/gpu_train_check.sh --out "$OUT" "${train[@]}" 2>&1 | tee "$OUT/gpu-session-train.log"
train_rc=${PIPESTATUS[0]}
echo "gpu session: gpu_check exit $check_rc, gpu_train_check exit $train_rc, $((SECONDS - started)) s"
((check_rc == 0 && train_rc == 0))
