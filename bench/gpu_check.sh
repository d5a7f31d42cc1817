#!/usr/bin/env bash
# GPU check (popscore/bench/gpu_check.py): parity, clips/s at batch 1..256 fp32 + bf16, H2D
# copies, batched resample, and the service's own Scorer + BatchResampler (parity and events/s).
# Needs only python3 with torch, torchaudio and numpy. Output: $OUT (else bench/results).
#   bench/gpu_check.sh                         # on a GPU machine
#   bench/gpu_check.sh --device cpu --max-batch 8 --seconds 0.2   # CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
exec "$PY" -m popscore.bench.gpu_check "$@"
