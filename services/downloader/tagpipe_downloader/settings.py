"""Downloader settings (environment variables with the TAGPIPE_ prefix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from tagpipe_common.netguard import checked_cidr_list, parse_cidrs
from tagpipe_common.settings import CommonSettings

from tagpipe_downloader.decode import Geometry
from tagpipe_downloader.fetch import FetchConfig
from tagpipe_downloader.hop import HopEncoding


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: affinity, capped by a cgroup v2 CPU quota.

    os.cpu_count() in a pod is the node's cores; a 1-core limit on a 16-core node
    would otherwise get 16 decode threads fighting over one core's quota.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus or 1, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


_CPUS = usable_cpus()

# Items in flight per core: fetching, waiting for a decode thread, or decoding.
# Fetch latency is the small part (50 ms x ~30 img/s per core is ~2 items);
# the rest is a buffer in front of the decode threads. A 12 MP photo costs ~10x
# a thumbnail, and they arrive in clumps, so with a shallow buffer the threads
# run dry between clumps: on 2 cores `make bench` got 45-49 img/s at 16-32 in
# flight (1.56 of 2 cores busy), 56 at 64 and 60 at 128 (1.85 cores, CPU-bound).
# The decode queue is lane-ordered, so depth no longer costs real-time latency
# (p50 ~0.3 s at every depth). The cost is memory: fetched bodies (up to
# max_bytes each, ~0.8 MB on that corpus) wait in it.
INFLIGHT_PER_CPU = 32


class DownloaderSettings(CommonSettings):
    # Concurrency: derived from the cores this process sees (see INFLIGHT_PER_CPU).
    max_inflight: Annotated[int, Field(ge=1, le=4096)] = min(256, INFLIGHT_PER_CPU * _CPUS)
    fetch_batch: Annotated[int, Field(ge=1, le=256)] = 16
    decode_workers: Annotated[int, Field(ge=1, le=256)] = _CPUS  # decode is CPU: a thread a core
    max_pending_publishes: Annotated[int, Field(ge=1, le=4096)] = 64

    # Fetching
    max_bytes: Annotated[int, Field(ge=1024)] = 20 * 1024 * 1024
    max_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    total_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # one attempt
    # Every attempt at one item together, across redeliveries: a trickling
    # server ends as a final download_timeout by then (see deadline.py).
    item_deadline_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
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

    # gpu: forward camera JPEGs compressed (shrunk if large) for the inference
    # tier's GPU to decode (forward.py); cpu: decode and crop here.
    decode: Literal["cpu", "gpu"] = "cpu"
    # decode: cpu: how the crop crosses to inference (hop.py; bench/results/hop-encoding.json):
    # raw, jpeg, webp-lossless, or original (small JPEGs as downloaded, the rest raw).
    hop_encoding: HopEncoding = "raw"

    # Answer bytes this model version tagged within TAGPIPE_CONTENT_DEDUPE_TTL_S
    # from the tag cache (dedupe.py). Off by default: `cached: true` and the
    # quicker answer tell a caller that someone tagged the same bytes lately,
    # which a multi-tenant deployment may not want, and the cache costs Redis
    # memory to size first (docs/dedupe.md).
    content_dedupe: bool = False

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
        return checked_cidr_list(v)

    def geometry(self) -> Geometry:
        path = self.manifest_path or self.model_dir
        return Geometry.from_manifest(path) if path is not None else Geometry()

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(
            max_bytes=self.max_bytes,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            total_timeout_s=self.total_timeout_s,
            item_deadline_s=self.item_deadline_s,
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
