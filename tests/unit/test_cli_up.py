from __future__ import annotations

from pathlib import Path

import pytest
from tagpipe_cli.__main__ import main
from tagpipe_cli.stack import Stack, StackConfig


def test_up_without_a_model_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["up", "--model-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "make model" in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "tagpipe" in capsys.readouterr().out


def test_unknown_service_name_lists_the_known_ones(tmp_path: Path) -> None:
    stack = Stack(StackConfig(data_dir=tmp_path))
    with pytest.raises(KeyError, match="no service 'gateway'"):
        stack.service("gateway")  # nothing started yet
