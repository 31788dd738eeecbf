"""Helpers for the fault-injection tests: the stack's configuration, job accounting
and process memory. What these tests are, and why they are opt-in: see conftest.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from tagpipe_cli.stack import Service, Stack, StackConfig
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import close_nats
from tagpipe_common.redis_io import connect_redis_sync
from tagpipe_common.streams import StreamPolicy
from tagpipe_common.subjects import LANES, Stage, stage_names
from tagpipe_gateway.submit import item_id_for

from bench.imageserver import ImageServer
from tests.tools import MODEL_DIR, ROOT

RESULTS_FILE = ROOT / "bench" / "results" / "faults.json"
KEYS = RedisKeys("tagpipe")

ACK_WAIT_S = 4.0
DOWNLOAD_ACK_WAIT_S = 6.0
MAX_DELIVER = 8


def image_urls(images: ImageServer, n: int, tag: str, size: str = "320x240") -> list[str]:
    """n distinct URLs (a query string per item) over 16 cached generated JPEGs."""
    return [images.url(f"/corpus/{size}/{i % 16}.jpg?t={tag}&i={i}") for i in range(n)]


def fault_config(tmp: Path, **over: Any) -> StackConfig:
    max_deliver = over.pop("max_deliver", MAX_DELIVER)
    policy = StreamPolicy(
        prefix="tagpipe",
        ack_wait_s=ACK_WAIT_S,
        max_deliver=max_deliver,
        ack_wait_overrides={Stage.DOWNLOAD: DOWNLOAD_ACK_WAIT_S},
        max_msgs=over.pop("max_msgs", -1),
    )
    cfg = StackConfig(
        data_dir=tmp,
        model_dir=MODEL_DIR,
        downloaders=2,
        inference=2,
        policy=policy,
        allow_cidrs="127.0.0.0/8",  # the image server is local
        env={"TAGPIPE_ACK_WAIT_S": str(ACK_WAIT_S), "TAGPIPE_MAX_DELIVER": str(max_deliver)},
        gateway_env={
            "TAGPIPE_REALTIME_TIMEOUT_S": "60",
            "TAGPIPE_REALTIME_DEFAULT_TIMEOUT_S": "60",
            "TAGPIPE_LEASE_S": "4",
            "TAGPIPE_RECOVER_INTERVAL_S": "1",
        },
        downloader_env={
            "TAGPIPE_DECODE_WORKERS": "1",
            "TAGPIPE_PROGRESS_INTERVAL_S": "1.5",
            "TAGPIPE_TRANSIENT_NAK_DELAY_S": "0.5",
            "TAGPIPE_DRAIN_TIMEOUT_S": "10",
        },
        inference_env={"TAGPIPE_INTRA_OP_THREADS": "1", "TAGPIPE_NAK_DELAY_S": "0.5"},
    )
    for name, value in over.items():
        if name.endswith("env"):  # add to the defaults above rather than replace them
            value = {**getattr(cfg, name), **value}
        setattr(cfg, name, value)
    return cfg


def service(stack: Stack, name: str) -> Service:
    return next(s for s in stack.services if s.name == name)


def redelivered_duplicates(stack: Stack) -> int:
    """Results the store refused as repeats (SET NX lost): redeliveries that were absorbed."""
    return sum(
        s.log_path.read_text(errors="replace").count("duplicate result")
        for s in stack.services
        if s.name.startswith("inference") and s.log_path.exists()
    )


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def process_rss(stack: Stack) -> dict[str, int]:
    """VmRSS (KiB) of every live process of the stack, servers included."""
    out = {}
    for svc in stack.services:
        if svc.alive and svc.proc is not None:
            out[svc.name] = rss_kb(svc.proc.pid)
    for srv in stack.server_processes:
        if srv.proc is not None and srv.proc.poll() is None:
            out[f"{srv.name}-{srv.port}" if srv.name in out else srv.name] = rss_kb(srv.proc.pid)
    return out


def submit_job(http: httpx.Client, urls: list[str]) -> str:
    lines = "".join(json.dumps({"url": u, "id": f"c{i}"}) + "\n" for i, u in enumerate(urls))
    r = http.post("/v1/jobs", content=lines, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def job_status(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's status, riding out the moments a restarting server makes it 503."""
    while True:
        try:
            r = http.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            time.sleep(0.3)  # the gateway itself is restarting
            continue
        if r.status_code == 503:
            time.sleep(0.3)
            continue
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def wait_finished(http: httpx.Client, job_id: str, at_least: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while job_status(http, job_id)["finished"] < at_least:
        assert time.monotonic() < deadline, f"job {job_id} never reached {at_least} finished"
        time.sleep(0.1)


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(http, job_id)
        if status["state"] in ("completed", "cancelled") and status["finished"] == status["total"]:
            return status
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {status}"
        time.sleep(0.3)


@dataclass
class Accounting:
    submitted: int
    status: dict[str, Any]
    stream_len: int
    distinct_items: int
    distinct_clients: int
    result_keys: int
    ok: int
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def resulted(self) -> int:
        return self.distinct_items


def consumer_states(stack: Stack) -> dict[str, dict[str, int]]:
    """Pending / unacked / redelivered per durable consumer (for failure messages)."""
    urls = stack.nats_url.split(",")

    async def read() -> dict[str, dict[str, int]]:
        nc = await nats.connect(servers=urls)
        js, out = nc.jetstream(), {}
        try:
            for stage in Stage:
                for lane in LANES:
                    names = stage_names(stage)
                    info = await js.consumer_info(names.stream, names.consumer(lane))
                    out[names.consumer(lane)] = {
                        "pending": int(info.num_pending or 0),
                        "ack_pending": int(info.num_ack_pending or 0),
                        "redelivered": int(info.num_redelivered or 0),
                    }
        finally:
            await close_nats(nc)
        return out

    return asyncio.run(read())


def missing_items(stack: Stack, job_id: str, n: int) -> list[str]:
    ids = [item_id_for(job_id, f"c{i}", i) for i in range(n)]
    r = connect_redis_sync(stack.redis_url)
    try:
        return [i for i, v in zip(ids, r.mget([KEYS.result(i) for i in ids]), strict=True) if not v]
    finally:
        r.close()


def account(stack: Stack, http: httpx.Client, job_id: str, submitted: int) -> Accounting:
    """Every way of counting a job's results, straight from Redis and the API."""
    try:
        status = wait_job(http, job_id)
    except AssertionError as exc:
        missing = missing_items(stack, job_id, submitted)[:10]
        raise AssertionError(f"{exc}\nmissing: {missing}\n{consumer_states(stack)}") from None
    r = connect_redis_sync(stack.redis_url)
    try:
        entries = r.xrange(KEYS.job_results(job_id))
        results = [json.loads(fields[b"r"]) for _, fields in entries]
        items = {x["item_id"] for x in results}
        keys = r.mget([KEYS.result(i) for i in items]) if items else []
    finally:
        r.close()
    codes: dict[str, int] = {}
    for x in results:
        if x["status"] != "ok":
            codes[x["code"]] = codes.get(x["code"], 0) + 1
    return Accounting(
        submitted=submitted,
        status=status,
        stream_len=len(entries),
        distinct_items=len(items),
        distinct_clients=len({x["client_item_id"] for x in results}),
        result_keys=sum(k is not None for k in keys),
        ok=sum(x["status"] == "ok" for x in results),
        codes=codes,
    )


def assert_exactly_once(acc: Accounting) -> None:
    s = acc.status
    n = acc.submitted
    assert s["total"] == n, s
    assert s["done"] + s["failed"] + s["cancelled"] == n, s
    assert acc.stream_len == n, f"{acc.stream_len} results in the job stream for {n} items"
    assert acc.distinct_items == n and acc.distinct_clients == n, acc
    assert acc.result_keys == n, acc
    assert acc.ok == s["done"], acc


class RealtimeLoad:
    """Real-time calls in a thread alongside a fault: every answer must be a 200, or a
    503/429 problem+json with Retry-After (never a 500, never a hang past the client's
    timeout)."""

    def __init__(self, gateway_url: str, image_url: str, every_s: float = 0.25) -> None:
        self.gateway_url, self.image_url, self.every_s = gateway_url, image_url, every_s
        self.statuses: list[int] = []
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="realtime-load", daemon=True)

    def __enter__(self) -> RealtimeLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    @property
    def answers(self) -> int:
        return len(self.statuses)

    def counts(self) -> dict[str, int]:
        return {str(s): self.statuses.count(s) for s in sorted(set(self.statuses))}

    def _run(self) -> None:
        with httpx.Client(base_url=self.gateway_url, timeout=90) as http:
            while not self._stop.wait(self.every_s):
                try:
                    r = http.post("/v1/tags", json={"url": self.image_url})
                except httpx.TransportError as exc:
                    self.bad.append(f"no answer: {exc!r}")
                    continue
                self.statuses.append(r.status_code)
                problem = r.headers.get("content-type") == "application/problem+json"
                told_when = "retry-after" in r.headers
                if r.status_code != 200 and not (r.status_code in (429, 503) and problem):
                    self.bad.append(f"{r.status_code} {r.text[:200]}")
                elif r.status_code != 200 and not told_when:
                    self.bad.append(f"{r.status_code} without Retry-After: {r.text[:200]}")


def outage_warnings(stack: Stack) -> dict[str, int]:
    """Per service, the outage episodes it logged (one WARNING line each)."""
    return {
        s.name: s.log_path.read_text(errors="replace").count("unavailable, retrying with backoff")
        for s in stack.services
        if s.log_path.exists()
    }


class Progress:
    """The job's finished count sampled in a thread: when the job moved, and when not."""

    def __init__(self, gateway_url: str, job_id: str) -> None:
        self.gateway_url, self.job_id = gateway_url, job_id
        self.moves: list[float] = []  # monotonic times at which `finished` grew
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        last = -1
        with httpx.Client(base_url=self.gateway_url, timeout=30) as http:
            while not self._stop.wait(0.1):
                finished = int(job_status(http, self.job_id)["finished"])
                if finished > last:
                    self.moves.append(time.monotonic())
                    last = finished

    def stall_s(self, start: float, end: float) -> float:
        """The longest time without a finished item that overlaps [start, end]."""
        moves = [*self.moves, time.monotonic()]
        gaps = [b - a for a, b in itertools.pairwise(moves) if b >= start and a <= end]
        return round(max(gaps, default=0.0), 2)


def deliveries(stack: Stack) -> int:
    """Repeated deliveries so far: every delivery (each gets a consumer sequence
    number, redeliveries included) less the messages delivered for the first time
    (stored ever, less those still pending), over both streams."""
    urls = stack.nats_url.split(",")

    async def read() -> int:
        nc = await nats.connect(servers=urls, connect_timeout=2)
        js, total = nc.jetstream(timeout=5), 0
        try:
            for stage in Stage:
                names = stage_names(stage)
                stream = await js.stream_info(names.stream)
                infos = [await js.consumer_info(names.stream, names.consumer(ln)) for ln in LANES]
                delivered = sum(int(c.delivered.consumer_seq or 0) for c in infos)
                pending = sum(int(c.num_pending or 0) for c in infos)
                total += delivered - (int(stream.state.last_seq or 0) - pending)
        finally:
            await close_nats(nc)
        return total

    for _ in range(50):  # a leader election in progress answers nothing for a moment
        try:
            return asyncio.run(read())
        except Exception:
            time.sleep(0.5)
    raise AssertionError("JetStream counters unreadable for 25 s")
