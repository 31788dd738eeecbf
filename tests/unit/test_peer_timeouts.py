"""Dead-peer bounds and the real-time default deadline: typed, validated, one source."""

from __future__ import annotations

import pytest
from tagpipe_common.nats_io import NatsLiveness
from tagpipe_common.redis_io import RedisTimeouts, connect_redis, connect_redis_sync
from tagpipe_common.settings import CommonSettings, load_settings
from tagpipe_gateway.settings import GatewaySettings


def test_the_settings_defaults_are_the_connection_defaults() -> None:
    s = CommonSettings()
    assert s.redis_timeouts() == RedisTimeouts()
    assert s.nats_liveness() == NatsLiveness()
    # A frozen peer is noticed within ~10 s (issue 28), by either client.
    assert RedisTimeouts().socket_timeout_s <= 10
    assert NatsLiveness().detect_s <= 10


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/tp/0"]
)
def test_every_data_connection_gets_the_timeouts_and_the_health_check(url: str) -> None:
    t = RedisTimeouts(socket_timeout_s=7.0, connect_timeout_s=3.0, health_check_interval_s=4.0)
    for client in (connect_redis(url, t), connect_redis_sync(url, t)):
        kw = client.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 7.0
        assert kw["socket_connect_timeout"] == 3.0
        assert kw["health_check_interval"] == 4.0


def test_nats_liveness_sets_the_client_pings() -> None:
    live = NatsLiveness(ping_interval_s=2.0, max_outstanding_pings=3)
    assert live.options() == {"ping_interval": 2.0, "max_outstanding_pings": 3}
    assert live.detect_s == 8.0


@pytest.mark.parametrize(
    ("env", "says"),
    [
        # WAIT blocks up to its timeout: a socket timeout below it fails healthy writes.
        ({"TAGPIPE_REDIS_WAIT_TIMEOUT_MS": "5000"}, "redis_socket_timeout_s (5 s) must exceed"),
        # XREAD BLOCK 1 s (the gateway's job results) needs more than 1 s.
        ({"TAGPIPE_REDIS_SOCKET_TIMEOUT_S": "1.5"}, "longest blocking Redis command (1000 ms"),
        ({"TAGPIPE_NATS_PING_INTERVAL_S": "0"}, "TAGPIPE_NATS_PING_INTERVAL_S"),
        ({"TAGPIPE_NATS_MAX_OUTSTANDING_PINGS": "0"}, "TAGPIPE_NATS_MAX_OUTSTANDING_PINGS"),
    ],
)
def test_a_bound_that_cannot_work_stops_startup_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    says: str,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        load_settings(CommonSettings)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_longer_socket_timeout_allows_a_longer_wait() -> None:
    s = CommonSettings(redis_wait_timeout_ms=5000, redis_socket_timeout_s=6.0)
    assert s.redis_timeouts().socket_timeout_s == 6.0


def test_a_request_without_timeout_ms_gets_two_seconds_and_may_ask_for_thirty() -> None:
    s = GatewaySettings()
    assert s.default_deadline_s == 2.0
    assert s.realtime_timeout_s == 30.0


def test_a_maximum_below_the_default_lowers_it_and_a_default_above_it_is_refused() -> None:
    assert GatewaySettings(realtime_timeout_s=0.5).default_deadline_s == 0.5
    assert GatewaySettings(realtime_default_timeout_s=10).default_deadline_s == 10.0
    with pytest.raises(ValueError, match="must not exceed realtime_timeout_s"):
        GatewaySettings(realtime_default_timeout_s=40)
