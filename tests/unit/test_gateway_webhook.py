"""The webhook's pure parts: signing and verifying, the backoff, the URL checks."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from redis.asyncio import Redis
from tagpipe_common.errors import PermanentError
from tagpipe_common.keys import RedisKeys
from tagpipe_gateway.settings import GatewaySettings
from tagpipe_gateway.webhook import (
    DeliveryFailed,
    Webhooks,
    backoff_s,
    check_notify_url,
    sign,
    verify,
)

SECRET = b"whsec-unit"


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event_id":"evt-j-1-completed"}'
    header = sign(SECRET, 1764072000, body)
    want = hmac.new(SECRET, b"1764072000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1764072000,v1={want}"


def test_verify_refuses_other_bodies_secrets_stale_times_and_garbage() -> None:
    now = int(time.time())
    body = b'{"a":1}'
    header = sign(SECRET, now, body)
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, b'{"a":2}')
    assert not verify(b"other", header, body)
    assert not verify(SECRET, sign(SECRET, now - 3600, body), body)  # a replay
    assert not verify(SECRET, header.replace("t=", "x="), body)
    assert not verify(SECRET, "t=abc,v1=00", body)
    assert not verify(SECRET, header[:-1] + "\u00e9", body)  # refused, not a TypeError


def test_backoff_grows_exponentially_under_its_cap_with_full_jitter() -> None:
    for attempt in range(1, 30):
        cap = min(3600.0, 2.0 * 2 ** (attempt - 1))
        samples = [backoff_s(attempt, 2.0, 3600.0) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap / 2  # spread over the whole range, not pinned
    assert backoff_s(1, 2.0, 3600.0) <= 2.0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/x",
        "file:///etc/passwd",
        "http://user:pw@hooks.example.com/x",
        "http:///nohost",
        "http://[fe80::1%25eth0]/x",
        "not a url",
    ],
)
def test_malformed_notify_urls_are_invalid(url: str) -> None:
    with pytest.raises(PermanentError) as caught:
        check_notify_url(url)
    assert caught.value.code == "invalid_url"


def test_a_plain_https_url_passes_the_syntax_check() -> None:
    parsed = check_notify_url("https://hooks.example.com:8443/tagpipe?x=1")
    assert (parsed.host, parsed.port) == ("hooks.example.com", 8443)


async def test_a_host_that_does_not_resolve_at_send_time_is_retried_not_failed() -> None:
    """Submission lets a DNS failure through ("resolved again at every send"), so at
    send time it must be retried like a connect error; a refused address is final."""
    hooks = Webhooks(Redis(), RedisKeys(), GatewaySettings(), status=_no_status)
    with pytest.raises(DeliveryFailed) as caught:
        await hooks._vetted("https://no-such-host.invalid/hook")  # RFC 6761: never resolves
    assert "dns_error" in str(caught.value) and not caught.value.final
    with pytest.raises(DeliveryFailed) as caught:
        await hooks._vetted("http://127.0.0.1:8080/hook")
    assert "blocked_address" in str(caught.value) and caught.value.final


async def _no_status(job_id: str) -> None:
    return None
