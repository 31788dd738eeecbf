#!/usr/bin/env bash
# `make lock`: regenerates requirements/*.txt, the hashed locks every install uses (make
# setup, CI, the images), from pyproject.toml. Run it after any change to a dependency;
# tests/unit/test_lock.py fails while pyproject and the locks disagree.
#
# uv (`uv pip compile`), not pip-tools: it resolves the whole dev set in seconds on two
# cores, writes a universal lock (markers kept, hashes of every wheel of each pin, so the
# same file installs on the python:3.11 images and the CUDA image's python), and it reads
# only PyPI, never this machine's pip.conf find-links or local mirrors, so the lock is the
# same wherever it is made. pip installs it (`pip install --require-hashes -r ...`).
#
# torch is left out of every lock (requirements/no-torch.txt); it is build-time only and
# installed from requirements/torch.txt. The CPU image locks are constrained by dev.txt so
# a package has one version in each of them and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-.venv/bin/uv}
[[ -x $UV ]] || UV=$(command -v uv) || {
    echo "make lock: uv not found; run: make setup (uv is in the dev extra) or pip install uv" >&2
    exit 1
}
shared=(--generate-hashes --quiet --override requirements/no-torch.txt --no-emit-package torch
    --custom-compile-command "make lock")
if [[ ${1:-} == --upgrade ]]; then shared+=(--upgrade); fi
common=(--universal --python-version 3.11 "${shared[@]}")
# The GPU image only: Linux x86-64 and the CUDA base's Python (Ubuntu 24.04: 3.12). Not
# universal: NVIDIA's wheels exist for Linux only, and for other platforms the resolver
# would fall back to sdists that are stubs downloading from NVIDIA's own index.
gpu=(--python-platform x86_64-manylinux_2_28 --python-version 3.12 "${shared[@]}")

"$UV" pip compile pyproject.toml --extra dev "${common[@]}" -o requirements/dev.txt
# One lock per image: only its own extra, at the dev lock's versions.
for extra in gateway downloader operator inference; do
    "$UV" pip compile pyproject.toml --extra "$extra" -c requirements/dev.txt "${common[@]}" \
        -o "requirements/$extra.txt"
done
# The inference image's build stage that exports the model (torch added from torch.txt).
"$UV" pip compile pyproject.toml --extra model --extra inference -c requirements/dev.txt \
    "${common[@]}" -o requirements/model.txt
# Last, so the CPU locks above are written even where the GPU extra does not resolve.
# Not under dev.txt's constraints either: DALI caps `packaging` below the newest release,
# and the GPU image never meets the dev set.
"$UV" pip compile pyproject.toml --extra inference-gpu "${gpu[@]}" -o requirements/inference-gpu.txt
echo "make lock: requirements/*.txt written" >&2
