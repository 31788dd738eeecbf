"""Run render()'s objects in podman: a mechanical translation, never a second copy.

Each rendered Deployment becomes one container (replicas are the operator's business):
its init containers first, each run to completion, then the main container. Everything
the container is told comes from the rendered object: command and args, `envFrom`
(ConfigMap from the same render, Secrets from the test), `env` (values and
`secretKeyRef`), volumes (`emptyDir` as a per-pod host directory shared by its init and
main containers, mode 1777 like the kubelet's; `secret` as files), `securityContext`
(user, read-only root, dropped capabilities, no privilege escalation), ports, readiness
`httpGet`, the preStop `exec` hook and `terminationGracePeriodSeconds` (podman's stop
timeout: SIGTERM, then SIGKILL when it runs out, as the kubelet does). A volume or env
source it does not know fails loudly. Not applied: resources, and the liveness and startup
probes (nothing here restarts a container as the kubelet would).

Why not `podman kube play`: Debian 12's podman 4.3 maps only the liveness probe (to a
healthcheck), and its pods need a pause image built from catatonit. A translation lets the
test wait on the rendered readiness probe and run the kubelet's stop sequence itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tagpipe_cli.servers import ServerProcess, free_port

from bench.imageserver import ImageServer

Manifest = dict[str, Any]
NETWORK = "podman"  # podman's default bridge (CNI on Debian 12)
PREFIX = "tagpipe"  # spec.nats.prefix: the streams' and Redis keys' prefix (tests.faults.kit's)
API_KEY = "containers-test-key"


@dataclass
class Hosts:
    """The host processes the pods talk to, and the host's address on podman's bridge."""

    ip: str
    subnet: str
    nats: ServerProcess
    redis: ServerProcess
    s3_env: dict[str, str]
    images: ImageServer


def podman(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: rc={proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def bridge_gateway() -> tuple[str, str]:
    """The host's address on podman's bridge and the bridge's subnet."""
    out = podman(
        "network",
        "inspect",
        NETWORK,
        "--format",
        "{{range .Subnets}}{{.Gateway}} {{.Subnet}}{{end}}",
    ).stdout.split()
    return out[0], out[1]


@dataclass
class Pod:
    """One rendered Deployment's pod, running as containers named <prefix>-<component>."""

    component: str
    container: Manifest
    grace_s: int
    name: str
    host_ports: dict[str, int] = field(default_factory=dict)  # port name -> host port

    def url(self, port_name: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.host_ports[port_name]}{path}"

    def ready(self) -> bool:
        probe = self.container["readinessProbe"]["httpGet"]
        port = probe["port"]
        name = port if isinstance(port, str) else self._port_name(port)
        try:
            return httpx.get(self.url(name, probe.get("path", "/")), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _port_name(self, number: int) -> str:
        (name,) = [p["name"] for p in self.container["ports"] if p["containerPort"] == number]
        return str(name)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            state = podman("inspect", self.name, "--format", "{{.State.Status}}").stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman("logs", "--tail", "40", self.name, check=False)
                raise AssertionError(
                    f"{self.name} not ready ({state}):\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(0.5)

    def terminate(self) -> int:
        """What the kubelet does to a deleted pod: preStop, then SIGTERM, then SIGKILL once
        the grace period (less the hook's time) is over. Returns the exit code."""
        start = time.monotonic()
        hook = self.container.get("lifecycle", {}).get("preStop")
        if hook is not None:
            podman("exec", self.name, *hook["exec"]["command"])
        left = max(1, round(self.grace_s - (time.monotonic() - start)))
        podman("stop", "--time", str(left), self.name, timeout=left + 60)
        return int(podman("inspect", self.name, "--format", "{{.State.ExitCode}}").stdout)

    def restart(self) -> None:
        podman("start", self.name)


@dataclass
class Cluster:
    """The rendered objects of one TagPipeline, the Secrets they name, a work directory."""

    objects: list[Manifest]
    secrets: dict[str, dict[str, str]]
    workdir: Path
    prefix: str = "tagpipe-ct"
    pods: dict[str, Pod] = field(default_factory=dict)

    def config_map(self, name: str) -> dict[str, str]:
        (cm,) = [
            o for o in self.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
        ]
        return dict(cm["data"])

    def deployment(self, component: str) -> Manifest:
        (d,) = [
            o
            for o in self.objects
            if o["kind"] == "Deployment"
            and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
        ]
        return d

    def env(self, container: Manifest) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom", []):
            if "configMapRef" in src:
                env.update(self.config_map(src["configMapRef"]["name"]))
            else:
                env.update(self.secrets[src["secretRef"]["name"]])
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    def volumes(self, component: str, pod_spec: Manifest) -> dict[str, Path]:
        out = {}
        for vol in pod_spec.get("volumes", []):
            path = self.workdir / component / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in vol:
                path.chmod(0o1777)
            elif "secret" in vol:
                for key, value in self.secrets[vol["secret"]["secretName"]].items():
                    (path / key).write_text(value)
                    (path / key).chmod(0o644)
            else:
                raise NotImplementedError(f"volume {vol} (the test renders emptyDir/secret only)")
            out[vol["name"]] = path
        return out

    def run_args(self, container: Manifest, pod_spec: Manifest, vols: dict[str, Path]) -> list[str]:
        psc, sc = pod_spec.get("securityContext", {}), container.get("securityContext", {})
        args = ["--network", NETWORK, "--user", f"{psc['runAsUser']}:{psc['runAsGroup']}"]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += [f"--cap-drop={cap.lower()}"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt=no-new-privileges"]
        for m in container.get("volumeMounts", []):
            src = vols[m["name"]] / m.get("subPath", "")
            args += ["-v", f"{src}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}"]
        for k, v in self.env(container).items():
            args += ["-e", f"{k}={v}"]
        return [
            *args,
            "--entrypoint",
            json.dumps(container["command"]),
            container["image"],
            *container.get("args", []),
        ]

    def start(self, component: str) -> Pod:
        pod_spec = self.deployment(component)["spec"]["template"]["spec"]
        vols = self.volumes(component, pod_spec)
        name = f"{self.prefix}-{component}"
        for init in pod_spec.get("initContainers", []):
            init_name = f"{name}-{init['name']}"
            proc = podman(
                "run", "--name", init_name, *self.run_args(init, pod_spec, vols), check=False
            )
            assert proc.returncode == 0, f"init container {init_name}: {proc.stdout}{proc.stderr}"
        (main,) = pod_spec["containers"]
        pod = Pod(component, main, int(pod_spec["terminationGracePeriodSeconds"]), name)
        publish = []
        for port in main["ports"]:
            pod.host_ports[port["name"]] = free_port()
            publish += ["-p", f"127.0.0.1:{pod.host_ports[port['name']]}:{port['containerPort']}"]
        podman(
            "run",
            "-d",
            "--name",
            name,
            "--stop-timeout",
            str(pod.grace_s),
            *publish,
            *self.run_args(main, pod_spec, vols),
        )
        self.pods[component] = pod
        return pod

    def logs(self) -> str:
        out = []
        for pod in self.pods.values():
            proc = podman("logs", "--tail", "30", pod.name, check=False)
            out.append(f"--- {pod.name}\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)

    def remove_containers(self) -> None:
        names = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        mine = [n for n in names if n.startswith(f"{self.prefix}-")]
        if mine:
            podman("rm", "-f", "-t", "0", *mine, check=False)

    def remove(self) -> None:
        self.remove_containers()
        if os.environ.get("TAGPIPE_KEEP_WORKDIR") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)
