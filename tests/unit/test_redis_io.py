"""The two forms of TAGPIPE_REDIS_URL, read and refused as pure functions."""

from __future__ import annotations

import pytest
from tagpipe_common.redis_io import (
    Durability,
    NotReplicated,
    SentinelTarget,
    parse_sentinel_url,
    redacted,
)
from tagpipe_common.settings import CommonSettings, load_settings


def test_a_sentinel_url_names_every_sentinel_the_service_and_the_db() -> None:
    t = parse_sentinel_url("redis+sentinel://s1:26379,s2:26380,[::1]:26381/mymaster/3")
    assert t == SentinelTarget((("s1", 26379), ("s2", 26380), ("::1", 26381)), "mymaster", 3)


def test_credentials_belong_to_the_data_nodes_and_the_sentinels_have_their_own() -> None:
    url = "rediss+sentinel://app:s%40cret@h:26379/cache?sentinel_password=sp"
    t = parse_sentinel_url(url)
    assert (t.username, t.password, t.sentinel_password) == ("app", "s@cret", "sp")
    assert t.db == 0 and t.ssl
    assert "s%40cret" not in redacted(url) and "***" in redacted(url)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("redis+sentinel:///mymaster/0", "no sentinel host:port"),
        ("redis+sentinel://h1:26379,h2/mymaster/0", "'h2' is not host:port"),
        ("redis+sentinel://h1:99999/mymaster/0", "is not host:port"),
        ("redis+sentinel://h1:26379", "/<service name>"),
        ("redis+sentinel://h1:26379/mymaster/zero", "/<service name>"),
        ("sentinel://h1:26379/mymaster", "not a redis://"),
    ],
)
def test_a_bad_redis_url_stops_startup_with_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, says: str
) -> None:
    monkeypatch.setenv("TAGPIPE_REDIS_URL", value)
    with pytest.raises(SystemExit) as exc:
        load_settings(CommonSettings)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "TAGPIPE_REDIS_URL" in err[0] and says in err[0]


def test_wait_is_on_by_default_with_sentinel_and_off_with_one_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAGPIPE_REDIS_URL", "redis://r:6379/0")
    assert load_settings(CommonSettings).redis_durability().replicas == 0
    monkeypatch.setenv("TAGPIPE_REDIS_URL", "redis+sentinel://a:1,b:2,c:3/tagpipe/0")
    d = load_settings(CommonSettings, prefix="tp").redis_durability()
    assert (d.replicas, d.timeout_ms, d.fence_key) == (1, 1000, "tp:wait-fence")
    monkeypatch.setenv("TAGPIPE_REDIS_WAIT_REPLICAS", "0")  # an operator may turn it off
    assert load_settings(CommonSettings).redis_durability().replicas == 0


def test_a_short_wait_is_an_error_and_the_callers_replies_come_back_without_it() -> None:
    d = Durability(replicas=2)
    assert d.check([1, 0, 41, 2]) == [1, 0]  # script replies, then INCR and WAIT
    with pytest.raises(NotReplicated, match="1 of 2 replicas"):
        d.check([1, 41, 1])
    assert Durability(replicas=0).check([1, 0]) == [1, 0]


@pytest.mark.parametrize(
    "value",
    [
        "redis+sentinel://:s3cret-pw@h1:26379,h2/mymaster/0",
        "redis+sentinel://user:s3cret-pw@h1:99999/mymaster/0",
        "sentinel://:s3cret-pw@h1:26379/mymaster",
    ],
)
def test_a_bad_url_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    monkeypatch.setenv("TAGPIPE_REDIS_URL", value)
    with pytest.raises(SystemExit):
        load_settings(CommonSettings)
    err = capsys.readouterr().err
    assert "TAGPIPE_REDIS_URL" in err and "***@" in err
    assert "s3cret-pw" not in err
