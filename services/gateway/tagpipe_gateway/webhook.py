"""Completion webhooks: one signed POST to a job's `notify_url` when it ends.

Delivery is at least once and survives the gateway that created the job:
- A job with a `notify_url` is watched in a Redis sorted set (`keys.notify_due`),
  scored by when it is next due. Every gateway claims due jobs with one script
  that moves their score a lease ahead, so one gateway works on a job at a time
  and a gateway that dies mid-delivery leaves it due again when the lease ends.
- A job not over yet is looked at again `webhook_poll_s` later (a cancel makes it
  due at once); per job, never per item. A job with an output is over once its
  `_manifest.json` is written (`manifest_at`), so the event can point at it.
- The first attempt freezes the event (its body and id) in the job hash, so every
  retry sends the same bytes; receivers dedupe on `Tagpipe-Event-Id`.
- A failure (connect error, timeout, any answer but 2xx) is retried with
  exponential backoff and full jitter until `webhook_give_up_s` after the first
  attempt; then the job records `notify.state = failed`. A URL the SSRF guard
  refuses (checked again at every send, after a fresh DNS lookup) fails at once; a
  host that does not resolve is retried.

Signature (Stripe's scheme): `Tagpipe-Signature: t=<unix seconds>,v1=<hex>` where
`hex = HMAC-SHA256(secret, f"{t}.{body}")`, the secret being `TAGPIPE_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from tagpipe_common import keys as K
from tagpipe_common.errors import ErrorCode, PermanentError, RetryableError
from tagpipe_common.keys import RedisKeys
from tagpipe_common.nats_io import cancel_until_done
from tagpipe_common.netguard import (
    IPNetwork,
    literal_ip,
    parse_cidrs,
    resolve_vetted,
)
from tagpipe_common.objectstore import tls_verify
from tagpipe_common.outage import describe

from tagpipe_gateway import __version__
from tagpipe_gateway.schemas import JobEvent, JobNotify, JobStatus
from tagpipe_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Tagpipe-Signature"
EVENT_ID_HEADER = "Tagpipe-Event-Id"
EVENT_HEADER = "Tagpipe-Event"
ATTEMPT_HEADER = "Tagpipe-Delivery-Attempt"
_CLAIM_BATCH = 20

# Claim up to ARGV[3] due jobs: each moves a lease ahead (ARGV[2]) in one step.
_CLAIM_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, job in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job)
end
return due
"""

Status = Callable[[str], Awaitable[JobStatus | None]]


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Tagpipe-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """A receiver's check: the signature matches and is recent (refuses replays)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    # As bytes: compare_digest raises on a str with non-ASCII characters (a forged header).
    return hmac.compare_digest(sign(secret, timestamp, body).encode(), header.encode())


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter before attempt `attempt + 1`
    (AWS Architecture Blog, "Exponential Backoff And Jitter")."""
    return random.uniform(0, min(max_s, base_s * 2 ** (attempt - 1)))


def check_notify_url(url: str) -> httpx.URL:
    """Syntax checks (http/https, a host, no credentials); PermanentError(invalid_url)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise PermanentError(ErrorCode.INVALID_URL, f"unparseable URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise PermanentError(ErrorCode.INVALID_URL, f"scheme {parsed.scheme!r} not allowed")
    if not parsed.host or "%" in parsed.host:
        raise PermanentError(ErrorCode.INVALID_URL, "URL has no usable host")
    if parsed.userinfo:
        raise PermanentError(ErrorCode.INVALID_URL, "credentials in the URL are not allowed")
    return parsed


async def vet_notify_url(url: str, allow: Sequence[IPNetwork], timeout_s: float) -> None:
    """At submission: refuse a URL that is malformed or whose host resolves to a
    private address (PermanentError). A DNS failure is let through: the host is
    resolved and vetted again at every send."""
    parsed = check_notify_url(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with contextlib.suppress(RetryableError):
        try:
            await resolve_vetted(parsed.host, port, allow, timeout_s)
        except PermanentError as exc:
            if exc.code != ErrorCode.DNS_ERROR:
                raise


def notify_from_hash(h: dict[str, str]) -> JobNotify | None:
    """The webhook's progress as the job hash records it; None without a notify_url."""
    if K.JOB_NOTIFY_URL not in h:
        return None
    delivered = h.get(K.JOB_NOTIFY_DELIVERED_AT)
    return JobNotify(
        url=h[K.JOB_NOTIFY_URL],
        state=h.get(K.JOB_NOTIFY_STATE, "pending"),
        attempts=int(h.get(K.JOB_NOTIFY_ATTEMPTS, 0)),
        last_error=h.get(K.JOB_NOTIFY_ERROR),
        delivered_at=float(delivered) if delivered else None,
    )


class DeliveryFailed(Exception):
    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final  # retrying cannot help (the URL is refused)


class Webhooks:
    """Watches jobs with a `notify_url` and delivers their end (see the module doc)."""

    def __init__(
        self, redis: Redis, keys: RedisKeys, settings: GatewaySettings, status: Status
    ) -> None:
        self.redis, self.keys, self.s = redis, keys, settings
        self._status = status
        self._secret = settings.webhook_secret.get_secret_value().encode()
        self.allow = parse_cidrs(settings.allow_cidrs.split(","))
        self._claim = redis.register_script(_CLAIM_LUA)
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    def watch(self, pipe: Pipeline, job_id: str, notify_url: str) -> None:
        """Queue, in a job creator's pipeline, the job's notify_url and its watch."""
        pipe.hset(
            self.keys.job(job_id),
            mapping={K.JOB_NOTIFY_URL: notify_url, K.JOB_NOTIFY_STATE: "pending"},
        )
        pipe.zadd(self.keys.notify_due, {job_id: time.time() + self.s.webhook_poll_s})

    def start(self) -> None:
        if not self._secret:
            log.warning("TAGPIPE_WEBHOOK_SECRET is empty: webhooks are sent unsigned")
        # No proxies from the environment and no redirects: the vetted address is the
        # one dialled (see _send).
        # No kept-alive connections either: they are pooled by the address dialled, and
        # one made for a host's TLS name must not carry another host's event.
        self._http = httpx.AsyncClient(
            verify=tls_verify(),
            trust_env=False,
            follow_redirects=False,
            timeout=self.s.webhook_timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self._task = asyncio.create_task(self._loop(), name="webhooks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await cancel_until_done(self._task, 5.0)
        if self._http is not None:
            await self._http.aclose()

    async def _loop(self) -> None:
        while True:
            try:
                due = await self._claim_due()
            except Exception as exc:  # Redis away: try again next tick
                log.warning("webhook round failed: %s", describe(exc))
                due = []
            for raw in due:
                job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                try:
                    await self._handle(job_id)
                except Exception as exc:  # this job falls due again when its lease ends
                    log.warning("webhook of job %s: %s", job_id, describe(exc))
            await asyncio.sleep(self.s.webhook_tick_s)

    async def _claim_due(self) -> list[bytes | str]:
        now = time.time()
        lease_until = now + 3 * self.s.webhook_timeout_s + self.s.webhook_poll_s
        due: list[bytes | str] = await self._claim(
            keys=[self.keys.notify_due], args=[now, lease_until, _CLAIM_BATCH]
        )
        return due

    async def _handle(self, job_id: str) -> None:
        status = await self._status(job_id)
        notify = status.notify if status is not None else None
        if status is None or notify is None or notify.state != "pending":
            await self.redis.zrem(self.keys.notify_due, job_id)  # expired, or settled
            return
        if not await self._ended(job_id, status):
            await self.due_in(job_id, self.s.webhook_poll_s)
            return
        body, event = await self._event(job_id, status)
        job = self.keys.job(job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(job, K.JOB_NOTIFY_ATTEMPTS, 1)
            pipe.hsetnx(job, K.JOB_NOTIFY_SINCE, str(time.time()))
            pipe.hget(job, K.JOB_NOTIFY_SINCE)
            attempt, _, since = await pipe.execute()
        try:
            await self._send(notify.url, body, event, int(attempt))
        except DeliveryFailed as exc:
            await self._failed(job_id, int(attempt), float(since), exc)
            return
        await self._settle(job_id, "delivered", K.JOB_NOTIFY_DELIVERED_AT, time.time())
        log.info("webhook of job %s delivered (attempt %d)", job_id, attempt)

    async def _ended(self, job_id: str, status: JobStatus) -> bool:
        """Over, and for a job with an output its `_manifest.json` written (a cancelled
        one's too, which its sink writes once the redelivery window has passed)."""
        if status.state not in ("completed", "cancelled"):
            return False
        fields = [K.JOB_OUTPUT, K.JOB_MANIFEST_AT]
        output, manifest_at = await self.redis.hmget(self.keys.job(job_id), fields)  # type: ignore[misc]
        return output is None or manifest_at is not None

    async def _event(self, job_id: str, status: JobStatus) -> tuple[bytes, JobEvent]:
        """The job's event, frozen at the first attempt so retries send the same body."""
        job = self.keys.job(job_id)
        event = JobEvent(
            event_id=f"evt-{job_id}-{status.state}",
            type="job.completed" if status.state == "completed" else "job.cancelled",
            job=status.model_copy(update={"notify": None}),
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(job, K.JOB_NOTIFY_BODY, event.model_dump_json())
            pipe.hget(job, K.JOB_NOTIFY_BODY)
            _, frozen = await pipe.execute()
        return frozen, JobEvent.model_validate_json(frozen)

    async def _send(self, url: str, body: bytes, event: JobEvent, attempt: int) -> None:
        targets, host_header, sni = await self._vetted(url)
        headers = {
            "Host": host_header,
            "Content-Type": "application/json",
            "User-Agent": f"tagpipe-webhook/{__version__}",
            EVENT_HEADER: event.type,
            EVENT_ID_HEADER: event.event_id,
            ATTEMPT_HEADER: str(attempt),
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, int(time.time()), body)
        extensions = {"sni_hostname": sni} if sni else None
        assert self._http is not None
        for n, target in enumerate(targets):
            try:
                r = await self._http.post(
                    target, content=body, headers=headers, extensions=extensions
                )
            except httpx.ConnectError as exc:
                if n + 1 < len(targets):
                    continue  # the host's next vetted address (IPv6 first, say, and down)
                raise DeliveryFailed(f"ConnectError: {exc}") from None
            except httpx.HTTPError as exc:
                raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
            if not r.is_success:
                raise DeliveryFailed(f"HTTP {r.status_code}")
            return

    async def _vetted(self, url: str) -> tuple[list[httpx.URL], str, str | None]:
        """Resolve now and check every address (SSRF guard): the URLs to dial (one per
        vetted address, in the resolver's order), the Host header and the TLS name."""
        try:
            parsed = check_notify_url(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            addrs = await resolve_vetted(parsed.host, port, self.allow, self.s.webhook_timeout_s)
        except PermanentError as exc:
            # A name that does not resolve now may later (the submission let a DNS
            # failure through for that): only a refused address or URL ends it at once.
            final = exc.code != ErrorCode.DNS_ERROR
            raise DeliveryFailed(f"{exc.code}: {exc.message}", final=final) from None
        except RetryableError as exc:
            raise DeliveryFailed(f"{exc.code}: {exc.message}") from None
        host_header = parsed.netloc.decode("ascii")
        sni = parsed.host if parsed.scheme == "https" and literal_ip(parsed.host) is None else None
        return [parsed.copy_with(host=str(ip)) for ip in addrs], host_header, sni

    async def _failed(self, job_id: str, attempt: int, since: float, exc: DeliveryFailed) -> None:
        job = self.keys.job(job_id)
        await self.redis.hset(job, K.JOB_NOTIFY_ERROR, str(exc))  # type: ignore[misc]
        delay = backoff_s(attempt, self.s.webhook_backoff_base_s, self.s.webhook_backoff_max_s)
        if exc.final or time.time() + delay - since > self.s.webhook_give_up_s:
            await self._settle(job_id, "failed", K.JOB_NOTIFY_FAILED_AT, time.time())
            log.warning(
                "webhook of job %s failed for good after %d attempt(s): %s", job_id, attempt, exc
            )
            return
        log.info(
            "webhook of job %s: attempt %d failed (%s); next in %.1fs", job_id, attempt, exc, delay
        )
        await self.due_in(job_id, delay)

    async def due_in(self, job_id: str, delay_s: float) -> None:
        """Look at a watched job `delay_s` from now (0: it just ended)."""
        await self.redis.zadd(self.keys.notify_due, {job_id: time.time() + delay_s}, xx=True)

    async def _settle(self, job_id: str, state: str, field: str, at: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.job(job_id), mapping={K.JOB_NOTIFY_STATE: state, field: at})
            pipe.zrem(self.keys.notify_due, job_id)
            await pipe.execute()
