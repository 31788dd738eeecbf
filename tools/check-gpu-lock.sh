#!/usr/bin/env bash
# `make images-gpu-check`: what can be checked of the GPU inference image where its CUDA
# base cannot be pulled. The Dockerfile lint (tests/unit/test_dockerfile.py), then pip
# resolves requirements/inference-gpu.txt as the image would install it (--require-hashes
# --no-deps, wheels only) for the base's Python (Ubuntu 24.04: CPython 3.12) on Linux
# x86-64, without installing: every pin has a wheel there and the hashes are complete.
# Needs the package index (~20 s, metadata and the small wheels only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

"$PY" -m pytest -q -p no:cacheprovider tests/unit/test_dockerfile.py
platforms=()
# pip matches --platform exactly: name every manylinux level a glibc 2.39 base accepts.
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 \
    manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 \
    manylinux_2_39; do
    platforms+=(--platform "${tag}_x86_64")
done
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
"$PY" -m pip install -q --dry-run --ignore-installed --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" --target "$target" \
    --require-hashes -r requirements/inference-gpu.txt
echo "make images-gpu-check: the GPU stage lints and requirements/inference-gpu.txt installs on cp312 Linux x86-64" >&2
