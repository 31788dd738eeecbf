"""The gateway in-process (httpx ASGITransport, its real lifespan) for the integration tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from tagpipe_cli.servers import ServerProcess
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
