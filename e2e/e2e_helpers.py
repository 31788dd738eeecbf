"""Helpers shared by the e2e tests (a unique module name: tests/ has a conftest too).

The cluster is a real API server: objects go through admission, schema validation and
garbage collection, and reads return every transient shape (404 while a create settles,
409 on a race, 5xx while the server is busy). Waits treat those as "not yet".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.kube_rest import ApiError
from tests.tools import eventually as _eventually

ROOT = Path(__file__).resolve().parents[1]
TRANSIENT_STATUS = {409, 429, 500, 502, 503, 504}
TP_PATH = "/apis/tagpipe.io/v1alpha1/namespaces/{ns}/tagpipelines"


def conditions(obj: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Conditions of any object, whatever transient shape its status has: a just-created
    object may have no status, then `conditions: null`, before it has a list."""
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


async def eventually(check: Callable[[], Any], within: float = 60.0) -> Any:
    """tests.tools.eventually at a real API server's pace (twice a second), where a
    transient API error means "not yet" and any other error fails at once."""

    async def tolerant() -> Any:
        try:
            value = check()
            return await value if hasattr(value, "__await__") else value
        except ApiError as exc:
            if exc.status in TRANSIENT_STATUS:
                return None
            raise

    return await _eventually(tolerant, within=within, every=0.5)


def tool(name: str) -> str:
    """helm or kubectl as `make tools` unpacked them; e2e fails (never skips) without them."""
    local = ROOT / ".bin" / name
    assert local.is_file(), f"{local} is missing: run `make tools`"
    return str(local)


def run(name: str, *args: str, check: bool = True, stdin: str | None = None) -> str:
    """Run helm/kubectl against $KUBECONFIG; returns stdout, fails with stderr."""
    proc = subprocess.run(
        [tool(name), *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, f"{name} {' '.join(args)}: {proc.stderr.strip()}"
    return proc.stdout


def admin_kubeconfig() -> Path:
    """The kubeconfig the suite runs with (the first of $KUBECONFIG)."""
    return Path(os.environ["KUBECONFIG"].split(os.pathsep)[0])


def token_kubeconfig(admin_kubeconfig: Path, token: str, out: Path) -> Path:
    """A kubeconfig for the same cluster that authenticates with a bearer token only."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    ctx = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == ctx["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
        "current-context": "sa",
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


@dataclass
class OperatorProcess:
    """`python -m tagpipe_operator` as its own process, with the chart's ServiceAccount token."""

    kubeconfig: Path
    namespace: str
    log_path: Path
    settings: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TAGPIPE_") and k not in ("POD_NAME", "POD_NAMESPACE")
        }
        env.update(KUBECONFIG=str(self.kubeconfig), TAGPIPE_NAMESPACE=self.namespace)
        env.update(TAGPIPE_HEALTH_PORT="0", TAGPIPE_METRICS_PORT="0", TAGPIPE_LOG_JSON="true")
        env.update(self.settings)
        return env

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tagpipe_operator"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no Lease release (a node lost, an OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def records(self) -> list[dict[str, Any]]:
        """Every log line as a record; a line that is not JSON (a raw traceback) is
        kept as {"level": "RAW", "msg": line} so that checks see it."""
        out = []
        for line in self.lines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            out.append(rec if isinstance(rec, dict) else {"level": "RAW", "msg": line})
        return out

    def forbidden(self) -> list[str]:
        """Log lines where the API server refused the operator (403): RBAC too narrow.
        A ResourceQuota's refusal is a 403 too, but not RBAC's (which always says the
        user "cannot" do something): it is left out."""
        return [
            ln
            for ln in self.lines()
            if ("HTTP 403" in ln or "forbidden" in ln.lower())
            and ("cannot " in ln or "exceeded quota" not in ln)
        ]

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])


def tagpipeline(
    name: str,
    nats_url: str,
    prefix: str,
    downloader: dict[str, Any],
    inference: dict[str, Any] | None = None,
    policy: str = "Delete",
) -> dict[str, Any]:
    """A CPU TagPipeline whose tests differ in the stages' specs only."""
    return {
        "apiVersion": "tagpipe.io/v1alpha1",
        "kind": "TagPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "m", "version": "1", "storageUri": "pvc://models/m"},
            "nats": {"url": nats_url, "prefix": prefix},
            "redis": {"url": "redis://redis:6379/0"},
            "inference": {"gpu": 0, **(inference or {})},
            "downloader": downloader,
            "deletionPolicy": policy,
        },
    }
