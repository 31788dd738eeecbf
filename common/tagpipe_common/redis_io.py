"""Connecting to Redis the same way everywhere: one server, or a primary Sentinel watches.

`TAGPIPE_REDIS_URL` takes one of two forms:

- `redis://[user:password@]host:6379/0` (`rediss://` for TLS, `unix://` a socket): one
  server, as redis-py's `from_url` reads it;
- `redis+sentinel://[user:password@]h1:26379,h2:26379,h3:26379/<service>/<db>`
  (`rediss+sentinel://` for TLS to the data nodes): the primary of `<service>` as the
  sentinels name it. The credentials are the data nodes'; sentinels that need their own
  password take `?sentinel_password=...`.

Clients come from redis-py's own Sentinel support: each new connection asks the
sentinels for the primary, and a connection that finds its server gone (or demoted:
READONLY) is dropped, so the next command goes to the promoted replica. The callers'
retry loops (outage.py) ride the seconds in between.

`Durability` is the WAIT after writes that must not be lost (see `docs/operations.md`).

`RedisTimeouts` bounds every data connection: a primary that hangs without a TCP reset
(a frozen VM, a partition) answers nothing, and without a socket timeout a command
would wait for it for as long as the kernel keeps the socket (minutes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
SETTING = "TAGPIPE_REDIS_URL"

# A sentinel is only asked where the primary is: a dead one is skipped at once.
_SENTINEL_TIMEOUT_S = 1.0
# The longest a command of ours may block on the server by design: XREAD BLOCK on a
# job's result stream (the gateway). A socket timeout must exceed it (and the WAIT's).
XREAD_BLOCK_MS = 1000


class NotReplicated(redis.exceptions.ConnectionError):
    """WAIT timed out before enough replicas had the writes.

    A ConnectionError on purpose: every caller already treats that as "Redis cannot
    take this write durably right now" (retry with backoff, hold the message, answer
    503), which is exactly what a write that might not survive a failover needs.
    """


@dataclass(frozen=True)
class RedisTimeouts:
    """How long a data connection waits for Redis before the peer counts as dead.

    A dead server must fail fast (the caller's loop backs off and retries, and a
    Sentinel client asks again where the primary is), never block a worker or a
    real-time request for long. The settings (`CommonSettings.redis_timeouts`) are
    the one place these are chosen; the defaults here are theirs.
    """

    socket_timeout_s: float = 5.0
    """Longest wait for one reply. Longer than any blocking command we send
    (XREAD BLOCK, WAIT), or those would time out while the server is well."""
    connect_timeout_s: float = 2.0
    health_check_interval_s: float = 5.0
    """A connection idle this long is PINGed before its next command: one that died
    idle (a failover, a NAT that forgot it) fails there, not mid-command."""

    def kwargs(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
            "health_check_interval": self.health_check_interval_s,
            "socket_keepalive": True,
        }


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a `redis+sentinel://` URL; ValueError naming what is wrong."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for entry in filter(None, hosts.split(",")):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {entry!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise ValueError("no sentinel host:port before the path")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /<service name>[/<db number>], e.g. /mymaster/0")
    query = parse_qs(parts.query)
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        sentinel_password=query.get("sentinel_password", [None])[0],
        ssl=url.startswith("rediss+"),
    )


def check_redis_url(url: str) -> str:
    """The settings validator: a plain URL redis-py reads, or a well-formed Sentinel one."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return url
    if not url.startswith(PLAIN_SCHEMES):
        raise ValueError(
            f"{redacted(url)!r} is not a redis://, rediss://, unix:// or redis+sentinel:// URL"
        )
    return url


def redacted(url: str) -> str:
    """The URL with its password replaced, for logs and error lines."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _connection_kwargs(target: SentinelTarget | None, timeouts: RedisTimeouts) -> dict[str, Any]:
    kw = timeouts.kwargs()
    if target is not None:
        kw.update(db=target.db, username=target.username, password=target.password)
        if target.ssl:
            kw["ssl"] = True
    return kw


def _sentinel_kwargs(target: SentinelTarget, retry: Any) -> dict[str, Any]:
    # One try per sentinel per discovery, with a short timeout: a dead sentinel is
    # skipped for the next one instead of retried with redis-py's default backoff.
    return {
        "socket_timeout": _SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
        "password": target.sentinel_password,
        "retry": retry,
    }


def _target_and_kwargs(
    url: str, timeouts: RedisTimeouts | None, kwargs: dict[str, Any]
) -> tuple[SentinelTarget | None, dict[str, Any]]:
    target = parse_sentinel_url(url) if is_sentinel(url) else None
    return target, {**_connection_kwargs(target, timeouts or RedisTimeouts()), **kwargs}


class _Rediscovering(redis.asyncio.sentinel.SentinelManagedConnection):
    """Asks the sentinels where the primary is on every reconnect, not only the first.

    redis-py 7.4 reconnects a connection its retry just dropped through
    `connect_check_health`, which skips the Sentinel lookup and dials the address the
    connection had: a command in flight when the primary froze then spends all its
    retries (4 socket timeouts, 20 s measured) on the frozen node, although the
    sentinels promoted a replica in 3-4 s. Looking the primary up here sends the
    first retry to the promoted replica. (A lookup on a first connect happens twice:
    one more round trip to a sentinel per connect.)
    """

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health, retry_socket_connect)


def connect_redis(
    url: str, timeouts: RedisTimeouts | None = None, **kwargs: Any
) -> redis.asyncio.Redis:
    """An asyncio client for either form of the URL (no I/O until the first command).

    `timeouts`: the component's settings (`settings.redis_timeouts()`); tools and
    tests that have none get the same defaults."""
    retry = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3)
    target, conn = _target_and_kwargs(url, timeouts, kwargs)
    if target is None:
        return redis.asyncio.Redis.from_url(url, **conn, retry=retry)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs=_sentinel_kwargs(target, redis.asyncio.retry.Retry(NoBackoff(), 0)),
    )
    client: redis.asyncio.Redis = sentinel.master_for(
        target.service, **conn, retry=retry, connection_class=_Rediscovering
    )
    return client


def connect_redis_sync(
    url: str, timeouts: RedisTimeouts | None = None, **kwargs: Any
) -> redis.Redis:
    """The blocking client for either form (the CLI, tests, start-up checks)."""
    retry = redis.retry.Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3)
    target, conn = _target_and_kwargs(url, timeouts, kwargs)
    if target is None:
        return redis.Redis.from_url(url, **conn, retry=retry)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs=_sentinel_kwargs(target, redis.retry.Retry(NoBackoff(), 0)),
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service, **conn, retry=retry
    )
    return client


def require_redis(url: str, label: str, timeout_s: float = 10.0) -> None:
    """Start-up check: the primary answers a PING within `timeout_s`, or the process
    stops with exit status 2 and one line naming the setting.

    A typo'd host or a Sentinel set that names no primary is a deployment error to
    show at once; a Redis restarting while the process starts is ridden out by the
    retries within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    client = connect_redis_sync(url)
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.RedisError, OSError) as exc:
                if time.monotonic() >= deadline:
                    what = "no Sentinel named a primary" if is_sentinel(url) else "no answer"
                    # MasterNotFoundError appends the repr of every sentinel client: cut it.
                    why = str(exc).split(" : <")[0][:200]
                    line = (
                        f"{label}: cannot reach {SETTING}={redacted(url)} within {timeout_s:g}s"
                        f" ({what}: {type(exc).__name__}: {why})"
                    )
                    print(line, file=sys.stderr)
                    raise SystemExit(2) from None
                time.sleep(0.5)
    finally:
        client.close()


@dataclass(frozen=True)
class Durability:
    """WAIT for `replicas` replicas (up to `timeout_ms`) after writes that must
    survive the primary's loss. `replicas=0` (one server): no WAIT at all.

    The WAIT follows an INCR of a fence key on the same connection: Redis 7 makes
    WAIT cover only the writes of its own connection, so a retry whose script wrote
    nothing (the result was stored on an earlier try) still waits for everything
    written before it, that earlier write included.
    """

    replicas: int = 0
    timeout_ms: int = 1000
    fence_key: str = "tagpipe:wait-fence"

    def queue(self, pipe: Any) -> None:
        """Append the fence and the WAIT to a pipeline (no-op without replicas)."""
        if self.replicas:
            pipe.incr(self.fence_key)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def check(self, replies: Sequence[Any]) -> list[Any]:
        """The pipeline's replies without the two `queue` added; NotReplicated if the
        WAIT came back short."""
        if not self.replicas:
            return list(replies)
        acked = int(replies[-1])
        if acked < self.replicas:
            raise NotReplicated(
                f"WAIT: {acked} of {self.replicas} replicas acknowledged within "
                f"{self.timeout_ms} ms"
            )
        return list(replies[:-2])

    async def confirm(self, client: redis.asyncio.Redis) -> None:
        """WAIT for everything written so far (after a write outside a pipeline)."""
        if not self.replicas:
            return
        async with client.pipeline(transaction=False) as pipe:
            self.queue(pipe)
            self.check(await pipe.execute())
