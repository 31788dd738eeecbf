"""The operator's I/O: converge children, read backlogs, apply scaling decisions.

Handlers (`handlers.py`) stay thin and call into here; the decisions themselves
are the pure `render()` and `decide()`. All state the scaler keeps lives in
`Runtime.scaling`, keyed by (namespace, name, stage). It is lost on restart,
which is safe: `decide()` refuses to scale down until it has seen a full
scale-down window again (see scaling.py), and replicas live in the Deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kopf
import nats
from nats.aio.client import Client
from tagpipe_common.gatewayload import read_in_flight
from tagpipe_common.nats_io import close_nats
from tagpipe_common.streams import (
    StreamPolicy,
    delete_streams,
    ensure_streams,
    stage_backlog,
    stage_counters,
    unread_partitions,
)
from tagpipe_common.subjects import Stage

from tagpipe_operator import flow, metrics
from tagpipe_operator.cache import ChildCache
from tagpipe_operator.children import Applied
from tagpipe_operator.kube import KubeClient, describe_api
from tagpipe_operator.leader import LeaderElector
from tagpipe_operator.ratemeter import Counters, MeterState, RateReading, observe
from tagpipe_operator.render import child_name
from tagpipe_operator.scaling import ScalingContext, ScalingDecision, ScalingState, decide
from tagpipe_operator.settings import OperatorSettings
from tagpipe_operator.spec import STAGES, TagPipelineSpec

log = logging.getLogger(__name__)

StateKey = tuple[str, str, str]


@dataclass
class Runtime:
    """Everything the handlers share, kept in kopf's memo."""

    settings: OperatorSettings
    preset: kopf.ConnectionInfo | None = None
    """Credentials given up front (tests); otherwise the login handler finds them."""
    connection: kopf.ConnectionInfo | None = None
    kube: KubeClient | None = None
    elector: LeaderElector | None = None
    """None only where no election runs (kmock tests drive one operator directly)."""
    cache: ChildCache | None = None
    applied: dict[tuple[str, str], Applied] = field(default_factory=dict)
    nats: dict[str, Client] = field(default_factory=dict)
    nats_errors: dict[str, str] = field(default_factory=dict)
    """The last connection error per URL: what a bare timeout was really waiting on."""
    streams_ready: dict[tuple[str, str], tuple[str, str, int]] = field(default_factory=dict)
    """(namespace, name) -> (url, prefix) whose streams are known to exist."""
    scaling: dict[StateKey, ScalingState] = field(default_factory=dict)
    meters: dict[StateKey, MeterState] = field(default_factory=dict)
    """Each stage's recent JetStream counter readings, for its rates (ratemeter.py)."""
    ticking: dict[str, asyncio.Lock] = field(default_factory=dict)
    """Per pipeline uid, held for a whole scaling tick (see `retire`)."""
    retired: set[str] = field(default_factory=set)
    """uids being deleted: the loop's snapshot of a pipeline can lag its deletion."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closing: bool = False
    """Set by close(): our own disconnects are not worth a WARNING."""

    def client(self) -> KubeClient:
        if self.kube is None:
            if self.connection is None:
                raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
            self.kube = KubeClient.from_connection(self.connection)
        return self.kube

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading

    def children(self) -> ChildCache:
        """The informer cache, started on first use (it needs the login's credentials)."""
        if self.cache is None:
            self.cache = ChildCache(self.settings.namespace)
            self.tasks.extend(self.cache.tasks(self.client))
        return self.cache

    def tick_lock(self, uid: str) -> asyncio.Lock:
        return self.ticking.setdefault(uid, asyncio.Lock())

    async def retire(self, uid: str) -> None:
        """Wait out a tick in flight for `uid` and keep later ones off it.

        A tick begun on a snapshot taken before the deletion would otherwise
        re-ensure the streams the delete handler has just removed.
        """
        async with self.tick_lock(uid):
            self.retired.add(uid)
        self.ticking.pop(uid, None)

    async def close(self) -> None:
        self.closing = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        for nc in self.nats.values():  # a dead NATS must not block shutdown
            await close_nats(nc, self.settings.nats_timeout_s)
        self.nats.clear()
        if self.kube is not None:
            await self.kube.close()


async def nats_url(rt: Runtime, namespace: str, spec: TagPipelineSpec) -> str:
    ref = spec.nats.credentials_secret_ref
    if ref is None:
        return spec.nats.url
    return await rt.client().secret_value(namespace, ref.name, ref.key)


def redact(url: str) -> str:
    """A NATS URL fit for a log line: user and password dropped."""
    parts = []
    for one in url.split(","):
        u = urlsplit(one.strip())
        host = u.hostname or ""
        netloc = f"{host}:{u.port}" if u.port else host
        parts.append(urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment)))
    return ",".join(parts)


def describe(exc: BaseException) -> str:
    """One line for a log or a condition: the reason, never a traceback."""
    return describe_api(exc)


def _callbacks(rt: Runtime, url: str) -> dict[str, Any]:
    """nats-py's default error callback logs a traceback at ERROR on every reconnect
    attempt (twice a second against a dead server). Keep the reason for the tick's
    one WARNING line instead, and log a disconnect once per episode."""

    async def on_error(exc: Exception) -> None:
        rt.nats_errors[url] = describe(exc)
        log.debug("nats %s: %s", redact(url), describe(exc))

    async def on_disconnect() -> None:
        if not rt.closing:
            log.warning("nats %s disconnected; reconnecting", redact(url))

    async def on_reconnect() -> None:
        rt.nats_errors.pop(url, None)
        log.info("nats %s reconnected", redact(url))

    return {"error_cb": on_error, "disconnected_cb": on_disconnect, "reconnected_cb": on_reconnect}


async def jetstream(rt: Runtime, url: str) -> Any:
    """A cached connection per URL; bounded, so a dead NATS never hangs a handler."""
    nc = rt.nats.get(url)
    if nc is None or nc.is_closed:
        # Bounded as a whole: nats-py retries a refused first connect forever
        # (max_reconnect_attempts=-1), and a dead NATS must fail fast here.
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[u.strip() for u in url.split(",")],
                name="tagpipe-operator",
                connect_timeout=rt.settings.nats_timeout_s,
                max_reconnect_attempts=-1,  # once connected, ride out NATS restarts
                reconnect_time_wait=0.5,
                **rt.settings.nats_liveness().options(),  # a frozen server: stale in ~9 s
                **_callbacks(rt, url),
            ),
            timeout=rt.settings.nats_timeout_s,
        )
        rt.nats[url] = nc
        rt.nats_errors.pop(url, None)
    return nc.jetstream(timeout=rt.settings.nats_timeout_s)


def nats_problem(rt: Runtime, url: str, exc: BaseException) -> str:
    """'NATS <url>: <reason>', the reason being the last connect error when there is one."""
    return f"NATS {redact(url)}: {rt.nats_errors.get(url) or describe(exc)}"


def stream_policy(rt: Runtime, spec: TagPipelineSpec) -> StreamPolicy:
    return flow.stream_policy(rt.settings, spec)


async def ensure_pipeline_streams(
    rt: Runtime, namespace: str, spec: TagPipelineSpec, name: str | None = None
) -> dict[str, int]:
    """Ensure the streams; returns the partitions past spec.nats.partitions that
    still hold messages (a lowered count), which no worker reads."""
    url = await nats_url(rt, namespace, spec)
    js, policy = await jetstream(rt, url), stream_policy(rt, spec)
    await ensure_streams(js, policy)
    if name is not None:
        rt.streams_ready[(namespace, name)] = _streams_key(url, spec)
    return await unread_partitions(js, policy)


async def try_ensure_streams(rt: Runtime, namespace: str, name: str, spec: TagPipelineSpec) -> str:
    """Ensure the streams, or say why not: an unreachable NATS is retried by the
    scaling loop every tick (one WARNING there), not by failing the handler, which
    kopf would log at ERROR on every retry."""
    try:
        async with asyncio.timeout(rt.settings.nats_timeout_s * 2):
            unread = await ensure_pipeline_streams(rt, namespace, spec, name)
    except Exception as exc:
        problem = nats_problem(rt, spec.nats.url, exc)
        log.warning("TagPipeline %s/%s: streams not ensured yet, %s", namespace, name, problem)
        return f"pending: {problem}"
    if unread:
        held = ", ".join(f"{s} ({n:,})" for s, n in sorted(unread.items()))
        msg = (
            f"ensured; streams past spec.nats.partitions={spec.nats.partitions} still hold "
            f"messages no worker reads: {held}; raise partitions until they drain"
        )
        log.warning("TagPipeline %s/%s: %s", namespace, name, msg)
        return msg
    return "ensured"


def _streams_key(url: str, spec: TagPipelineSpec) -> tuple[str, str, int]:
    """What the ensured streams depend on: a change re-ensures them (a new partition)."""
    return url, spec.nats.prefix, spec.nats.partitions


async def remove_streams(rt: Runtime, namespace: str, spec: TagPipelineSpec) -> list[str]:
    js = await jetstream(rt, await nats_url(rt, namespace, spec))
    return await delete_streams(js, spec.nats.prefix, spec.nats.partitions)


@dataclass(frozen=True)
class Backlogs:
    by_stage: dict[str, int | None]
    """Backlog per operator stage; None where it could not be read (never a guess)."""
    problem: str | None = None
    """Why it could not be read ('NATS <url>: <reason>'), for the log and the condition."""


async def read_backlogs(
    rt: Runtime, namespace: str, spec: TagPipelineSpec, name: str = ""
) -> Backlogs:
    """Backlog per operator stage, ensuring the streams first if converge could not.

    The gateway's entry is not a backlog: it scales on its own load, the requests in
    flight its replicas report (tagpipe_common.gatewayload; None: no report).
    Any failure means "unknown": the caller holds replicas, flags and logs it.
    """
    out: dict[str, int | None] = {"downloader": None, "inference": None, "gateway": None}
    url = spec.nats.url
    try:
        async with asyncio.timeout(rt.settings.nats_timeout_s * 2):
            url = await nats_url(rt, namespace, spec)
            js = await jetstream(rt, url)
            if rt.streams_ready.get((namespace, name)) != _streams_key(url, spec):
                await ensure_pipeline_streams(rt, namespace, spec, name)
            parts = spec.nats.partitions
            out["downloader"] = await stage_backlog(js, Stage.DOWNLOAD, spec.nats.prefix, parts)
            out["inference"] = await stage_backlog(js, Stage.INFER, spec.nats.prefix, parts)
    except Exception as exc:  # transient or not, the answer is the same: hold and say why
        return Backlogs(out, nats_problem(rt, url, exc))
    # A bucket or report that cannot be read leaves the gateway's load unknown only.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(rt.settings.nats_timeout_s):
            out["gateway"] = await read_in_flight(js, spec.nats.prefix)
    return Backlogs(out)


RATE_STAGES = {"downloader": Stage.DOWNLOAD, "inference": Stage.INFER}


async def read_rates(
    rt: Runtime, key: StateKey, spec: TagPipelineSpec, stage: str, fresh: bool
) -> RateReading | None:
    """The stage's traffic over its rate window, or None when its rate term is off.

    Reads only when this tick's backlog read worked (`fresh`): with NATS down a
    second read would only wait out another timeout. A failed read adds no
    reading, so the rates age and decide() falls back to the backlog rule.
    """
    policy, js_stage = spec.stage(stage).scaling_policy(), RATE_STAGES.get(stage)
    if js_stage is None or policy.in_flight_per_replica is None:
        return None
    reading = None
    if fresh:
        try:
            async with asyncio.timeout(rt.settings.nats_timeout_s * 2):
                js = await jetstream(rt, await nats_url(rt, key[0], spec))
                c = await stage_counters(js, js_stage, spec.nats.prefix, spec.nats.partitions)
            reading = Counters(time.monotonic(), c.published, c.removed, c.pending, c.ack_pending)
        except Exception as exc:  # the rates age; decide() ignores them once stale
            log.debug("counter read failed for %s: %s", "/".join(key), describe(exc))
    rt.meters[key], rates = observe(rt.meters.get(key, MeterState()), reading, policy.rate_window_s)
    return rates


async def scale_stage(
    rt: Runtime, body: Mapping[str, Any], spec: TagPipelineSpec, stage: str, backlog: int | None
) -> tuple[ScalingDecision, int] | None:
    """Decide and apply one stage's replicas. None when its Deployment is missing."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    dep = child_name(name, stage)
    got = rt.children().get("Deployment", ns, dep)
    if got is None:
        return None
    current = int((got.get("spec") or {}).get("replicas") or 0)
    ready = int((got.get("status") or {}).get("readyReplicas") or 0)
    key = (ns, name, stage)
    rates = await read_rates(rt, key, spec, stage, fresh=backlog is not None)
    ctx = ScalingContext(
        now=time.monotonic(),
        backlog=backlog,
        current_replicas=current,
        policy=spec.stage(stage).scaling_policy(),
        state=rt.scaling.get(key, ScalingState()),
        ready_replicas=ready,
        rates=rates,
    )
    decision = decide(ctx)
    rt.scaling[key] = decision.state
    if decision.changed:
        await rt.client().set_replicas(ns, dep, decision.desired_replicas)
        try:  # best effort: a lost Event must not undo a tick
            await rt.client().post_event(
                dict(body), "Normal", decision.reason.value, f"{stage}: {decision.message}"
            )
        except Exception as exc:
            log.warning("could not post scale event: %s", describe(exc))
        metrics.SCALE_EVENTS.labels(stage, decision.direction, decision.reason.value).inc()
    labels = (ns, name, stage)
    metrics.DESIRED.labels(*labels).set(decision.desired_replicas)
    metrics.CURRENT.labels(*labels).set(current)
    if backlog is not None:
        metrics.BACKLOG.labels(*labels).set(backlog)
    else:
        metrics.METRICS_STALE.labels(stage).inc()
    return decision, ready


def forget(rt: Runtime, namespace: str, name: str) -> None:
    rt.streams_ready.pop((namespace, name), None)
    rt.applied.pop((namespace, name), None)
    for stage in STAGES:
        rt.scaling.pop((namespace, name, stage), None)
        rt.meters.pop((namespace, name, stage), None)
        for g in (metrics.BACKLOG, metrics.DESIRED, metrics.CURRENT):
            with contextlib.suppress(KeyError):
                g.remove(namespace, name, stage)
