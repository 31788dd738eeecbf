"""The benchmark corpus and its image server process.

Images come from bench/imageserver.py's photo-like generator (the downloader
bench uses the same), cached on disk so a rerun doesn't pay to generate them.
The server runs in its own process so its CPU shows up as what it is: part of
the machine's load, equal for every system measured.

    python -m bench.baselines.corpus --dir .tagpipe/bench-corpus --latency-ms 50 --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.imageserver import ImageServer, make_jpeg

SIZES = {"thumb": (640, 480), "phone": (4032, 3024)}


@dataclass(frozen=True)
class Corpus:
    names: list[str]  # one per image in the run, in request order
    files: dict[str, Path]  # unique name -> JPEG on disk
    mix: dict[str, float]

    def load(self) -> list[bytes]:
        cache = {n: p.read_bytes() for n, p in self.files.items()}
        return [cache[n.split("~")[0]] for n in self.names]


def build(directory: Path, size: int, mix: dict[str, float], unique: int = 24) -> Corpus:
    """`size` requests drawn from `unique` distinct images per class, in the mix.

    Each request gets its own name (`base~i`) so no layer can serve it from a
    cache keyed by URL; the bytes behind it are shared to keep memory small.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    counts = {c: round(size * share) for c, share in mix.items()}
    counts[max(counts, key=lambda c: counts[c])] += size - sum(counts.values())
    names: list[str] = []
    for cls, n in counts.items():
        w, h = SIZES[cls]
        for seed in range(min(unique, max(n, 1))):
            name = f"{cls}-{seed}"
            path = directory / f"{name}.jpg"
            if not path.exists():
                path.write_bytes(make_jpeg(w, h, seed=seed))
            files[name] = path
        names += [f"{cls}-{i % min(unique, n)}~{i}" for i in range(n)]
    random.Random(1).shuffle(names)  # classes interleaved, as real traffic is
    return Corpus(names, files, dict(mix))


async def _serve(directory: Path, host: str, port: int, latency_ms: float) -> None:
    files = {p.stem: p.read_bytes() for p in sorted(directory.glob("*.jpg"))}  # noqa: ASYNC240
    async with ImageServer(host, port, latency_ms) as srv:
        for name, body in files.items():
            srv.add(name, body)
        # Any `name~i` resolves to `name`: distinct URLs, shared bytes.
        srv._serve = _aliasing(srv)  # type: ignore[method-assign]
        print(srv.url(""), flush=True)
        await asyncio.Event().wait()


def _aliasing(srv: ImageServer):  # type: ignore[no-untyped-def]
    original = ImageServer._serve

    def serve(name: str):  # type: ignore[no-untyped-def]
        return original(srv, name.split("~")[0])

    return serve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    args = ap.parse_args()
    try:
        asyncio.run(_serve(args.dir, args.host, args.port, args.latency_ms))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
