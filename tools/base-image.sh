#!/usr/bin/env bash
# Makes the local Python base image that `make images` uses where the registry's
# python:3.11-slim-bookworm cannot be pulled: Debian 12 minbase with python3 (3.11, as in
# the registry image), venv, CA certificates and passwd (useradd), from Debian's packages
# by mmdebstrap, imported into podman's store. The tarball is cached under
# $TAGPIPE_CACHE (/var/cache/tagpipe) so a clean clone re-imports it in seconds instead of
# bootstrapping again (~2 min). Usage: tools/base-image.sh [--force]
set -euo pipefail

IMAGE=${BASE_IMAGE:-localhost/tagpipe-base:bookworm}
CACHE=${TAGPIPE_CACHE:-/var/cache/tagpipe}
TAR=$CACHE/base-bookworm.tar
PACKAGES=python3,python3-venv,ca-certificates,passwd

command -v podman >/dev/null 2>&1 || {
    echo "tools/base-image.sh: podman is not installed; run: tools/podman-setup.sh (or: make podman-setup)" >&2
    exit 1
}
if [[ ${1:-} == --force ]]; then
    rm -f "$TAR"
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
fi
if podman image exists "$IMAGE"; then
    echo "tools/base-image.sh: $IMAGE is present" >&2
    exit 0
fi
if [[ ! -s $TAR ]]; then
    command -v mmdebstrap >/dev/null 2>&1 || {
        echo "tools/base-image.sh: mmdebstrap is not installed; run: tools/podman-setup.sh" >&2
        exit 1
    }
    mkdir -p "$CACHE"
    echo "tools/base-image.sh: mmdebstrap bookworm ($PACKAGES) -> $TAR" >&2
    mmdebstrap --quiet --format=tar --variant=minbase --include="$PACKAGES" bookworm "$TAR.part"
    mv "$TAR.part" "$TAR"
fi
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$TAR" "$IMAGE" >/dev/null
echo "tools/base-image.sh: imported $TAR as $IMAGE" >&2
