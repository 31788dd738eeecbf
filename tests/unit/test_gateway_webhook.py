"""The webhook's pure parts: signing and verifying, the backoff, the URL checks."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from tagpipe_common.errors import PermanentError
from tagpipe_gateway.webhook import backoff_s, check_notify_url, sign, verify

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
