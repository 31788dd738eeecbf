"""The operator's rendered pods in podman (`make test-containers`, TAGPIPE_CONTAINERS=1).

Needs podman and the images of `make images`; heavy for a 2-core machine, so `make test`
skips these. NATS, Redis, moto's S3 and the image server run as host processes on the
podman bridge's host address (the tests' own real servers, bound to 0.0.0.0 so that the
containers reach them); the pipeline's three pods run in containers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from tagpipe_cli.servers import ServerProcess, free_port, nats_server, redis_server, wait_for_port
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.streams import StreamPolicy, ensure_streams
from tagpipe_operator.render import render
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import TagPipelineSpec

from bench.imageserver import ImageServer
from tests.containers.podkit import API_KEY, PREFIX, Cluster, Hosts, bridge_gateway, podman
from tests.tools import MODEL_DIR, ROOT

ENABLED = os.environ.get("TAGPIPE_CONTAINERS") == "1"
IMAGE_TAG = os.environ.get("IMAGE_TAG", "0.1.0")
IMAGE_PREFIX = os.environ.get("IMAGE_PREFIX", "tagpipe/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="needs podman and `make images`: run `make test-containers`")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def _on_all_interfaces(srv: ServerProcess) -> ServerProcess:
    """The fixtures' server, listening where the bridge's containers reach it."""
    flag = "--addr" if srv.name == "nats" else "--bind"
    srv.argv[srv.argv.index(flag) + 1] = "0.0.0.0"
    if srv.name == "redis":
        srv.argv += ["--protected-mode", "no"]
    return srv


def _moto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    log = (tmp / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(moto), "-H", "0.0.0.0", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    wait_for_port(port, 120, proc)
    return proc, port


def _upload_model(endpoint: str) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket="models")
    for f in MODEL_DIR.iterdir():
        s3.upload_file(str(f), "models", f"efficientnet-lite0/{f.name}")


class _ImageThread:
    def __init__(self, host_ip: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = ImageServer(host="0.0.0.0")
        self.host_ip = host_ip

    def __enter__(self) -> ImageServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)
        self.server.host = self.host_ip  # its URLs, as the containers reach it
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make podman-setup`", pytrace=False)
    if not (MODEL_DIR / "model.onnx").exists():
        pytest.fail("no model: run `make model`", pytrace=False)
    tmp = tmp_path_factory.mktemp("hosts")
    ip, subnet = bridge_gateway()
    nats = _on_all_interfaces(nats_server(tmp / "nats")).start()
    redis = _on_all_interfaces(redis_server(tmp / "redis")).start()
    moto, port = _moto(tmp)
    try:
        _upload_model(f"http://127.0.0.1:{port}")
        s3_env = {
            "AWS_ENDPOINT_URL": f"http://{ip}:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        }
        with _ImageThread(ip) as images:
            yield Hosts(ip, subnet, nats, redis, s3_env, images)
    finally:
        moto.terminate()
        moto.wait(30)
        nats.stop()
        redis.stop()


def cpu_pipeline(hosts: Hosts) -> dict[str, Any]:
    """The sample TagPipeline, as a CPU pipeline whose model comes from S3 (moto)."""
    cr = yaml.safe_load((ROOT / "crds/examples/tagpipeline.yaml").read_text())
    spec = cr["spec"]
    spec["model"]["storageUri"] = "s3://models/efficientnet-lite0"
    spec["model"]["storageSecretRef"] = {"name": "tagpipe-model-store"}
    spec["nats"]["prefix"] = PREFIX
    spec["inference"]["gpu"] = 0
    # The image server is on the bridge: a private address the downloader refuses unless told.
    spec["downloader"]["env"] = [{"name": "TAGPIPE_ALLOW_CIDRS", "value": hosts.subnet}]
    spec["inference"]["env"] = [{"name": "TAGPIPE_INTRA_OP_THREADS", "value": "1"}]  # 2 cores
    for c in ("gateway", "downloader", "inference"):
        spec[c]["image"] = f"{IMAGE_PREFIX}{c}:{IMAGE_TAG}"
        spec[c]["imagePullPolicy"] = "Never"
    return cr


def _ensure_streams(url: str, spec: TagPipelineSpec) -> None:
    """What the operator's reconcile does before its pods start (reconcile.stream_policy)."""
    policy = dataclasses.replace(
        StreamPolicy.from_settings(OperatorSettings()),
        prefix=spec.nats.prefix,
        replicas=spec.nats.stream_replicas,
    )

    async def run() -> None:
        nc = await connect_nats([url], "containers-test")
        try:
            await ensure_streams(nc.jetstream(), policy)
        finally:
            await close_nats(nc)

    asyncio.run(run())


@pytest.fixture(scope="module")
def cluster(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cr = cpu_pipeline(hosts)
    spec = TagPipelineSpec.model_validate(cr["spec"])
    objects = render(cr["metadata"]["name"], "default", "uid-containers", spec)
    for image in {f"{IMAGE_PREFIX}{c}:{IMAGE_TAG}" for c in ("gateway", "downloader", "inference")}:
        if podman("image", "exists", image, check=False).returncode != 0:
            pytest.fail(f"image {image} is missing: run `make images`", pytrace=False)
    secrets = {
        "tagpipe-nats": {"url": f"nats://{hosts.ip}:{hosts.nats.port}"},
        "tagpipe-redis": {"url": f"redis://{hosts.ip}:{hosts.redis.port}/0"},
        "tagpipe-api-keys": {"keys": API_KEY},
        "tagpipe-model-store": hosts.s3_env,
    }
    _ensure_streams(hosts.nats.url, spec)
    c = Cluster(objects, secrets, tmp_path_factory.mktemp("pods"))
    c.remove_containers()  # a previous run's, if it was killed
    (c.workdir / "rendered.json").write_text(json.dumps(objects, indent=1))
    try:
        for component in ("inference", "downloader", "gateway"):
            c.start(component)
        for pod in c.pods.values():
            pod.wait_ready()
        yield c
    finally:
        c.remove()
