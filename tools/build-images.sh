#!/usr/bin/env bash
# `make images`: one image from the Dockerfile, with docker where an engine runs, else
# podman (rootful, Debian 12's; tools/podman-setup.sh installs it). The Makefile calls it
# once per component: tools/build-images.sh --variant cpu --target gateway -t tagpipe/gateway:0.1.0
#   --variant cpu   inference on the Python base with onnxruntime (lock `inference`)
#   --variant gpu   inference on the CUDA 13 base with onnxruntime-gpu (lock `inference-gpu`)
# The Python base is the registry's python:3.11-slim-bookworm where it is present or can be
# pulled; else the local Debian base that `make base-image` makes (tools/base-image.sh).
# Arguments after --variant go to `<engine> build`. Env: PYTHON_IMAGE (skips the choice),
# REGISTRY_PYTHON, BASE_IMAGE (the local base), INFERENCE_BASE_IMAGE, ENGINE (docker|podman),
# TORCH_WHEELS (a directory with the torch wheel, podman only).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY_PYTHON=${REGISTRY_PYTHON:-docker.io/library/python:3.11-slim-bookworm}
LOCAL_PYTHON=${BASE_IMAGE:-localhost/tagpipe-base:bookworm}
variant=cpu
if [[ ${1:-} == --variant ]]; then variant=$2; shift 2; fi
[[ $variant == cpu || $variant == gpu ]] || { echo "--variant is cpu or gpu, not $variant" >&2; exit 2; }
say() { echo "make images: $*" >&2; }

if [[ -z ${ENGINE:-} ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    else
        say "no Docker engine and no podman; install podman with: make podman-setup (tools/podman-setup.sh, root)"
        exit 1
    fi
fi

args=()
if [[ $ENGINE == podman ]]; then
    # --network host: pip reaches the index as the host does. The host's CA bundle is
    # mounted over the image's for RUN steps only (it is not in any layer), for networks
    # that intercept TLS.
    args+=(--network host --layers)
    ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    [[ -f $ca ]] && args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
    # torch: a local wheel directory when there is one (this machine's pip has the CPU wheel
    # in /opt/wheels); then the PyTorch index is not asked at all.
    wheels=${TORCH_WHEELS:-/opt/wheels}
    if compgen -G "$wheels/torch-*.whl" >/dev/null; then
        args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_INDEX_URL=)
    fi
fi

if [[ -z ${PYTHON_IMAGE:-} ]]; then
    if "$ENGINE" image inspect "$REGISTRY_PYTHON" >/dev/null 2>&1 \
        || timeout 60 "$ENGINE" pull -q "$REGISTRY_PYTHON" >/dev/null 2>&1; then
        PYTHON_IMAGE=$REGISTRY_PYTHON
    elif "$ENGINE" image inspect "$LOCAL_PYTHON" >/dev/null 2>&1; then
        PYTHON_IMAGE=$LOCAL_PYTHON
        say "$REGISTRY_PYTHON cannot be pulled; using the local base $LOCAL_PYTHON"
    else
        say "$REGISTRY_PYTHON cannot be pulled and the local base $LOCAL_PYTHON is missing;"
        say "make it with: make base-image (tools/base-image.sh: mmdebstrap, ~1-2 min)"
        exit 1
    fi
fi
args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
if [[ $variant == cpu ]]; then
    args+=(--build-arg "INFERENCE_BASE_IMAGE=${INFERENCE_BASE_IMAGE:-$PYTHON_IMAGE}"
        --build-arg INFERENCE_LOCK=inference)
elif [[ -n ${INFERENCE_BASE_IMAGE:-} ]]; then
    args+=(--build-arg "INFERENCE_BASE_IMAGE=$INFERENCE_BASE_IMAGE")
fi

say "$ENGINE build $* ($variant, $PYTHON_IMAGE)"
"$ENGINE" build "${args[@]}" "$@" .
