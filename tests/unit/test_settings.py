from __future__ import annotations

import pytest
from tagpipe_common.settings import CommonSettings, load_settings


def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGPIPE_NATS_URL", raising=False)
    s = load_settings(CommonSettings)
    assert s.nats_servers == ["nats://127.0.0.1:4222"]


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGPIPE_NATS_URL", "nats://a:4222,nats://b:4222")
    monkeypatch.setenv("TAGPIPE_MAX_DELIVER", "7")
    s = load_settings(CommonSettings)
    assert s.nats_servers == ["nats://a:4222", "nats://b:4222"]
    assert s.max_deliver == 7


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("TAGPIPE_REDIS_URL", "http://redis:6379"),
        ("TAGPIPE_NATS_URL", "localhost:4222"),
        ("TAGPIPE_MAX_DELIVER", "1"),
        ("TAGPIPE_LOG_LEVEL", "chatty"),
        ("TAGPIPE_PREFIX", "Bad Prefix"),
    ],
)
def test_a_bad_value_stops_startup_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exc:
        load_settings(CommonSettings)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert var in err[0] and value in err[0]
