"""How `tagpipe up` (and every benchmark on its Stack) starts the services.

Each service gets its own process group, so a terminal's Ctrl-C reaches only
`tagpipe up`, which then stops them in order. It stays in the launcher's
session, though: Linux's autogroup scheduling gives every session an equal
share of a busy machine whatever its threads' nice values, so with a session
each the downloader (which runs ahead of inference through the stream) took
half of a 2-core box while inference, the stage behind, waited; its bulk
decodes' nice 10 (`BULK_DECODE_NICE`) only counted inside its own session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tagpipe_cli.stack import Service


def test_a_service_has_its_own_process_group_in_the_launchers_session(tmp_path: Path) -> None:
    svc = Service(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(30)"],
        dict(os.environ),
        tmp_path / "sleeper.log",
        None,
    )
    svc.start()
    try:
        assert svc.proc is not None
        pid = svc.proc.pid
        assert os.getpgid(pid) == pid  # its own group: the terminal's Ctrl-C is not sent to it
        assert os.getpgid(pid) != os.getpgid(0)
        assert os.getsid(pid) == os.getsid(0)  # one session: nice values compare across services
    finally:
        svc.kill()
