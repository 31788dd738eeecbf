"""Summarise a memray capture of an inference process (from `bench.soak --memray DIR`).

Prints RSS against the traced heap over time (heap flat while RSS climbs would be
allocator fragmentation; both climbing is memory held by someone), then the
largest allocating call stacks at the heap's high-water mark and still held at exit:

    python -m bench.memray_report /tmp/soak-memray/inference-1234.bin

`memray tree`/`summary` fail on some native-mode captures (an assertion while
merging hybrid stacks), so this reads the file with memray's FileReader and
groups by the Python stack alone.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from typing import Any

from memray import FileReader


def where(rec: Any, depth: int) -> str:
    try:
        frames = rec.stack_trace(max_stacks=depth)
    except Exception:  # memray raises bare errors for frames it cannot resolve
        frames = []
    return " <- ".join(f"{fn}:{file.rsplit('/', 1)[-1]}:{line}" for fn, file, line in frames) or "?"


def top(title: str, records: Iterable[Any], depth: int, n: int) -> None:
    size: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for rec in records:
        key = where(rec, depth)
        size[key] += rec.size
        count[key] += rec.n_allocations
    print(f"\n== {title}: {sum(size.values()) / 2**20:.1f} MiB in the heap ==")
    for key, b in size.most_common(n):
        print(f"{b / 2**20:8.1f} MiB {count[key]:8d} allocs  {key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("capture")
    ap.add_argument("--points", type=int, default=20, help="timeline rows")
    ap.add_argument("--depth", type=int, default=4, help="Python frames per stack")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    reader = FileReader(args.capture)
    snaps = list(reader.get_memory_snapshots())
    t0 = snaps[0].time
    print(f"{args.capture}: {len(snaps)} memory snapshots")
    for s in [*snaps[:: max(1, len(snaps) // args.points)], snaps[-1]]:
        rss, heap = s.rss / 2**20, s.heap / 2**20
        print(f"t={(s.time - t0) / 1000:7.1f} s  rss={rss:7.1f} MiB  heap={heap:7.1f} MiB")
    top(
        "high-water mark",
        reader.get_high_watermark_allocation_records(merge_threads=True),
        args.depth,
        args.top,
    )
    top(
        "still held at exit",
        reader.get_leaked_allocation_records(merge_threads=True),
        args.depth,
        args.top,
    )


if __name__ == "__main__":
    main()
