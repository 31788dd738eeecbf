"""A JetStream cluster on this machine: three nats-server processes, one cluster name.

The replicated setup a real deployment runs (the chart's `nats.cluster`, the
official nats-io chart's clustered JetStream), started from the same
`nats-server` binary as the single server (`servers.nats_server`), so anyone can
watch a leader change on a laptop and the fault tests kill a real stream leader:

    cluster = NatsCluster(tmp / "nats").start()
    env["TAGPIPE_NATS_URL"] = cluster.url    # nats://127.0.0.1:p1,nats://...:p2,...
    leader = cluster.stream_leader("TAGPIPE_DOWNLOAD")
    leader.kill()                            # kill -9; the other two elect a new leader
    leader.start()                           # same port and store: it catches up
    cluster.stop()

Every server has its own config file and store directory, routes to all three
cluster ports (a route to itself is ignored by nats-server), and a unique
`server_name`, which is what JetStream reports as a stream's leader.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats
from nats.js.client import JetStreamContext

from tagpipe_cli.servers import (
    ServerProcess,
    ServerStartError,
    find_binary,
    free_port,
    nats_env,
)

CLUSTER_NAME = "tagpipe"
T = TypeVar("T")


def _conf(name: str, port: int, cluster_port: int, routes: list[int], store: Path) -> str:
    route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return f"""server_name: {name}
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
}}
cluster {{
  name: {CLUSTER_NAME}
  listen: 127.0.0.1:{cluster_port}
  routes: [{route_urls}]
}}
"""


def run_async(make: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""

    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout_s)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


@dataclass
class NatsCluster:
    """`size` servers named nats-0, nats-1, ... on free ports, clustered by routes."""

    data_dir: Path
    size: int = 3
    tie_to_parent: bool = False  # tagpipe up: die with it, own process group
    log_dir: Path | None = None  # default: data_dir
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The TAGPIPE_NATS_URL that reaches every server of the cluster."""
        return ",".join(s.url for s in self.servers)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout_s: float = 60.0) -> NatsCluster:
        ports = [(free_port(), free_port()) for _ in range(self.size)]
        routes = [cport for _, cport in ports]
        for i, (port, cport) in enumerate(ports):
            name = f"nats-{i}"
            server_dir = self.data_dir / name
            server_dir.mkdir(parents=True, exist_ok=True)
            conf = server_dir / "nats.conf"
            conf.write_text(_conf(name, port, cport, routes, server_dir / "jetstream"))
            argv = [find_binary("nats-server"), "--config", str(conf)]
            log = (self.log_dir or self.data_dir) / f"{name}.log"
            srv = ServerProcess("nats", argv, port, server_dir, log, env=nats_env())
            srv.tie_to_parent = self.tie_to_parent
            self.servers.append(srv)
        try:
            for srv in self.servers:
                srv.start()
            self.wait_jetstream(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def server(self, name: str) -> ServerProcess:
        """The process of `nats-<i>`, the name JetStream reports leaders by."""
        return self.servers[int(name.rpartition("-")[2])]

    def name_of(self, srv: ServerProcess) -> str:
        return f"nats-{self.servers.index(srv)}"

    def alive(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def _ask(self, make: Callable[[JetStreamContext], Awaitable[T]], timeout_s: float = 10) -> T:
        urls = [s.url for s in self.alive()]

        async def ask() -> T:
            nc = await nats.connect(servers=urls, connect_timeout=2, allow_reconnect=False)
            try:
                return await make(nc.jetstream(timeout=2))
            finally:
                await nc.close()

        return run_async(ask, timeout_s)

    def wait_jetstream(self, timeout_s: float = 60.0) -> None:
        """Until the cluster has elected a meta leader and answers JetStream requests."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._ask(lambda js: js.account_info())
                return
            except Exception as exc:  # no meta leader yet: "JetStream unavailable", timeouts
                last = exc
                time.sleep(0.3)
        raise ServerStartError(f"JetStream cluster not ready in {timeout_s}s: {last!r}")

    def stream_leader(self, stream: str, timeout_s: float = 60.0) -> ServerProcess:
        """The server leading `stream` now, waiting out an election in progress."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                info = self._ask(lambda js: js.stream_info(stream))
                if info.cluster is not None and info.cluster.leader:
                    return self.server(info.cluster.leader)
            except Exception as exc:
                last = exc
            time.sleep(0.2)
        raise ServerStartError(f"{stream}: no leader within {timeout_s}s ({last!r})")

    def wait_current(self, stream: str, timeout_s: float = 60.0) -> None:
        """Until `stream` has a leader and every replica is current (caught up): a
        server that was down is a full peer again, so another may go down safely."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                info = self._ask(lambda js: js.stream_info(stream))
            except Exception:
                time.sleep(0.2)
                continue
            c = info.cluster
            peers = (c.replicas or []) if c is not None else []
            complete = len(peers) + 1 >= min(self.size, info.config.num_replicas or 1)
            if c is not None and c.leader and complete and all(p.current for p in peers):
                return
            time.sleep(0.2)
        raise ServerStartError(f"{stream}: replicas not current within {timeout_s}s")

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()
