#!/usr/bin/env bash
# `make e2e`: the e2e suite against $KUBECONFIG when it is set; otherwise against the
# real control plane in ../shared/k8s (kube-apiserver, controller manager, etcd), which
# this script starts under .tagpipe/e2e/, and stops when the suite ends. The suite
# starts its own NATS. A control plane that cannot start fails the run: no silent skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export TAGPIPE_E2E_REQUIRED=1
pytest=(.venv/bin/pytest -q -rs -p no:cacheprovider e2e "$@")
if [[ -n "${KUBECONFIG:-}" ]]; then
    exec "${pytest[@]}"
fi
control_plane=../shared/k8s/control-plane
if [[ ! -f $control_plane ]]; then
    echo "make e2e: KUBECONFIG is unset and there is no control plane at $control_plane" >&2
    exit 1
fi
# One state directory per run: other runs may share this working tree. It goes when
# the run ends (even interrupted), unless the control plane failed: then its logs stay.
state=.tagpipe/e2e/k8s-$$
keep=0
mkdir -p .tagpipe/e2e
stop() {
    bash "$control_plane" down "$state" >/dev/null 2>&1 || true
    [[ $keep == 1 ]] || rm -rf "$state"
}
trap stop EXIT
trap "exit 130" INT TERM  # so that the EXIT trap runs on Ctrl-C and kill too
# OpenShift's admission plugin: creating a child whose ownerReference sets
# blockOwnerDeletion needs `update` on the owner's finalizers (the chart grants it).
admission=--enable-admission-plugins=OwnerReferencesPermissionEnforcement
export KUBE_APISERVER_EXTRA_ARGS="${KUBE_APISERVER_EXTRA_ARGS:+$KUBE_APISERVER_EXTRA_ARGS }$admission"
if ! KUBECONFIG=$(bash "$control_plane" up "$state"); then
    keep=1
    echo "make e2e: the control plane did not start; its logs are in $state/logs" >&2
    exit 1
fi
export KUBECONFIG
"${pytest[@]}"
