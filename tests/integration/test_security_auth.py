"""API keys with auth on: every non-health route refuses a missing or wrong key with
401 (the routes are read from the app's OpenAPI document, so a new endpoint is
covered without touching this file), keys are compared in constant time, and no
key ever reaches a log line or a response.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from nats.js.client import JetStreamContext
from tagpipe_cli.servers import ServerProcess
from tagpipe_gateway import auth
from tagpipe_gateway.app import create_app
from tagpipe_gateway.auth import ApiKeys, parse_entries
from tagpipe_gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration

KEY = "sk-live-0123456789abcdef-CANARY"
OTHER_KEY = "sk-live-fedcba9876543210-CANARY"
WRONG = "sk-live-0123456789abcdef-CANARZ"  # one character off
# Deliberately open; anything else needs a key.
OPEN = {"/healthz", "/readyz", "/readyz/dependencies", "/metrics"}


@pytest.fixture
async def app(
    nats_proc: ServerProcess, redis_proc: ServerProcess, js: JetStreamContext
) -> AsyncIterator[FastAPI]:
    settings = GatewaySettings(
        nats_url=nats_proc.url, redis_url=redis_proc.url, realtime_timeout_s=0.5
    )
    application = create_app(settings, ApiKeys(tuple(parse_entries(f"{KEY},{OTHER_KEY}"))))
    async with application.router.lifespan_context(application):
        yield application


def operations(app: FastAPI) -> list[tuple[str, str]]:
    ops = []
    for path, item in app.openapi()["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path))
    return ops


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "j-0000000000000000", path)


async def call(app: FastAPI, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30
    ) as c:
        return await c.request(
            method,
            concrete(path),
            json={"url": "http://example.com/a.jpg"} if method == "POST" else None,
            headers=headers,
        )


BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {WRONG}"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"bearer {KEY}x"},
    {"X-Api-Key": KEY},  # the key in the wrong place does not count
]


async def test_every_non_health_endpoint_needs_a_valid_key(app: FastAPI) -> None:
    ops = operations(app)
    guarded = [(m, p) for m, p in ops if p not in OPEN]
    assert len(guarded) >= 6, ops  # tags, results, jobs (submit, status, results, cancel)
    for method, path in guarded:
        for headers in BAD_CREDENTIALS:
            r = await call(app, method, path, headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        # The right key gets past the door (whatever the route then says).
        ok = await call(app, method, path, {"Authorization": f"Bearer {KEY}"})
        assert ok.status_code != 401, (method, path)
    for path in OPEN:
        assert (await call(app, "GET", path, {})).status_code == 200, path


async def test_keys_are_checked_with_compare_digest_and_no_early_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys(tuple(parse_entries("k1,k2,k3,k4")))
    for presented, expected in (("k1", True), ("k4", True), ("nope", False), ("k1" * 500, False)):
        calls.clear()
        assert keys.check(presented) is expected
        # Every stored digest compared, each as two 32-byte digests: the time does
        # not depend on which key matched, nor on the presented key's length.
        assert calls == [(32, 32)] * 4, (presented, calls)


async def test_keys_never_reach_logs_or_responses(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = []
    with caplog.at_level(logging.DEBUG):
        ApiKeys.load(f"{KEY},{OTHER_KEY}", None)
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {WRONG}"}):
            for method, path in operations(app):
                bodies.append((await call(app, method, path, headers)).text)
    records = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert records, "nothing was logged: the check would prove nothing"
    for secret in (KEY, OTHER_KEY, WRONG, "CANARY", "CANARZ"):
        assert secret not in records, f"{secret} was logged"
        assert not [b for b in bodies if secret in b], f"{secret} was echoed in a response"
