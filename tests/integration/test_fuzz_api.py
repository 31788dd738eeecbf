"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis):
no generated request, valid or not, gets a 5xx, and every 4xx is problem+json.

The gateway runs as its real process on real NATS and Redis (tagpipe_cli.stack
with no workers), auth on. With no workers, an accepted real-time request can only
end in its documented 504 `timeout`; that is the one 5xx allowed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case
from tagpipe_cli.stack import Stack, StackConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 100  # per operation: ~15-40 s on 2 cores
SEEN: Counter[str] = Counter()  # "METHOD path status" -> cases


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = StackConfig(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        downloaders=0,
        inference=0,
        gateway_env={
            "TAGPIPE_API_KEYS": KEY,
            "TAGPIPE_REALTIME_TIMEOUT_S": "0.2",
            "TAGPIPE_LOG_LEVEL": "WARNING",
        },
    )
    with Stack(cfg) as stack:
        yield stack


def check(case: Case, gateway: Stack) -> None:
    # Auth has its own test (test_security_auth.py): get past it here. (Negative cases
    # that negate the security scheme still go out without a key: those are 401s.)
    generated = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    headers = {**generated, **AUTH}
    response = case.call(base_url=gateway.gateway_url, headers=headers, timeout=30)
    status = response.status_code
    SEEN[f"{case.method} {case.path} {status}"] += 1
    ctype = response.headers.get("content-type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if status >= 400:
        assert ctype == "application/problem+json", (case.as_curl_command(), response.text)
    if status >= 500:
        code = response.json().get("code")
        assert (status, code) == (504, "timeout"), (case.as_curl_command(), response.text)
    assert gateway.services[0].alive, "the gateway died"


def test_no_request_gets_a_5xx(gateway: Stack) -> None:
    doc = httpx.get(gateway.gateway_url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(*(operation.as_strategy(m) for m in modes))

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same cases every run: a failure reproduces
            database=None,
        )
        def fuzz(case: Case) -> None:
            check(case, gateway)

        fuzz()


def test_fuzz_covered_every_operation(gateway: Stack) -> None:
    """Runs after the fuzz cases: they reached every operation, and the count is recorded."""
    total = sum(SEEN.values())
    ops = {key.rsplit(" ", 1)[0] for key in SEEN}
    doc = httpx.get(gateway.gateway_url + "/openapi.json").json()
    expected = {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item}
    assert expected <= ops, expected - ops
    out = Path(gateway.config.data_dir) / "fuzz-cases.txt"
    out.write_text("\n".join(f"{n} {k}" for k, n in sorted(SEEN.items())))
    print(f"\nschemathesis: {total} cases over {len(ops)} operations")
    assert total >= 5 * len(ops)
