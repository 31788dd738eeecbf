"""The gateways' own load, where the operator reads it: a JetStream key-value bucket.

The gateway scales on the requests it is serving, not on the pipeline's queue backlog
(a backlog of bulk items costs a gateway nothing once they are published). Each gateway
puts its requests in flight under its own key every PERIOD_S; the bucket's TTL drops the
key of a gateway that died, and a gateway that exits deletes its key. The operator
already holds a NATS connection per pipeline for the backlogs, so this needs no pod
scraping (there is no kubelet in `make e2e`), no new credentials and no new client.

Why NATS rather than the workers' Redis pulse (pulse.py): the operator never connects to
Redis, and reading the pulse would give it a second store and its Secrets to reach.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

PERIOD_S = 2.0
TTL_S = 10.0  # five missed beats: the gateway is gone


def bucket_name(prefix: str) -> str:
    """One bucket per pipeline (prefix), as its streams are (subjects.stage_names)."""
    return f"{prefix.upper()}_GATEWAY_LOAD"


@dataclass(frozen=True)
class LoadReport:
    in_flight: int
    """HTTP requests waiting for their response (a real-time request until its tags
    are back, an upload until its job is stored); a stream counts until its headers."""
    at: float
    """Wall-clock seconds when the gateway read it."""

    def encode(self) -> bytes:
        return json.dumps({"in_flight": self.in_flight, "at": self.at}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LoadReport:
        d = json.loads(raw)
        return cls(int(d["in_flight"]), float(d["at"]))


def total_in_flight(reports: Iterable[LoadReport], now: float, ttl_s: float = TTL_S) -> int | None:
    """Requests in flight over the gateways that reported within `ttl_s`.

    None when none did: no gateway reports (none started yet, or the bucket is empty),
    which the scaler must read as unknown and hold, never as zero load.
    """
    fresh = [r.in_flight for r in reports if now - r.at <= ttl_s]
    return sum(fresh) if fresh else None


async def read_in_flight(js: Any, prefix: str, now: float | None = None) -> int | None:
    """The pipeline's gateway requests in flight from the bucket; None when unknown."""
    try:
        kv = await js.key_value(bucket_name(prefix))
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError, NotFoundError):
        return None
    reports = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except NotFoundError:  # deleted or expired between keys() and get()
            continue
        if entry.value:
            reports.append(LoadReport.decode(entry.value))
    return total_in_flight(reports, time.time() if now is None else now)
