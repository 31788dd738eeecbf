"""Gateway settings: validated once at start-up in `main()` (TAGPIPE_ prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator
from tagpipe_common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080

    # Comma-separated keys; an entry `sha256:<hex>` is already a digest, so the
    # secret never needs to hold plain keys. Empty (and no file): auth is off.
    api_keys: SecretStr = SecretStr("")
    api_keys_file: Path | None = None

    max_urls_per_request: Annotated[int, Field(ge=1, le=1000)] = 32
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    max_url_length: Annotated[int, Field(ge=16, le=65536)] = 4096
    # A real-time request's deadline: the default, and the most a caller's
    # `timeout_ms` may ask for. Items carry it; a stage past it skips the item.
    realtime_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    # The moving window over which admission measures the pipeline's drain rate:
    # short, so a drop in throughput (a neighbour taking the cores) shows within
    # seconds (make bench-realtime: 5 s answered 83 % within 1 s at 3x, 2.5 s 100 %).
    drain_rate_window_s: Annotated[float, Field(gt=0, le=600)] = 2.5
    # The share of a deadline the expected wait may fill: the estimate is a mean
    # (Little's law over the queue ahead), the deadline a bound, and the item's own
    # download and inference come on top of its wait (0.75 left too little margin).
    admission_wait_share: Annotated[float, Field(gt=0, le=1)] = 0.6
    blob_ttl_s: Annotated[int, Field(ge=10)] = 600

    # Backpressure: real-time requests get 429 above the first limit; bulk
    # submission pauses above the second, which must be lower so that a big job
    # never pushes real-time traffic into 429s.
    realtime_backlog_limit: Annotated[int, Field(ge=1)] = 5000
    bulk_backlog_limit: Annotated[int, Field(ge=1)] = 2000
    backlog_cache_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Bulk publishes in flight at once (one batch awaited before the next).
    bulk_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    max_job_items: Annotated[int, Field(ge=1)] = 10_000_000
    job_ttl_s: Annotated[int, Field(ge=60)] = 7 * 86400
    # A gateway publishing a job renews this lease; if it dies, another resumes the job.
    lease_s: Annotated[int, Field(ge=2, le=600)] = 30
    recover_interval_s: Annotated[float, Field(gt=0, le=600)] = 10.0

    @model_validator(mode="after")
    def _limits_ordered(self) -> GatewaySettings:
        if self.bulk_backlog_limit > self.realtime_backlog_limit:
            raise ValueError(
                "bulk_backlog_limit must not exceed realtime_backlog_limit, "
                "or bulk jobs could starve real-time requests"
            )
        return self
