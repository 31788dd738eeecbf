"""Where a worker pod's model directory comes from: a volume, or an init container.

`pvc://<claim>/<path>` and `spec.model.volume` mount the directory read-only. `https://`
and `s3://` are fetched into an `emptyDir` by an init container that runs
`python -m tagpipe_common.storage` from the pod's own image (both worker images carry
it, and boto3 through their `storage` extra), so no third image is pulled and the fetcher
is the same version as the worker that reads its result. The fetcher verifies the model
file against the manifest's sha256 and exits 2 with one line on any failure, which keeps
the pod in `Init:Error` with that line in its log rather than a worker serving a wrong model.
"""

from __future__ import annotations

from typing import Any

from tagpipe_operator.spec import ModelSource

Manifest = dict[str, Any]

FETCH_CONTAINER = "fetch-model"
FETCH_COMMAND = ["python", "-m", "tagpipe_common.storage"]


def model_volume(model: ModelSource) -> tuple[Manifest, str]:
    """The model's volume source and the sub-path of the model directory inside it."""
    if model.fetched:
        return {"emptyDir": {}}, ""
    if model.storage_uri is not None:
        claim, _, path = model.storage_uri.removeprefix("pvc://").partition("/")
        return {"persistentVolumeClaim": {"claimName": claim, "readOnly": True}}, path
    return dict(model.volume or {}), model.sub_path


def fetch_args(component: str, model: ModelSource, dest: str) -> list[str]:
    assert model.storage_uri is not None
    args = ["--uri", model.storage_uri, "--dest", dest]
    if model.sha256 is not None:
        args += ["--sha256", model.sha256]
    if component == "downloader":
        # The downloader reads only the manifest's preprocessing geometry.
        args.append("--manifest-only")
    return args


def fetch_container(
    component: str, model: ModelSource, image: str, pull_policy: str, security: Manifest, dest: str
) -> Manifest:
    """The init container that fills the model emptyDir (only when `model.fetched`)."""
    container: Manifest = {
        "name": FETCH_CONTAINER,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": list(FETCH_COMMAND),
        "args": fetch_args(component, model, dest),
        "volumeMounts": [
            {"name": "model", "mountPath": dest},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": security,
        # The fetcher's one line is the reason the pod shows (kubectl describe).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if model.storage_secret_ref is not None:
        container["envFrom"] = [{"secretRef": {"name": model.storage_secret_ref.name}}]
    return container
