"""The local nats-server's Go memory settings: ours by default, the user's win."""

from __future__ import annotations

from pathlib import Path

import pytest
from tagpipe_cli.servers import NATS_GO_MEMORY, nats_server


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
