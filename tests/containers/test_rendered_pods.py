"""The pipeline in containers, exactly as the operator renders it (podkit's translation):
tags through the containerised gateway, a bulk job, and SIGTERM to each worker mid-job.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import skimage.data
from PIL import Image
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.subjects import LANES, Stage, stage_names

from tests.containers.podkit import API_KEY, PREFIX, Cluster, Hosts
from tests.faults.kit import account, assert_exactly_once, image_urls, submit_job, wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAT_WORDS = ("cat", "tabby", "lynx")  # tests/integration/test_stack_e2e.py's references
COFFEE_WORDS = ("espresso", "cup", "coffee", "eggnog")
N = 200
# Larger, so the job is still running after the first worker has stopped and come back.
N_TERM = 600
WORKERS = {"downloader": Stage.DOWNLOAD, "inference": Stage.INFER}


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def http(cluster: Cluster) -> httpx.Client:
    return httpx.Client(
        base_url=cluster.pods["gateway"].url("http"),
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )


def stack_view(hosts: Hosts) -> SimpleNamespace:
    """What tests.faults.kit's accounting reads of a stack: where NATS and Redis are."""
    return SimpleNamespace(nats_url=hosts.nats.url, redis_url=hosts.redis.url)


def held_not_handed_back(hosts: Hosts, stage: Stage) -> int:
    """Messages the stage's consumers handed out that are neither acked nor NAKed.

    A NAKed message still counts as ack-pending until it is delivered again, so the
    count alone cannot tell handed back from dropped. A probe tells: JetStream serves
    its redelivery queue first, so a pull now gets every NAKed message at once
    (delivered before), while a dropped one waits out its ack wait (30-60 s). The
    probe NAKs what it took, for the restarted worker.
    """
    names = stage_names(stage, PREFIX)

    async def probe() -> int:
        nc = await connect_nats([hosts.nats.url], "containers-test")
        try:
            js = nc.jetstream()
            missing = 0
            for lane in LANES:
                info = await js.consumer_info(names.stream, names.consumer(lane))
                held = int(info.num_ack_pending or 0)
                if not held:
                    continue
                sub = await js.pull_subscribe_bind(names.consumer(lane), names.stream)
                try:
                    msgs = await sub.fetch(held, timeout=5)
                except TimeoutError:
                    msgs = []
                again = sum(1 for m in msgs if (m.metadata.num_delivered or 1) >= 2)
                for m in msgs:
                    await m.nak()
                missing += held - again
            return missing
        finally:
            await close_nats(nc)

    return asyncio.run(probe())


def test_tag_sample_photos_through_the_gateway_container(cluster: Cluster, tmp_path: Path) -> None:
    cat, coffee = tmp_path / "chelsea.jpg", tmp_path / "coffee.jpg"
    cat.write_bytes(jpeg(skimage.data.chelsea()))  # type: ignore[no-untyped-call]
    coffee.write_bytes(jpeg(skimage.data.coffee()))  # type: ignore[no-untyped-call]
    cli = [
        sys.executable,
        "-m",
        "tagpipe_cli",
        "tag",
        "--json",
        "--top-k",
        "3",
        "--gateway",
        cluster.pods["gateway"].url("http"),
        "--api-key",
        API_KEY,
    ]
    proc = subprocess.run(
        [*cli, str(cat), str(coffee)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr + cluster.logs()
    items = json.loads(proc.stdout)
    assert [it["status"] for it in items] == ["ok", "ok"], items
    labels = [[t["label"].lower() for t in it["tags"]] for it in items]
    assert any(w in label for label in labels[0] for w in CAT_WORDS), labels
    assert any(w in label for label in labels[1] for w in COFFEE_WORDS), labels


def test_bulk_job_completes_exactly_once(cluster: Cluster, hosts: Hosts) -> None:
    with http(cluster) as client:
        job_id = submit_job(client, image_urls(hosts.images, N, "bulk"))
        acc = account(stack_view(hosts), client, job_id, N)  # type: ignore[arg-type]
    assert_exactly_once(acc)
    assert acc.ok == N, acc


def test_sigterm_each_worker_mid_job(cluster: Cluster, hosts: Hosts) -> None:
    exits, held_after_exit, at_signal = {}, {}, {}
    with http(cluster) as client:
        job_id = submit_job(client, image_urls(hosts.images, N_TERM, "term"))
        for k, (component, stage) in enumerate(WORKERS.items()):
            wait_finished(client, job_id, (k + 1) * N_TERM // 10)
            at_signal[component] = client.get(f"/v1/jobs/{job_id}").json()["finished"]
            pod = cluster.pods[component]
            # podman stop = SIGTERM, then SIGKILL when the rendered grace period is over:
            # an exit code of 0 means the worker was done before the kubelet would kill it.
            exits[component] = pod.terminate()
            # Every message it held is finished (acked) or handed back (NAKed) by now,
            # none left to the ack-wait timeout.
            held_after_exit[component] = held_not_handed_back(hosts, stage)
            pod.restart()
            pod.wait_ready()
        acc = account(stack_view(hosts), client, job_id, N_TERM)  # type: ignore[arg-type]
    assert exits == dict.fromkeys(WORKERS, 0), f"{exits}\n{cluster.logs()}"
    assert held_after_exit == dict.fromkeys(WORKERS, 0), held_after_exit
    assert max(at_signal.values()) < N_TERM, "the job was over before the last signal"
    assert_exactly_once(acc)
