#!/usr/bin/env bash
# GPU training check (popscore/bench/gpu_train.py): one synthetic catalog prepared once, then
# streamed in float32 and in mixed precision (what `popscore train` uses on CUDA) from one seed:
# losses, clips/s, peak GPU memory; PASS when mixed precision ends within 10 % of float32.
# Needs what training imports besides torch and torchaudio (docs/MODEL.md lists the wheels).
#   bench/gpu_train_check.sh --out bench/results                   # on a GPU machine
#   bench/gpu_train_check.sh --device cpu --tracks 64 --epochs 1   # CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" -m popscore.bench.gpu_train "$@"
