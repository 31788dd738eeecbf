"""The local servers' memory settings (nats-server's Go, redis-server's glibc malloc):
ours by default, the user's win."""

from __future__ import annotations

from pathlib import Path

import pytest
from tagpipe_cli.servers import NATS_GO_MEMORY, nats_server, redis_server


def test_a_local_nats_server_collects_early_and_has_a_soft_memory_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOGC", raising=False)
    monkeypatch.delenv("GOMEMLIMIT", raising=False)
    monkeypatch.setenv("TAGPIPE_SOMETHING", "kept")
    env = nats_server(tmp_path / "nats").env
    assert env is not None
    assert env["GOGC"] == NATS_GO_MEMORY["GOGC"] == "50"
    assert env["GOMEMLIMIT"] == "192MiB"
    assert env["TAGPIPE_SOMETHING"] == "kept"


def test_go_settings_in_the_callers_environment_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOGC", "200")
    monkeypatch.setenv("GOMEMLIMIT", "1GiB")
    env = nats_server(tmp_path / "nats").env
    assert env is not None
    assert (env["GOGC"], env["GOMEMLIMIT"]) == ("200", "1GiB")


def test_a_started_nats_server_runs_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOGC", raising=False)
    srv = nats_server(tmp_path / "nats").start()
    try:
        assert srv.proc is not None
        environ = Path(f"/proc/{srv.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"GOGC=50" in environ
    finally:
        srv.stop()


def test_a_local_redis_server_keeps_large_blocks_in_their_own_mappings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    srv = redis_server(tmp_path / "redis")
    assert srv.env is not None and srv.env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    srv.start()  # (redis-server blanks its /proc environ for its process title)
    srv.stop()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    env = redis_server(tmp_path / "redis").env
    assert env is not None and env["MALLOC_MMAP_THRESHOLD_"] == "1048576"
