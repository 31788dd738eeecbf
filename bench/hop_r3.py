"""The inference hop's encoding on replicated streams: tagpipe on a 3-server
JetStream cluster with R3 streams (`make bench`'s tagpipe_r3 row, its 2-core
tuning), once per `TAGPIPE_HOP_ENCODING`, in one run.

    python -m bench.hop_r3 jpeg raw        -> bench/results/hop-r3.json

On one node a compressed hop costs more CPU than it saves (hop-encoding.json's
through_jetstream); with three servers storing every frame it may not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bench.baselines import corpus as corpus_mod
from bench.baselines.runners import ROOT, process
from bench.bench_e2e import TAGPIPE_CONFIGS, _tagpipe_once, machine


async def run(encodings: list[str]) -> dict[str, Any]:
    mix = {"thumb": 0.8, "phone": 0.2}
    cdir = ROOT / ".tagpipe" / "bench-corpus"
    corpus, rt = corpus_mod.build(cdir, 800, mix), corpus_mod.build(cdir, 200, mix)
    cmd = [sys.executable, "-m", "bench.baselines.corpus", "--dir", str(cdir)]
    runs: dict[str, Any] = {}
    with process([*cmd, "--latency-ms", "50"], stdout=subprocess.PIPE) as srv:
        assert srv.stdout is not None
        base = (await asyncio.to_thread(srv.stdout.readline)).strip()
        args = argparse.Namespace(harness_pids=(srv.pid,), rt_rate=2.0, downloaders=1)
        urls = [f"{base}/img/{n}" for n in corpus.names]
        rt_urls = [f"{base}/img/{n}~rt" for n in rt.names]
        for enc in encodings:
            conf = {k: dict(v) for k, v in TAGPIPE_CONFIGS[-1].items()}
            conf["downloader_env"]["TAGPIPE_HOP_ENCODING"] = enc
            runs[enc] = await _tagpipe_once(urls, rt_urls, args, conf, 3)
            print(enc, runs[enc]["images_per_s"], runs[enc]["cpu"], flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("encodings", nargs="+", choices=["raw", "jpeg", "webp-lossless"])
    args = ap.parse_args()
    doc = {
        "benchmark": "hop-r3",
        "machine": machine(),
        "runs": asyncio.run(run(args.encodings)),
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (ROOT / "bench" / "results" / "hop-r3.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
