from __future__ import annotations

import pytest
from pydantic import ValidationError
from tagpipe_common.settings import load_settings
from tagpipe_gateway.problems import field_path
from tagpipe_gateway.settings import GatewaySettings


def test_bulk_limit_above_realtime_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="starve real-time"):
        GatewaySettings(realtime_backlog_limit=100, bulk_backlog_limit=200)


def test_bad_env_stops_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGPIPE_MAX_URLS_PER_REQUEST", "0")
    with pytest.raises(SystemExit) as exc:
        load_settings(GatewaySettings)
    assert exc.value.code == 2
    assert "TAGPIPE_MAX_URLS_PER_REQUEST" in capsys.readouterr().err


def test_api_keys_are_secret_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGPIPE_API_KEYS", "hunter2")
    s = GatewaySettings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert s.api_keys.get_secret_value() == "hunter2"


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("body", "urls", 3), "body.urls[3]"),
        (("query", "top_k"), "query.top_k"),
        (("body",), "body"),
    ],
)
def test_field_path(loc: tuple[str | int, ...], path: str) -> None:
    assert field_path(loc) == path
