"""Settings shared by every component, and the one way components load theirs.

Each component subclasses `CommonSettings` in its own `settings.py` (one class
per component, prefix `TAGPIPE_`), and builds it in `main()` with
`load_settings()`, which turns a bad value into one clear line naming the
environment variable and exits with status 2.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tagpipe_common.nats_io import NatsLiveness
from tagpipe_common.redis_io import (
    XREAD_BLOCK_MS,
    Durability,
    RedisTimeouts,
    check_redis_url,
    is_sentinel,
)

ENV_PREFIX = "TAGPIPE_"
MAX_PARTITIONS = 32


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server(s), comma-separated")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis: redis://host:port/db, or redis+sentinel://h1:p,h2:p,h3:p/service/db",
    )
    # WAIT after writes that must survive a failover (redis_io.Durability): how many
    # replicas must have them (unset: 1 with Sentinel, 0 with one server) and how long
    # to wait before the write counts as failed and is retried.
    redis_wait_replicas: Annotated[int | None, Field(ge=0, le=10)] = None
    redis_wait_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    # How long start-up waits for Redis (or a Sentinel to name the primary) before exit 2.
    redis_startup_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    # How long start-up waits for any server of TAGPIPE_NATS_URL before exit 2.
    nats_startup_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    # Dead peers: a server that hangs without a TCP reset is noticed by these bounds
    # (redis_io.RedisTimeouts, nats_io.NatsLiveness say what each one does).
    redis_socket_timeout_s: Annotated[float, Field(gt=0, le=300)] = RedisTimeouts.socket_timeout_s
    redis_connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = RedisTimeouts.connect_timeout_s
    redis_health_check_interval_s: Annotated[float, Field(gt=0, le=300)] = (
        RedisTimeouts.health_check_interval_s
    )
    nats_ping_interval_s: Annotated[float, Field(gt=0, le=300)] = NatsLiveness.ping_interval_s
    nats_max_outstanding_pings: Annotated[int, Field(ge=1, le=10)] = (
        NatsLiveness.max_outstanding_pings
    )
    nats_connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = NatsLiveness.connect_timeout_s
    prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")] = "tagpipe"
    result_ttl_s: Annotated[int, Field(ge=60, le=30 * 86400)] = 86400
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = True
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: no metrics listener

    # JetStream policy: set on purpose, since the server defaults bite (see README).
    ack_wait_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_deliver: Annotated[int, Field(ge=2, le=100)] = 5
    max_ack_pending: Annotated[int, Field(ge=1, le=100_000)] = 1000
    dedupe_window_s: Annotated[float, Field(ge=1, le=86400)] = 120.0
    max_msg_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 8 * 1024 * 1024
    stream_max_msgs: Annotated[int, Field(ge=-1)] = -1
    stream_replicas: Annotated[int, Field(ge=1, le=5)] = 1
    # How often (jittered) a worker reads its stage's MAX_DELIVERIES advisories, to
    # settle items whose last delivery died with a worker (stranded.py).
    stranded_poll_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    # Streams per stage (subjects.partition_names): publishers spread items over
    # them by item id, workers pull from every one. Streams, publishers and
    # workers must agree on it (the operator sets it from spec.nats.partitions).
    partitions: Annotated[int, Field(ge=1, le=MAX_PARTITIONS)] = 1
    # How long inference's tags answer byte-identical images (tagcache.py); the
    # switch is the downloader's TAGPIPE_CONTENT_DEDUPE.
    content_dedupe_ttl_s: Annotated[int, Field(ge=1, le=30 * 86400)] = 86400
    # Both tiers decode bulk images on threads this much nicer (0: the same priority),
    # so a real-time item's path and the model get the cores first (threads.py).
    bulk_decode_nice: Annotated[int, Field(ge=0, le=19)] = 10

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, v: str) -> str:
        for url in v.split(","):
            if not url.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url!r} is not a nats:// or tls:// URL")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        return check_redis_url(v)

    @model_validator(mode="after")
    def _socket_timeout_outlasts_blocking_commands(self) -> CommonSettings:
        # A command that blocks on the server by design (WAIT for replicas, XREAD
        # BLOCK) would otherwise time out while the server is well, every time.
        longest_ms = max(self.redis_wait_timeout_ms, XREAD_BLOCK_MS)
        if self.redis_socket_timeout_s * 1000 < longest_ms + 1000:
            raise ValueError(
                f"redis_socket_timeout_s ({self.redis_socket_timeout_s:g} s) must exceed the "
                f"longest blocking Redis command ({longest_ms} ms: TAGPIPE_REDIS_WAIT_TIMEOUT_MS "
                "or XREAD BLOCK) by at least 1 s"
            )
        return self

    def redis_timeouts(self) -> RedisTimeouts:
        return RedisTimeouts(
            self.redis_socket_timeout_s,
            self.redis_connect_timeout_s,
            self.redis_health_check_interval_s,
        )

    def nats_liveness(self) -> NatsLiveness:
        return NatsLiveness(
            self.nats_ping_interval_s, self.nats_max_outstanding_pings, self.nats_connect_timeout_s
        )

    def redis_durability(self) -> Durability:
        replicas = self.redis_wait_replicas
        if replicas is None:
            replicas = 1 if is_sentinel(self.redis_url) else 0
        return Durability(replicas, self.redis_wait_timeout_ms, f"{self.prefix}:wait-fence")

    @property
    def nats_servers(self) -> list[str]:
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


S = TypeVar("S", bound=BaseSettings)


# Start-up errors go to logs that more people read than hold the secrets: a
# setting named like a secret is not echoed, and a URL's user:password is masked.
_SECRET_NAMES = re.compile(r"password|secret|token|key|credential", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def _redact(text: str) -> str:
    return _USERINFO.sub(r"\1***@", text)


def describe_errors(cls: type[BaseSettings], exc: ValidationError) -> list[str]:
    """One human line per invalid setting, naming the environment variable; never
    the secret a bad value may hold."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "?"
        var = f"{prefix}{field}".upper()
        got = "<redacted>" if _SECRET_NAMES.search(field) else _redact(repr(err.get("input")))
        lines.append(f"invalid setting {var}={got}: {_redact(str(err['msg']))}")
    return lines


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment or stop start-up with a clear message."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        for line in describe_errors(cls, exc):
            print(f"{cls.__name__}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
