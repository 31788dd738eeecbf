"""The gateway in-process (httpx ASGITransport, its real lifespan) for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from nats.js.client import JetStreamContext
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.messages import DownloadTask
from tagpipe_common.subjects import Lane, Stage, stage_names
from tagpipe_gateway.app import create_app
from tagpipe_gateway.auth import ApiKeys, parse_entries
from tagpipe_gateway.settings import GatewaySettings


@contextlib.asynccontextmanager
async def gateway_client(
    nats_proc: ServerProcess, redis_proc: ServerProcess, keys: list[str], **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway that accepts `keys`; it sends the first one."""
    config = GatewaySettings(nats_url=nats_proc.url, redis_url=redis_proc.url, **settings)
    app = create_app(config, ApiKeys(tuple(parse_entries(",".join(keys)))))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://gw",
            headers={"Authorization": f"Bearer {keys[0]}"},
            timeout=60,
        ) as c,
    ):
        yield c


async def pull_tasks(js: JetStreamContext, lane: Lane, n: int) -> list[DownloadTask]:
    """Play the downloader: take (and ack) `n` download tasks of `lane`."""
    names = stage_names(Stage.DOWNLOAD)
    sub = await js.pull_subscribe(names.subject(lane), durable=names.consumer(lane))
    tasks: list[DownloadTask] = []
    while len(tasks) < n:
        for msg in await sub.fetch(n - len(tasks), timeout=5):
            tasks.append(DownloadTask.from_json(msg.data))
            await msg.ack()
    return tasks


async def wait_status(c: httpx.AsyncClient, job_id: str, **want: object) -> dict[str, Any]:
    """The job's status once every field in `want` has its value (30 s at most:
    10 s is tight for a gateway's paced submitter on a machine as busy as `make
    test-stress` makes it; a passing wait returns as soon as the status matches)."""
    for _ in range(600):
        body: dict[str, Any] = (await c.get(f"/v1/jobs/{job_id}")).json()
        if all(body.get(k) == v for k, v in want.items()):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job never reached {want}: {body}")
