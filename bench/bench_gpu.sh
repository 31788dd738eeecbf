#!/usr/bin/env bash
# make bench-gpu: install the GPU wheels into their own venv, then run
# bench/bench_gpu.py once (at most 8 minutes on a GPU machine).
#   --dry-run      CPU only, with the project's .venv: installs nothing.
#   WHEELHOUSE=dir install from a directory of wheels (a machine without PyPI).
# onnxruntime-gpu never goes into .venv: it and onnxruntime are one module.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    exec .venv/bin/python -m bench.bench_gpu "$@"
  fi
done
VENV=${GPU_VENV:-.venv-gpu}
PIP=(-q)
if [[ -n "${WHEELHOUSE:-}" ]]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install "${PIP[@]}" -e '.[bench-gpu]'
# TensorRT is optional: without it the TensorRT rows are simply absent.
"$VENV/bin/pip" install "${PIP[@]}" tensorrt-cu12 || echo "bench-gpu: no TensorRT (tensorrt-cu12 did not install)"
test -f models/efficientnet-lite0/manifest.json || { echo "bench-gpu: no model (make model, or carry models/)" >&2; exit 2; }
exec timeout 480 "$VENV/bin/python" -m bench.bench_gpu "$@"
