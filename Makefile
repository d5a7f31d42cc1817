# popscore — the same commands on a laptop and in CI (.ci/run calls `make test`).
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := models/demo.pt
DEMO_EVENTS ?= 50
DEMO_DIR := .demo

.PHONY: help setup stack-up stack-down redis-cluster-up redis-cluster-down bench-redis bench-resample bench-scaleout s3-up s3-down model demo test test-unit test-integration chaos bench bench-train soak profile lint schemas clean

help: ## list the targets and what each does
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 20

setup: $(STAMP) ## create .venv and install popscore with its dev extras

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

stack-up: ## start local Kafka (127.0.0.1:9092) and Redis (127.0.0.1:6379) unless reachable
	deploy/local/stack-up.sh

stack-down: ## stop what stack-up started
	deploy/local/stack-down.sh

redis-cluster-up: ## start a local Redis Cluster (127.0.0.1:7000-7005, 3 primaries + 3 replicas) unless one is up
	deploy/local/redis-cluster-up.sh

redis-cluster-down: ## stop it and forget it
	deploy/local/redis-cluster-down.sh

s3-up: $(STAMP) ## start a local S3 server (moto, 127.0.0.1:9000) unless one answers; the s3 tests do it themselves
	deploy/local/s3-up.sh

s3-down: ## stop what s3-up started
	deploy/local/s3-down.sh

model: $(STAMP) ## (re)build the demo artifact from synthetic data, reproducible from its seed
	$(BIN)/python -m popscore.training.demo_model --out $(MODEL) --seed 0

$(MODEL):
	$(MAKE) model

demo: $(STAMP) $(MODEL) stack-up ## produce sample releases, score them all, print the table
	export POPSCORE_AUDIO_FILE_ROOTS=$(abspath $(DEMO_DIR))/audio POPSCORE_DEVICE=auto
	start=$$(date +%s%N)
	$(BIN)/popscore produce --synthetic $(DEMO_EVENTS) --seed $$(date +%s) --out-dir $(DEMO_DIR)/audio
	$(BIN)/popscore topics --create > /dev/null
	$(BIN)/popscore --log-level WARNING consume --stop-at-end --report
	echo "demo wall time: $$(( ($$(date +%s%N) - start) / 1000000 )) ms (produce + consume)"

test: $(STAMP) $(MODEL) stack-up ## the whole suite: unit + integration (real Kafka and Redis)
	$(BIN)/pytest -q

test-unit: $(STAMP) ## unit tests only, no services
	$(BIN)/pytest -q tests/unit

test-integration: $(STAMP) $(MODEL) stack-up ## integration tests only, against the real Kafka and Redis
	$(BIN)/pytest -q -m integration

chaos: $(STAMP) $(MODEL) stack-up ## the full chaos suite: 2,000 events per scenario and 2,000 fuzzed records, figures in bench/results/chaos.txt
	mkdir -p bench/results
	echo "# chaos run $$(date -u +%FT%TZ) on $$(nproc) cores" >> bench/results/chaos.txt
	CHAOS_EVENTS=2000 FUZZ_RECORDS=2000 CHAOS_REPORT=bench/results/chaos.txt $(BIN)/pytest -q -s -m chaos

lint: $(STAMP) ## ruff, formatting, mypy, import-linter (imports run one way) and hadolint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo
	$(BIN)/hadolint Dockerfile

BENCH_ARGS ?=
BENCH_JSON ?= bench/results/bench-cpu-$(shell nproc)core.json
bench: $(STAMP) $(MODEL) stack-up ## benchmark: compute ceiling, end to end, naive (~5-7 min)
	$(BIN)/popscore --log-level WARNING bench --json $(BENCH_JSON) $(BENCH_ARGS)

bench-redis: $(STAMP) stack-up redis-cluster-up ## the Redis sink on one node vs the local cluster: write latency, records/s, memory per 10^6 tracks (~8 min)
	$(BIN)/python -m popscore.bench.redis_sink --json bench/results/redis-cluster-vs-single-cpu-$(shell nproc)core.json

bench-resample: $(STAMP) $(MODEL) ## resamplers side by side: ms per 30 s window on one thread, SNR against exact tones, what the choice changes in the scores (~1 min)
	$(BIN)/python -m popscore.bench.resampler --model $(MODEL) --json bench/results/resampler-cpu-$(shell nproc)core.json

bench-scaleout: $(STAMP) $(MODEL) stack-up ## 1, 2, 4 consumer processes on 8 partitions, then batch size and decode workers swept: events/s, p99, CPU busy; JSON + docs/img/scaleout.png (~6 min)
	$(BIN)/python -m popscore.bench.scaleout --events 576 --json bench/results/scaleout-cpu-$(shell nproc)core.json --plot docs/img/scaleout.png

SOAK_RATE ?= 8
soak: $(STAMP) $(MODEL) stack-up ## 10 minutes at SOAK_RATE events/s through the real consumer, RSS sampled
	MALLOC_ARENA_MAX=2 $(BIN)/popscore --log-level WARNING bench --modes soak --rate $(SOAK_RATE) --soak-seconds 600 \
		--json bench/results/soak-cpu-$(shell nproc)core.json

TRAIN_TRACKS ?= 4000 20000
bench-train: $(STAMP) ## prepare + one streamed epoch on synthetic catalogs of TRAIN_TRACKS 30 s tracks, peak RSS of the process tree (26 GB of disk at 20,000)
	$(BIN)/python -m popscore.bench.training --tracks $(TRAIN_TRACKS) --work .bench/train \
		--json bench/results/train-scale-cpu-$(shell nproc)core.json

PROFILE_TXT = bench/results/profile-e2e-cpu-$(shell nproc)core.txt
profile: $(STAMP) $(MODEL) stack-up ## py-spy over the e2e benchmark: the service's busy time per stage (~2 min)
	mkdir -p .bench
	$(BIN)/py-spy record --rate 25 --format raw --output .bench/profile-e2e.raw -- \
		$(BIN)/popscore --log-level WARNING bench --modes e2e --json .bench/profile-e2e.json
	{ echo "# py-spy (25 Hz) over popscore bench --modes e2e, $$(date -u +%FT%TZ)"; \
	  echo "# $$(nproc) cores: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"; \
	  $(BIN)/python -m popscore.bench.profile .bench/profile-e2e.raw; } > $(PROFILE_TXT)
	cat $(PROFILE_TXT)

schemas: $(STAMP) ## regenerate schemas/json/*.json after changing a model
	$(BIN)/python -m schemas

clean: ## remove generated audio and local stack data (keeps .venv)
	rm -rf $(DEMO_DIR)
	deploy/local/stack-down.sh --purge
