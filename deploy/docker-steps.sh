#!/usr/bin/env bash
# Runs the Dockerfile's install steps without a Docker engine: the same files copied into a
# build folder, the same `pip wheel`, a clean venv with the same torch pin (from PyPI here:
# download.pytorch.org is out of reach), the same wheel install, then the image's entrypoint
# from outside the repo. tests/unit/test_dockerfile.py keeps the Dockerfile and this in step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
# The clean venv holds a second torch (~5.5 GB with its CUDA libraries): say so up front
# instead of failing half-way with ENOSPC.
need_kb=$((6 * 1024 * 1024))
free_kb=$(df -Pk "$work" | awk 'NR == 2 {print $4}')
if [ "$free_kb" -lt "$need_kb" ]; then
  echo "docker steps: need 6 GB free under $(dirname "$work"), have $((free_kb / 1024 / 1024)) GB" >&2
  rm -rf "$work"
  exit 1
fi
trap 'rm -rf "$work"' EXIT
py=${PYTHON:-python3}
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' "$root/Dockerfile")

mkdir -p "$work/src" "$work/wheels"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
# The build stage's `COPY SRC DEST` lines (a folder, or a glob of files), copied the same way.
sed -n '/ AS build$/,/ AS runtime$/ s|^COPY \([^- ][^ ]*\) \([^ ]*/\)$|\1 \2|p' "$root/Dockerfile" |
  while read -r src dest; do
    mkdir -p "$work/src/$dest"
    if [[ $src == */ ]]; then
      cp -r "$root/$src." "$work/src/$dest"
    else
      cp $root/$src "$work/src/$dest"  # unquoted: the glob expands as COPY's does
    fi
  done
(cd "$work/src" && "$py" -m pip wheel -q --no-cache-dir --disable-pip-version-check --no-deps \
  --wheel-dir "$work/wheels" .)

"$py" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check \
  "torch==$torch_version" "torchaudio==$torch_version"
"$work/venv/bin/pip" install -q --disable-pip-version-check "$work"/wheels/popscore-*.whl

# The image's entrypoint, from a folder that is not the repo: only the wheel's code is used.
cd "$work"
"$work/venv/bin/popscore" --help >/dev/null
# The benchmark is left out: `popscore bench` says so in one line and exits 2.
if "$work/venv/bin/python" -c "import popscore.bench" 2>/dev/null; then
  echo "docker steps: popscore.bench is in the image" >&2
  exit 1
fi
set +e
"$work/venv/bin/popscore" bench --events 1 2>"$work/bench.err"
code=$?
set -e
if [ "$code" -ne 2 ] || ! grep -q "not in this install" "$work/bench.err"; then
  echo "docker steps: popscore bench in the image: exit $code, $(cat "$work/bench.err")" >&2
  exit 1
fi
"$work/venv/bin/python" - "$root/models/demo.pt" <<'PY'
import subprocess, sys, numpy as np, soundfile as sf
sf.write("probe.wav", (0.3 * np.sin(np.arange(66150) / 10)).astype(np.float32), 22050)
out = subprocess.run([sys.prefix + "/bin/popscore", "score", "probe.wav", "--model", sys.argv[1],
                      "--device", "cpu"], check=True, capture_output=True, text=True).stdout
assert '"popularity"' in out, out
PY
echo "docker steps: wheel built, clean install of torch $torch_version + popscore (no benchmark), entrypoint scored a file"
