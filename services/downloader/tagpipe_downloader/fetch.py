"""HTTP fetching: one pooled aiohttp session, capped streaming, retries, and
the SSRF guard applied on every hop.

Redirects are followed by hand so each hop's host is vetted again, and the
connector resolves names only through `PinnedResolver`, which returns vetted
addresses and nothing else: the address that was checked is the address that
is dialled. Proxies from the environment are ignored for the same reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from tagpipe_common.errors import ErrorCode, PermanentError, RetryableError, http_code
from tagpipe_common.netguard import IPAddress, IPNetwork, resolve_vetted
from yarl import URL

from tagpipe_downloader.guard import parse_target

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PIN_TTL_S = 30.0


@dataclass(frozen=True)
class FetchConfig:
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # longest silence between two reads
    total_timeout_s: float = 30.0  # one attempt, all redirect hops included
    # All attempts of an item together, across deliveries (deadline.py): the
    # whole response, headers and body, wall-clock, whatever the pace of reads.
    item_deadline_s: float = 120.0
    dns_timeout_s: float = 5.0
    max_redirects: int = 5
    retries: int = 2  # extra attempts inside one delivery
    backoff_base_s: float = 0.2
    backoff_max_s: float = 2.0
    retry_after_inline_max_s: float = 2.0  # longer waits go back to JetStream as nak(delay)
    retry_after_max_s: float = 60.0
    nak_delay_s: float = 2.0  # when retries inside the delivery are used up
    pool_limit: int = 256
    pool_limit_per_host: int = 32
    user_agent: str = "tagpipe-downloader/0.1"
    allow: tuple[IPNetwork, ...] = ()


@dataclass
class FetchResult:
    body: bytes
    url: str  # after redirects
    content_type: str
    connect_ms: float
    download_ms: float
    attempts: int


class BlockedResolution(OSError):
    """Raised inside aiohttp's connector; carries our error across its wrapping."""

    def __init__(self, error: PermanentError | RetryableError) -> None:
        super().__init__(error.message)
        self.error = error


class PinnedResolver(AbstractResolver):
    """Returns only addresses that passed the guard, so a rebinding DNS answer
    between our check and aiohttp's connect cannot point it elsewhere."""

    def __init__(self, allow: tuple[IPNetwork, ...], dns_timeout_s: float) -> None:
        self._allow = allow
        self._dns_timeout_s = dns_timeout_s
        self._pins: dict[str, tuple[float, list[IPAddress]]] = {}

    def pin(self, host: str, addrs: list[IPAddress]) -> None:
        now = time.monotonic()
        if len(self._pins) > 4096:
            self._pins = {h: p for h, p in self._pins.items() if p[0] > now}
        self._pins[host] = (now + _PIN_TTL_S, addrs)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        pinned = self._pins.get(host)
        if pinned is not None and pinned[0] > time.monotonic():
            addrs = pinned[1]
        else:
            try:
                addrs = await resolve_vetted(host, port, self._allow, self._dns_timeout_s)
            except (PermanentError, RetryableError) as exc:
                raise BlockedResolution(exc) from None
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in addrs
        ]

    async def close(self) -> None:
        self._pins.clear()


class _Transient(Exception):
    """Worth another attempt inside this delivery."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Clock:
    connect_ms: float = 0.0
    started: dict[int, float] = field(default_factory=dict)


async def _on_connect_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    clock = ctx.trace_request_ctx
    if isinstance(clock, _Clock):
        clock.started[0] = time.perf_counter()


async def _on_connect_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    clock = ctx.trace_request_ctx
    if isinstance(clock, _Clock) and 0 in clock.started:
        clock.connect_ms += (time.perf_counter() - clock.started.pop(0)) * 1000


class Fetcher:
    """Owns the session; `async with Fetcher(cfg) as f: await f.fetch(url)`."""

    def __init__(self, cfg: FetchConfig) -> None:
        self.cfg = cfg
        self._resolver = PinnedResolver(cfg.allow, cfg.dns_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_start.append(_on_connect_start)
        trace.on_connection_create_end.append(_on_connect_end)
        connector = aiohttp.TCPConnector(
            limit=self.cfg.pool_limit,
            limit_per_host=self.cfg.pool_limit_per_host,
            resolver=self._resolver,
            use_dns_cache=False,  # every new connection goes through the pinned resolver
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.cfg.connect_timeout_s,
                sock_read=self.cfg.read_timeout_s,
            ),
            headers={"User-Agent": self.cfg.user_agent, "Accept-Encoding": "identity"},
            auto_decompress=False,  # a gzip bomb stays a capped, unsniffable body
            trust_env=False,  # an environment proxy would dial hosts we never vetted
            trace_configs=[trace],
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _backoff(self, attempt: int) -> float:
        # Full jitter: concurrent retries against one host spread out.
        return random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt))

    async def fetch(self, url: str, deadline: float | None = None) -> FetchResult:
        """Bytes of `url`. Raises PermanentError or RetryableError with a stable code.

        `deadline` (epoch seconds, default item_deadline_s from now) ends every
        attempt: missing it is a final download_timeout, and a retry that could
        only start after it is final with its own code.
        """
        if deadline is None:
            deadline = time.time() + self.cfg.item_deadline_s
        clock = _Clock()
        t0 = time.perf_counter()
        for attempt in range(self.cfg.retries + 1):
            left = deadline - time.time()
            if left <= 0:  # a redelivery after the deadline: no connection at all
                raise self._past_deadline()
            try:
                # sock_read restarts with every chunk, so a trickle never trips
                # it; only this wall-clock bound holds the whole response.
                async with asyncio.timeout(min(self.cfg.total_timeout_s, left)):
                    body, final_url, ctype = await self._follow(url, clock)
            except TimeoutError:
                if left <= self.cfg.total_timeout_s:
                    raise self._past_deadline() from None
                failure = _Transient(ErrorCode.DOWNLOAD_TIMEOUT, "download took too long")
            except _Transient as exc:
                failure = exc
            else:
                total_ms = (time.perf_counter() - t0) * 1000
                return FetchResult(
                    body,
                    final_url,
                    ctype,
                    clock.connect_ms,
                    total_ms - clock.connect_ms,
                    attempt + 1,
                )
            wait = failure.retry_after_s
            last = attempt == self.cfg.retries
            if last or (wait is not None and wait > self.cfg.retry_after_inline_max_s):
                delay = min(
                    self.cfg.nak_delay_s if wait is None else wait, self.cfg.retry_after_max_s
                )
                self._retry_in_time(failure, delay, deadline)
                raise RetryableError(failure.code, failure.message, delay_s=delay)
            wait = wait if wait is not None else self._backoff(attempt)
            self._retry_in_time(failure, wait, deadline)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _past_deadline(self) -> PermanentError:
        return PermanentError(
            ErrorCode.DOWNLOAD_TIMEOUT,
            f"not downloaded within the item deadline ({self.cfg.item_deadline_s:g} s)",
        )

    def _retry_in_time(self, failure: _Transient, wait: float, deadline: float) -> None:
        """A retry that could only start after the deadline is not made: final now."""
        if time.time() + wait >= deadline:
            raise PermanentError(
                failure.code, f"{failure.message} (no time left before the item deadline)"
            )

    async def _follow(self, url: str, clock: _Clock) -> tuple[bytes, str, str]:
        visited = {url}
        for _hop in range(self.cfg.max_redirects + 1):
            target = parse_target(url)
            addrs = await resolve_vetted(
                target.host, target.port, self.cfg.allow, self.cfg.dns_timeout_s
            )
            if target.ip is None:
                self._resolver.pin(target.host, addrs)
            next_url = await self._request(target.url, clock)
            if isinstance(next_url, tuple):
                return next_url
            if next_url in visited:
                raise PermanentError(ErrorCode.REDIRECT_LOOP, f"redirect loop back to {next_url}")
            visited.add(next_url)
            url = next_url
        raise PermanentError(
            ErrorCode.TOO_MANY_REDIRECTS, f"more than {self.cfg.max_redirects} redirects"
        )

    async def _request(self, url: URL, clock: _Clock) -> str | tuple[bytes, str, str]:
        """One hop: the next URL for a redirect, else (body, url, content type)."""
        assert self._session is not None, "use Fetcher as an async context manager"
        try:
            async with self._session.get(
                url, allow_redirects=False, trace_request_ctx=clock
            ) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise PermanentError(http_code(resp.status), "redirect without Location")
                    return str(resp.url.join(URL(location)))
                self._check_status(resp)
                body = await self._read_capped(resp)
                return body, str(resp.url), resp.headers.get("Content-Type", "")
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, BlockedResolution):
                raise exc.os_error.error from None
            raise PermanentError(ErrorCode.DNS_ERROR, str(exc)) from None
        except aiohttp.ConnectionTimeoutError:
            raise _Transient(ErrorCode.CONNECT_TIMEOUT, f"connecting to {url} timed out") from None
        except aiohttp.SocketTimeoutError:
            raise _Transient(ErrorCode.DOWNLOAD_TIMEOUT, "server stopped sending") from None
        except aiohttp.InvalidURL as exc:
            raise PermanentError(ErrorCode.INVALID_URL, f"invalid URL {exc}") from None
        except aiohttp.ClientSSLError as exc:
            # A bad certificate will be just as bad on the next attempt.
            raise PermanentError(ErrorCode.CONNECTION_ERROR, f"TLS failed: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Transient(ErrorCode.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientResponseError as exc:
            raise PermanentError(ErrorCode.CONNECTION_ERROR, f"bad response: {exc}") from None

    def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if 200 <= status < 300:
            return
        message = f"server answered {status} {resp.reason or ''}".strip()
        if status == 429 or status >= 500:
            retry_after = None
            if status in (429, 503):
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise _Transient(http_code(status), message, retry_after)
        raise PermanentError(http_code(status), message)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.cfg.max_bytes
        declared = resp.content_length
        if declared is not None and declared > cap:
            raise PermanentError(ErrorCode.TOO_LARGE, f"Content-Length {declared} over {cap}")
        buf = bytearray()
        # Never trust Content-Length: count what actually arrives and stop at the cap.
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > cap:
                raise PermanentError(ErrorCode.TOO_LARGE, f"body exceeds {cap} bytes")
        return bytes(buf)
