"""Everything a request needs, built once per process in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js.client import JetStreamContext
from redis.asyncio import Redis
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import close_nats, connect_nats
from tagpipe_common.redis_io import connect_redis
from tagpipe_common.results import ResultStore

from tagpipe_gateway.auth import ApiKeys
from tagpipe_gateway.jobs import JobManager
from tagpipe_gateway.queue import BacklogCache, Publisher
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.sink import Sink
from tagpipe_gateway.waiters import Notifier

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: GatewaySettings
    api_keys: ApiKeys
    nc: Client
    js: JetStreamContext
    redis: Redis
    keys: RedisKeys
    store: ResultStore
    publisher: Publisher
    backlog: BacklogCache
    notifier: Notifier
    jobs: JobManager
    sink: Sink  # writes the output of jobs with an output prefix (sink.py)

    @classmethod
    async def start(cls, settings: GatewaySettings, api_keys: ApiKeys) -> Runtime:
        nc = await connect_nats(settings.nats_servers, "tagpipe-gateway", settings.nats_liveness())
        js = nc.jetstream()
        redis = connect_redis(settings.redis_url, settings.redis_timeouts())
        keys = RedisKeys(settings.prefix)
        store = ResultStore.for_settings(redis, settings)
        publisher = Publisher(js, settings.prefix, partitions=settings.partitions)
        backlog = BacklogCache(
            js,
            settings.prefix,
            settings.backlog_cache_s,
            settings.drain_rate_window_s,
            partitions=settings.partitions,
        )
        notifier = Notifier(
            redis, store, keys.notify_channel, dead_after_s=settings.redis_socket_timeout_s
        )
        await notifier.start()
        backlog.local = notifier.pending_items
        jobs = JobManager(redis, store, keys, publisher, backlog, settings)
        jobs.start()
        sink = Sink(redis, keys, settings)
        sink.start()
        return cls(
            settings, api_keys, nc, js, redis, keys, store, publisher, backlog, notifier, jobs, sink
        )

    async def close(self) -> None:
        await self.jobs.close()
        await self.sink.close()
        await self.notifier.stop()
        # Shutting down with a server gone must still release everything else.
        await close_nats(self.nc)
        try:
            await self.redis.aclose()
        except Exception as exc:
            log.warning("while closing redis: %s", exc)
