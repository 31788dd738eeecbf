"""Downloader settings (environment variables with the TAGPIPE_ prefix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from tagpipe_common.settings import CommonSettings

from tagpipe_downloader.decode import Geometry
from tagpipe_downloader.fetch import FetchConfig
from tagpipe_downloader.guard import parse_cidrs


class DownloaderSettings(CommonSettings):
    # Concurrency
    max_inflight: Annotated[int, Field(ge=1, le=4096)] = 64
    fetch_batch: Annotated[int, Field(ge=1, le=256)] = 16
    decode_workers: Annotated[int, Field(ge=1, le=256)] = max(1, os.cpu_count() or 1)
    max_pending_publishes: Annotated[int, Field(ge=1, le=4096)] = 64

    # Fetching
    max_bytes: Annotated[int, Field(ge=1024)] = 20 * 1024 * 1024
    max_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    total_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_redirects: Annotated[int, Field(ge=0, le=20)] = 5
    fetch_retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_after_inline_max_s: Annotated[float, Field(ge=0)] = 2.0
    retry_after_max_s: Annotated[float, Field(gt=0)] = 60.0
    pool_limit: Annotated[int, Field(ge=1)] = 256
    pool_limit_per_host: Annotated[int, Field(ge=0)] = 32
    user_agent: str = "tagpipe-downloader/0.1"
    # Comma-separated CIDRs exempt from the private-address block (e.g. an
    # in-cluster image store). Empty: only public addresses are fetched.
    allow_cidrs: str = ""

    # Model geometry: from the manifest when given, else 256/224/bicubic.
    model_dir: Path | None = None
    manifest_path: Path | None = None

    # JetStream handling
    progress_interval_s: Annotated[float, Field(gt=0)] = 10.0  # < the download ack_wait
    transient_nak_delay_s: Annotated[float, Field(ge=0)] = 2.0
    infra_retry_budget_s: Annotated[float, Field(gt=0)] = 30.0
    job_state_cache_s: Annotated[float, Field(ge=0)] = 2.0
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    lane_poll_s: Annotated[float, Field(gt=0)] = 0.25

    # Process
    health_host: str = "0.0.0.0"
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081  # 0: no health server
    drain_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        try:
            parse_cidrs(v.split(","))
        except ValueError as exc:
            raise ValueError(f"not a list of CIDRs: {exc}") from None
        return v

    def geometry(self) -> Geometry:
        path = self.manifest_path or self.model_dir
        return Geometry.from_manifest(path) if path is not None else Geometry()

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(
            max_bytes=self.max_bytes,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            total_timeout_s=self.total_timeout_s,
            max_redirects=self.max_redirects,
            retries=self.fetch_retries,
            retry_after_inline_max_s=self.retry_after_inline_max_s,
            retry_after_max_s=self.retry_after_max_s,
            nak_delay_s=self.transient_nak_delay_s,
            pool_limit=self.pool_limit,
            pool_limit_per_host=self.pool_limit_per_host,
            user_agent=self.user_agent,
            allow=parse_cidrs(self.allow_cidrs.split(",")),
        )
