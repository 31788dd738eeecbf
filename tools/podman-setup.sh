#!/usr/bin/env bash
# Installs what `make images` and `make test-containers` need where no Docker engine runs:
# podman + buildah (Debian 12's, rootful), mmdebstrap for the local base image, and
# containers.conf's default_ulimits. Why the ulimits: runc here refuses podman's default
# rlimits ("error setting rlimit type 6/7"); explicit nofile/nproc values are accepted.
# The runtime is pinned to runc: crun, where installed, fails here ("cgroups in hybrid
# mode not supported").
# Idempotent; needs root (as CI and the dev machines are). Usage: tools/podman-setup.sh
set -euo pipefail

CONF=${CONTAINERS_CONF_FILE:-/etc/containers/containers.conf}
ULIMITS='default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]'

need=()
for cmd in podman buildah mmdebstrap runc; do
    command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
        echo "tools/podman-setup.sh: missing ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    echo "tools/podman-setup.sh: apt-get install ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

mkdir -p "$(dirname "$CONF")"
touch "$CONF"
if ! grep -q '^default_ulimits' "$CONF"; then
    if grep -q '^\[containers\]' "$CONF"; then
        sed -i "/^\[containers\]/a $ULIMITS" "$CONF"
    else
        printf '\n[containers]\n%s\n' "$ULIMITS" >>"$CONF"
    fi
    echo "tools/podman-setup.sh: set default_ulimits in $CONF" >&2
fi
if ! grep -q '^runtime *=' "$CONF"; then
    if grep -q '^\[engine\]' "$CONF"; then
        sed -i '/^\[engine\]/a runtime = "runc"' "$CONF"
    else
        printf '\n[engine]\nruntime = "runc"\n' >>"$CONF"
    fi
    echo "tools/podman-setup.sh: set runtime = runc in $CONF" >&2
fi
