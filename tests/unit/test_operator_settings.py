"""OperatorSettings: validated once at start-up; a bad value stops `main()` with one line."""

from __future__ import annotations

import pytest
from tagpipe_common.settings import load_settings
from tagpipe_operator.settings import OperatorSettings


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGPIPE_SCALE_INTERVAL_S", "2.5")
    monkeypatch.setenv("TAGPIPE_NAMESPACE", "pipelines")
    s = load_settings(OperatorSettings)
    assert (s.scale_interval_s, s.namespace, s.metrics_port) == (2.5, "pipelines", 9090)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("TAGPIPE_SCALE_INTERVAL_S", "0"),
        ("TAGPIPE_STREAM_DELETE_RETRIES", "-1"),
        ("TAGPIPE_NATS_URL", "http://nats:4222"),
        # The leader would still be leading when a standby may take over (deadline 8 s).
        ("TAGPIPE_LEASE_DURATION_S", "8"),
        ("TAGPIPE_LEASE_RENEW_DEADLINE_S", "1.5"),  # not above the 2 s renew interval
    ],
)
def test_bad_value_exits_naming_the_variable(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exc:
        load_settings(OperatorSettings)
    assert exc.value.code == 2
    assert var in capsys.readouterr().err
