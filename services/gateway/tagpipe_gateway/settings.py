"""Gateway settings: validated once at start-up in `main()` (TAGPIPE_ prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from tagpipe_common.netguard import checked_cidr_list
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
    # A real-time request's deadline: the most a caller's `timeout_ms` may ask for,
    # and the deadline of a request that asks for none. Items carry it; a stage past
    # it skips the item. The default is short on purpose: a real-time caller wants an
    # answer (or a 429 to retry elsewhere) in seconds, and a 30 s hold under overload
    # is neither (issue 28: p95 14.6 s at 2-3x load with the old 30 s default).
    realtime_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    realtime_default_timeout_s: Annotated[float, Field(gt=0, le=600)] = 2.0
    # The moving window over which admission measures the pipeline's drain rate:
    # short, so a drop in throughput (a neighbour taking the cores) shows within
    # seconds (make bench-realtime: 5 s answered 83 % within 1 s at 3x, 2.5 s 100 %).
    drain_rate_window_s: Annotated[float, Field(gt=0, le=600)] = 2.5
    # The share of a deadline the expected wait may fill: the estimate is a mean
    # (Little's law over the queue ahead), the deadline a bound, and the item's own
    # download and inference come on top of its wait (0.75 left too little margin).
    admission_wait_share: Annotated[float, Field(gt=0, le=1)] = 0.6
    blob_ttl_s: Annotated[int, Field(ge=10)] = 600

    # Backpressure. Real-time requests get 429 when more real-time items than the
    # first limit are ahead (a hard ceiling behind admission by expected wait); bulk
    # work is on its own lane and never counts against it. Bulk submission pauses
    # while the pipeline holds more than it drains in `bulk_target_wait_s` at its
    # measured rate (admission.bulk_limit); `bulk_backlog_limit` is the floor of
    # that limit, and the limit itself until a rate is measured. 30 s on this box's
    # ~66 img/s is the 2,000 items the fixed limit used to be.
    realtime_backlog_limit: Annotated[int, Field(ge=1)] = 5000
    bulk_backlog_limit: Annotated[int, Field(ge=1)] = 2000
    bulk_target_wait_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    backlog_cache_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Bulk publishes in flight at once (one batch awaited before the next).
    bulk_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    max_job_items: Annotated[int, Field(ge=1)] = 10_000_000
    job_ttl_s: Annotated[int, Field(ge=60)] = 7 * 86400
    # A gateway publishing a job renews this lease; if it dies, another resumes the job.
    lease_s: Annotated[int, Field(ge=2, le=600)] = 30
    recover_interval_s: Annotated[float, Field(gt=0, le=600)] = 10.0

    # Manifest jobs (manifest.py): lines parsed, published and checkpointed together;
    # the distinct URLs remembered for `duplicate_url` (about 110 bytes each, per job
    # being read); the items per output shard. A manifest's https:// source and a
    # job's notify_url pass the SSRF guard, with `allow_cidrs` exempt.
    manifest_chunk_items: Annotated[int, Field(ge=1, le=100_000)] = 1000
    manifest_dedupe_window: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    # Redis stages up to a shard's lines (about 400 B each with 5 tags) until the sink
    # writes it, so the shard size bounds a job's Redis peak: 1,000 keeps a 20,000-item
    # job's peak within 1.2x of a 5,000-item one's (10,000 would hold 4 MB per open
    # shard, and a job's peak would grow with the job up to 10,000 items).
    shard_size: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    # The reader pauses while more complete shards than this wait for the sink: a sink
    # slower than the workers (a slow object store, a busy gateway) would otherwise let
    # a job's staged lines in Redis grow with the job instead of with what is in flight.
    sink_max_ready_shards: Annotated[int, Field(ge=1, le=10_000)] = 4

    # An Idempotency-Key is held while its upload runs (renewed every third of this,
    # so a long upload keeps it and a gateway dying mid-upload frees it this soon),
    # then for the job's life.
    idempotency_upload_lock_s: Annotated[float, Field(gt=0, le=3600)] = 60.0

    # Completion webhooks (webhook.py). Deliveries are signed with this secret
    # (HMAC-SHA256, header Tagpipe-Signature); empty: sent unsigned, with a warning.
    webhook_secret: SecretStr = SecretStr("")
    webhook_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0  # one attempt
    webhook_poll_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # a running job's next look
    webhook_tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0  # how often due jobs are claimed
    webhook_backoff_base_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    webhook_backoff_max_s: Annotated[float, Field(gt=0, le=86400)] = 3600.0
    # Retries end this long after the first attempt; the job then reads notify.state=failed.
    webhook_give_up_s: Annotated[float, Field(gt=0, le=30 * 86400)] = 3 * 86400.0
    # Comma-separated CIDRs exempt from the SSRF guard's private-address block for the
    # gateway's own outbound connections (webhooks; tests and in-cluster receivers).
    allow_cidrs: str = ""

    @property
    def default_deadline_s(self) -> float:
        """The deadline of a request without `timeout_ms`: never above the maximum
        (a maximum set below 2 s lowers it; a default set above it is refused)."""
        return min(self.realtime_default_timeout_s, self.realtime_timeout_s)

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        return checked_cidr_list(v)

    @model_validator(mode="after")
    def _default_deadline_within_the_maximum(self) -> GatewaySettings:
        asked = "realtime_default_timeout_s" in self.model_fields_set
        if asked and self.realtime_default_timeout_s > self.realtime_timeout_s:
            raise ValueError(
                f"realtime_default_timeout_s ({self.realtime_default_timeout_s:g} s) must not "
                f"exceed realtime_timeout_s ({self.realtime_timeout_s:g} s), the most a "
                "caller may ask for"
            )
        return self

    @model_validator(mode="after")
    def _limits_ordered(self) -> GatewaySettings:
        if self.bulk_backlog_limit > self.realtime_backlog_limit:
            raise ValueError(
                "bulk_backlog_limit must not exceed realtime_backlog_limit, "
                "or bulk jobs could starve real-time requests"
            )
        return self
