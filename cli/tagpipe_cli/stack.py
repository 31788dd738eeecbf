"""The whole pipeline on one machine: NATS, Redis, gateway, downloaders, inference.

One launcher for `tagpipe up`, the end-to-end test, the benchmarks and the
fault-injection tests, so they all run the same thing:

    with Stack(StackConfig(data_dir=tmp, downloaders=2)) as stack:
        httpx.post(stack.gateway_url + "/v1/tags", ...)

Every service is a separate process in its own process group, started with
PR_SET_PDEATHSIG, so a killed parent leaves no orphans. `stop()` shuts them
down in pipeline order (gateway, downloaders, inference, then the servers):
SIGTERM to the group, SIGKILL after a grace period.

PR_SET_PDEATHSIG fires when the *thread* that started a child exits, so call
`start()` (and `Service.restart()`) from a thread that outlives the stack: the
main thread, or an executor thread that stays alive (`asyncio.to_thread` is).

Fault-injection tests reach single services by name:
`stack.service("downloader-0").kill()`, then `.restart()`. `tagpipe up` restarts
services that die on their own (supervise.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import nats
from tagpipe_common.settings import CommonSettings, load_settings
from tagpipe_common.streams import StreamPolicy, ensure_streams

from tagpipe_cli.nats_cluster import NatsCluster
from tagpipe_cli.redis_ha import RedisSentinelSet
from tagpipe_cli.servers import (
    ServerProcess,
    ServerStartError,
    die_with_parent,
    find_binary,
    free_port,
    nats_server,
    redis_server,
)

DEFAULT_MODEL_DIR = Path("models/efficientnet-lite0")


@dataclass
class StackConfig:
    data_dir: Path = Path(".tagpipe")
    port: int = 0  # gateway port; 0: a free one
    downloaders: int = 1
    inference: int = 1
    model_dir: Path = DEFAULT_MODEL_DIR
    prefix: str = "tagpipe"
    policy: StreamPolicy | None = None  # default: from TAGPIPE_* settings, like the services
    allow_cidrs: str = ""  # downloader SSRF allowlist (e.g. 127.0.0.0/8 for a local image server)
    env: dict[str, str] = field(default_factory=dict)  # every service
    gateway_env: dict[str, str] = field(default_factory=dict)
    downloader_env: dict[str, str] = field(default_factory=dict)
    inference_env: dict[str, str] = field(default_factory=dict)
    fresh: bool = False  # wipe data_dir first
    # Each process's Prometheus /metrics: None, none; 0, free ports; N: gateway on N, then
    # the downloaders and inference processes on N+1, N+2, ... (tagpipe up prints them).
    metrics_port: int | None = None
    ready_timeout_s: float = 120.0
    # Past one node (tagpipe up --ha): a JetStream cluster of this many servers, its
    # streams at `stream_replicas` (None: min(servers, 3)), and a Redis Sentinel set.
    nats_servers: int = 1
    stream_replicas: int | None = None
    redis_sentinel: bool = False


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str | None
    metrics_url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    crashes: int = 0  # exits the supervisor found (tagpipe up's restarts)
    restarts: list[float] = field(default_factory=list)  # when it restarted them (monotonic)

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own group: a terminal's Ctrl-C reaches us only. And its own session:
                # under autogroup scheduling each service then has its own share of a busy
                # box, as a pod has its own cgroup. One session for all was measured and
                # reverted (docs/benchmarks.md): a flooded gateway took the workers' cores.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL, no drain: a crash, as far as the pipeline can tell."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def restart(self, grace_s: float = 15.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after `grace_s`), then start again."""
        self.signal(signal.SIGTERM)
        if not self.wait(grace_s):
            self.kill()
        self.start()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


class Stack:
    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        # One server each, or (config.nats_servers > 1, config.redis_sentinel) the sets.
        self.nats: ServerProcess | None = None
        self.redis: ServerProcess | None = None
        self.nats_cluster: NatsCluster | None = None
        self.redis_set: RedisSentinelSet | None = None
        self.services: list[Service] = []
        self.port = self.config.port or free_port()
        self.log_dir = self.config.data_dir / "logs"
        self.stopping = False  # set by stop(): exits from here on are no crashes

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        """TAGPIPE_NATS_URL: one server, or every server of the cluster, comma-separated."""
        if self.nats_cluster is not None:
            return self.nats_cluster.url
        assert self.nats is not None
        return self.nats.url

    @property
    def redis_url(self) -> str:
        """TAGPIPE_REDIS_URL: one server, or the Sentinel set's redis+sentinel:// URL."""
        if self.redis_set is not None:
            return self.redis_set.url
        assert self.redis is not None
        return self.redis.url

    @property
    def server_processes(self) -> list[ServerProcess]:
        """Every NATS and Redis process (a sentinel counts), for logs and memory reads."""
        out = [s for s in (self.nats, self.redis) if s is not None]
        if self.nats_cluster is not None:
            out += self.nats_cluster.servers
        if self.redis_set is not None:
            out += self.redis_set.processes
        return out

    @property
    def stream_replicas(self) -> int:
        cfg = self.config
        return cfg.stream_replicas or min(cfg.nats_servers, 3)

    @property
    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TAGPIPE_NATS_URL=self.nats_url,
            TAGPIPE_REDIS_URL=self.redis_url,
            TAGPIPE_STREAM_REPLICAS=str(self.stream_replicas),
            TAGPIPE_PREFIX=self.config.prefix,
            TAGPIPE_MODEL_DIR=str(self.config.model_dir.resolve()),
        )
        env.update(self.config.env)
        return env

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        cfg = self.config
        if cfg.fresh and cfg.data_dir.exists():
            shutil.rmtree(cfg.data_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_servers()
            self._ensure_streams()
            self._start_services()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_servers(self) -> None:
        cfg = self.config
        if cfg.nats_servers > 1:
            self.nats_cluster = NatsCluster(
                cfg.data_dir / "nats", cfg.nats_servers, tie_to_parent=True, log_dir=self.log_dir
            )
            self.nats_cluster.start()
        else:
            self.nats = nats_server(cfg.data_dir / "nats")
        if cfg.redis_sentinel:
            self.redis_set = RedisSentinelSet(cfg.data_dir / "redis", tie_to_parent=True)
            self.redis_set.start()
        else:
            self.redis = redis_server(cfg.data_dir / "redis")
        for srv in (self.nats, self.redis):
            if srv is not None:
                srv.tie_to_parent = True
                srv.log_path = self.log_dir / f"{srv.name}.log"
                srv.start()

    def _ensure_streams(self) -> None:
        # The services read TAGPIPE_MAX_DELIVER etc. from the same environment, so
        # the streams must too, or a worker's "final delivery" would be a guess.
        policy = self.config.policy or StreamPolicy.from_settings(
            load_settings(CommonSettings, prefix=self.config.prefix)
        )
        policy = replace(policy, replicas=self.stream_replicas)
        if "TAGPIPE_PARTITIONS" in self.config.env:  # the services' env wins over ours
            policy = replace(policy, partitions=int(self.config.env["TAGPIPE_PARTITIONS"]))
        urls = self.nats_url.split(",")

        async def ensure() -> None:
            # A one-shot client: no reconnect callbacks, so no "disconnected" noise at close.
            nc = await nats.connect(servers=urls, name="tagpipe-up", connect_timeout=5)
            try:
                await ensure_streams(nc.jetstream(), policy)
            finally:
                await nc.close()

        # A thread of its own: the caller may already be inside an event loop.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, ensure()).result(timeout=60)

    def _service(self, name: str, binary: str, extra: dict[str, str], health: bool) -> Service:
        env = self.base_env
        env.update(extra)
        health_url = None
        if health:
            port = free_port()
            env["TAGPIPE_HEALTH_PORT"] = str(port)
            health_url = f"http://127.0.0.1:{port}/readyz"
        svc = Service(name, [find_binary(binary)], env, self.log_dir / f"{name}.log", health_url)
        base = self.config.metrics_port
        if base is not None:
            port = base + len(self.services) if base else free_port()
            env["TAGPIPE_METRICS_PORT"] = str(port)
            svc.metrics_url = f"http://127.0.0.1:{port}/metrics"
        return svc

    def _start_services(self) -> None:
        cfg = self.config
        gateway = self._service(
            "gateway",
            "tagpipe-gateway",
            {"TAGPIPE_PORT": str(self.port), "TAGPIPE_HOST": "127.0.0.1", **cfg.gateway_env},
            health=False,
        )
        gateway.health_url = self.gateway_url + "/readyz"
        self.services = [gateway]
        for i in range(cfg.downloaders):
            env = {"TAGPIPE_ALLOW_CIDRS": cfg.allow_cidrs, **cfg.downloader_env}
            self.services.append(self._service(f"downloader-{i}", "tagpipe-downloader", env, True))
        for i in range(cfg.inference):
            self.services.append(
                self._service(f"inference-{i}", "tagpipe-inference", cfg.inference_env, True)
            )
        for svc in self.services:
            svc.start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        pending = [s for s in self.services if s.health_url]
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for svc in list(pending):
                    if not svc.alive:
                        raise ServerStartError(f"{svc.name} exited:\n{svc.log_tail()}")
                    assert svc.health_url is not None
                    try:
                        if client.get(svc.health_url).status_code == 200:
                            pending.remove(svc)
                    except httpx.HTTPError:
                        pass
                if pending and time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    raise ServerStartError(f"not ready in time: {names}\n{pending[0].log_tail()}")
                if pending:
                    time.sleep(0.2)

    def service(self, name: str) -> Service:
        """`gateway`, `downloader-0`, `inference-1`, ..."""
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(f"no service {name!r}: {[s.name for s in self.services]}")

    def dead(self) -> list[Service]:
        """Services that exited (for a supervisor loop)."""
        return [s for s in self.services if s.proc is not None and not s.alive]

    def crashed(self) -> list[Service]:
        """Services that died, now or at any time before a supervisor restarted them."""
        return [s for s in self.services if s.crashes or (s.proc is not None and not s.alive)]

    def stop(self, grace_s: float = 15.0) -> None:
        self.stopping = True
        # Pipeline order: stop taking work, then drain downloads, then inference.
        for group in ("gateway", "downloader", "inference"):
            members = [s for s in self.services if s.name.startswith(group)]
            for svc in members:
                svc.signal(signal.SIGTERM)
            for svc in members:
                if not svc.wait(grace_s):
                    svc.signal(signal.SIGKILL)
                    svc.wait(5)
        for srv in (self.redis, self.nats):
            if srv is not None:
                srv.stop()
        if self.redis_set is not None:
            self.redis_set.stop()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
