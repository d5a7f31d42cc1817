# syntax=docker/dockerfile:1
# popscore: build the wheel, then install it into a slim runtime with the chosen torch build.
#   docker build -t popscore:cpu .
#   docker build --build-arg TORCH_VARIANT=cu130 -t popscore:cu130 .   # GPU nodes (CUDA 13.0)
# The torch pin below must equal pyproject.toml's (tests/unit/test_dockerfile.py checks it).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY consumer/ consumer/
# The command, the artifact format and the trainer (the demo's producer synthesizes with it);
# not the benchmark, popscore/bench/, which `popscore bench` then says is not installed.
COPY popscore/*.py popscore/
COPY popscore/cli/ popscore/cli/
COPY popscore/artifact/ popscore/artifact/
COPY popscore/training/ popscore/training/
# Only popscore's own wheel: the runtime stage resolves its dependencies.
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
# cpu | cu130 (any suffix of https://download.pytorch.org/whl/ that has torch 2.11.0).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.11.0
# MALLOC_ARENA_MAX=2: glibc's per-thread arenas ratchet RSS up under the decode and stage
# threads; two keep it flat (docs/PERFORMANCE.md, "Memory").
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The torch build comes from PyTorch's index for the variant; everything else from PyPI.
# soundfile's manylinux wheel bundles libsndfile (MP3/FLAC/OGG), so no apt packages are needed.
COPY --from=build /wheels/popscore-*.whl /tmp/wheels/
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}" \
 && pip install /tmp/wheels/popscore-*.whl \
 && rm -rf /tmp/wheels

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it. /data/audio is where the
# compose demo's shared audio volume is mounted (a fresh named volume takes this ownership).
RUN useradd --system --no-log-init --create-home --home-dir /app --uid 10001 --user-group popscore \
 && mkdir -p /app/models /data/audio \
 && chown 10001:10001 /data/audio
WORKDIR /app
# Root-owned and read-only: the service reads its models, never writes them.
COPY --chmod=0444 models/demo.pt models/paper-features.pt /app/models/
USER 10001:10001

ENV POPSCORE_MODEL=/app/models/demo.pt \
    POPSCORE_HTTP_PORT=9400
EXPOSE 9400
# Liveness of the main loop (docs/INTERFACE.md, "HTTP"); slim has no curl, so urllib asks.
# POPSCORE_HTTP_PORT=0 picks a free port the check cannot know: it then passes, saying so.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u; p = os.environ.get('POPSCORE_HTTP_PORT', '9400'); print('POPSCORE_HTTP_PORT=0: no fixed port to check') if p == '0' else u.urlopen('http://127.0.0.1:%s/healthz' % p, timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["popscore"]
CMD ["consume"]
