"""What the operator says about a NATS it cannot read: one line, no credentials."""

from __future__ import annotations

import pytest
from tagpipe_operator.reconcile import Runtime, describe, nats_problem, redact
from tagpipe_operator.settings import OperatorSettings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://nats:4222", "nats://nats:4222"),
        ("nats://user:secret@nats.ns.svc:4222", "nats://nats.ns.svc:4222"),
        ("tls://tok@a:4222,nats://u:p@b", "tls://a:4222,nats://b"),
    ],
)
def test_urls_in_logs_and_conditions_carry_no_credentials(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_the_reason_is_the_last_connect_error_when_a_timeout_hides_it() -> None:
    rt = Runtime(settings=OperatorSettings())
    url = "nats://u:p@127.0.0.1:4999"
    assert nats_problem(rt, url, TimeoutError()) == "NATS nats://127.0.0.1:4999: no answer in time"
    rt.nats_errors[url] = describe(ConnectionRefusedError(111, "Connect call failed"))
    problem = nats_problem(rt, url, TimeoutError())
    assert problem == "NATS nats://127.0.0.1:4999: [Errno 111] Connect call failed"
    assert "\n" not in problem and "p@" not in problem
