# syntax=docker/dockerfile:1
# tagpipe's four images from one file, one target per component, built from the repository root:
#   docker build --target gateway    -t tagpipe/gateway .
#   docker build --target downloader -t tagpipe/downloader .
#   docker build --target operator   -t tagpipe/operator .
#   docker build --target inference  -t tagpipe/inference .
# (`make images` builds the four.) Each image installs only its own pyproject extra and runs
# as user 10001. The one wheel carries every tagpipe package (they are small); the extra
# decides which third-party dependencies come along.
#
# inference: CUDA runtime + onnxruntime-gpu (extra `inference-gpu`) with the default model
# (EfficientNet-Lite0, ONNX) baked in at /models/efficientnet-lite0. Why bake: the export
# needs torch (gigabytes, build time only) and is checked against torch at build time, so
# every image carries a verified model and needs no network at start. TagPipelines still
# mount their model at /models/model (a PVC, or fetched from storageUri by an init
# container; see charts/tagpipe/README.md). CPU-only variant (kind/CI clusters without GPUs):
#   docker build --target inference --build-arg INFERENCE_BASE_IMAGE=ubuntu:24.04 \
#     --build-arg INFERENCE_EXTRA=inference -t tagpipe/inference .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG INFERENCE_BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
ARG INFERENCE_EXTRA=inference-gpu

# The sources every stage installs from.
FROM ${PYTHON_IMAGE} AS sources
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common common
COPY cli cli
COPY operator operator
COPY services services

# A virtualenv for the python:3.11-slim images; each component adds its own extra below.
FROM sources AS slim-venv
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM slim-venv AS gateway-venv
RUN pip install ".[gateway]"

FROM slim-venv AS downloader-venv
RUN pip install ".[downloader]"

FROM slim-venv AS operator-venv
RUN pip install ".[operator]"

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
FROM sources AS model
RUN pip install ".[model,inference]" \
 && python services/inference/build_model.py --out /models/efficientnet-lite0

# inference 2: the runtime's virtualenv, built on the runtime base so its python matches.
FROM ${INFERENCE_BASE_IMAGE} AS inference-venv
ARG INFERENCE_EXTRA
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=sources /src /src
WORKDIR /src
RUN pip install ".[${INFERENCE_EXTRA}]"

# inference 3: CUDA libraries from the base, python, the venv and the model.
FROM ${INFERENCE_BASE_IMAGE} AS inference
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 tagpipe \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tagpipe
COPY --from=inference-venv /opt/venv /opt/venv
COPY --from=model --chown=root:root /models /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TAGPIPE_MODEL_DIR=/models/efficientnet-lite0
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["tagpipe-inference"]
