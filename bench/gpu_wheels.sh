#!/usr/bin/env bash
# Wheels the GPU machine lacks, for bench/gpu_session.sh: it has python3 3.12 with torch,
# torchaudio, numpy, pandas, pyarrow, scikit-learn, tqdm and httpx, no package registry, and
# takes extra packages only as wheels carried in the working tree (`run` with carry: [".whl"]).
# These are what popscore.bench.gpu_check and popscore.bench.gpu_train import beyond that image
# (docs/MODEL.md), at the versions this checkout's .venv runs. Downloads into .whl/ (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# typing_extensions is in the image, but pydantic needs a recent one: the carried one comes
# first on PYTHONPATH (newer versions only add).
NAMES=(soundfile cffi pycparser soxr pydantic pydantic_core annotated-types typing-inspection
       typing_extensions boto3 botocore s3transfer jmespath confluent-kafka)
pins=()
for name in "${NAMES[@]}"; do
  pins+=("$name==$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
echo "gpu wheels: ${#pins[@]} in .whl ($(du -sh .whl | cut -f1)): ${pins[*]}"
