"""Where each tagpipe service spends its CPU during `make bench`'s bulk run.

    python -m bench.profile_services --label after      (make bench-profile)

The same run as `make bench`'s tagpipe row (its 2-core setting, the same
corpus, image server latency and 2 req/s real-time load), with py-spy
(PyPI, the `bench` extra) attached to the gateway, downloader and inference
after the warm-up and detached when the bulk job ends. Per service it writes
a flame graph, `bench/results/profiles/<service>-<label>.svg`, and the
collapsed stacks behind it are summarised into `profile-<label>.json`: CPU
ms/image per process (from the same CpuMeter as `make bench`) and the
functions costing the most, in CPU ms/image (see `summarise`).

py-spy samples from outside (`--nonblocking`: the services are never paused),
so the services run as they would; its own CPU is the harness's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.baselines import corpus as corpus_mod
from bench.baselines import load
from bench.baselines.cpu import CpuMeter
from bench.baselines.runners import MODEL_DIR, ROOT, process
from bench.bench_e2e import TAGPIPE_CONFIGS, bulk_job

OUT = ROOT / "bench" / "results" / "profiles"
SERVICES = ("gateway", "downloader-0", "inference-0")
RATE_HZ = 97  # not a divisor of the services' own timers (100 ms ticks)
TOP = 12  # functions listed per service
# Frames every stack passes through: listing them says nothing about the cost.
_PLUMBING = re.compile(
    r"\((threading|selectors|concurrent/futures/thread|asyncio/(base_events|runners|events)"
    r"|uvicorn/(server|main|_compat)|tagpipe_\w+/__main__)\.py\)"
)


def _pyspy(pid: int, out: Path, fmt: str) -> subprocess.Popen[bytes]:
    cmd = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE_HZ),
        "--nonblocking",
        "--format",
        fmt,
        "--output",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# What a sample is spent on: the first of these (in this order) that matches a
# frame of its stack; "other" is the event loop itself, task switching and the
# workers' own code.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(rx))
    for name, rx in (
        ("model (onnxruntime)", r"Session\.run "),
        ("normalise (numpy)", r"Model\.preprocess "),
        ("decode, resize, crop (Pillow)", r"\((PIL/|tagpipe_downloader/(decode|forward)\.py)"),
        ("hop encode/decode (Pillow)", r"\((tagpipe_downloader/hop|tagpipe_inference/decoders)"),
        (
            "tracing (OpenTelemetry)",
            r"\(opentelemetry/|\(tagpipe_\w+/spans\.py|record_span|_spans ",
        ),
        ("logging (JSON lines)", r"\(logging/|log_item_timings"),
        ("NATS client + socket writes", r"\(nats/"),
        ("Redis client", r"\(redis/"),
        ("HTTP fetch (aiohttp)", r"\(aiohttp/|\(tagpipe_downloader/fetch\.py"),
        ("messages (pydantic/json)", r"\(pydantic|\(json/|\(tagpipe_common/messages|items\.py"),
        ("HTTP serving (uvicorn/starlette)", r"\((uvicorn|starlette|fastapi|h11|anyio)/"),
    )
]


def category(frames: list[str]) -> str:
    for name, rx in CATEGORIES:
        if any(rx.search(f) for f in frames):
            return name
    return "other (event loop, tasks, worker code)"


# Leaf frames of a thread blocked in a wait: --nonblocking sampling cannot always
# tell them from work, so they are left out of the shares.
_WAITING = re.compile(
    r"^(EpollSelector\.select \(selectors|_worker \(concurrent/futures/thread"
    r"|(Condition|Event)\.wait \(threading)"
)


def summarise(collapsed: Path, cpu_ms: float) -> dict[str, Any]:
    """Inclusive and self CPU ms/image per function from py-spy's raw (collapsed) stacks.

    py-spy counts a thread that is runnable (waiting for the GIL or a core) as
    busy, so raw samples over-count on 2 shared cores; each function's share of
    the samples (waits left out) is applied to the process's measured CPU
    ms/image instead.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if not frames or _WAITING.match(frames[-1]):
            continue
        total += n
        for f in set(frames):
            if not _PLUMBING.search(f):
                inclusive[f] += n
        own[frames[-1]] += n
        cats[category(frames)] += n
    per = cpu_ms / max(total, 1)

    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(n * per, 2)] for f, n in c.most_common(TOP)]

    return {
        "cpu_ms_per_image": round(cpu_ms, 2),
        "samples": total,
        "by_category": {k: round(n * per, 2) for k, n in cats.most_common()},
        "top_inclusive": top(inclusive),
        "top_self": top(own),
    }


def _short(frame: str) -> str:
    """`fn (/long/path/site-packages/pkg/mod.py:12)` -> `fn (pkg/mod.py)`."""
    m = re.match(r"(.*) \((.*?):?\d*\)$", frame)
    if not m:
        return frame
    fn, path = m.groups()
    path = re.sub(r".*(site-packages|lib/python3\.\d+|services/\w+|common|cli)/", "", path)
    return f"{fn} ({path.rstrip(':')})"


async def profile(args: argparse.Namespace) -> dict[str, Any]:
    from tagpipe_cli.stack import Stack, StackConfig

    mix = {"thumb": 0.8, "phone": 0.2}
    cdir = ROOT / ".tagpipe" / "bench-corpus"
    corpus = corpus_mod.build(cdir, args.images, mix)
    rt_corpus = corpus_mod.build(cdir, 200, mix)
    conf = TAGPIPE_CONFIGS[-1]
    extra = dict(kv.split("=", 1) for kv in args.env)
    server = [sys.executable, "-m", "bench.baselines.corpus", "--dir", str(cdir)]
    server += ["--latency-ms", "50"]
    with process(server, stdout=subprocess.PIPE) as srv:
        assert srv.stdout is not None
        img_base = (await asyncio.to_thread(srv.stdout.readline)).strip()
        cfg = StackConfig(
            data_dir=ROOT / ".tagpipe" / "bench-profile-stack",
            inference=1,
            model_dir=MODEL_DIR,
            allow_cidrs="127.0.0.0/8",
            fresh=True,
            env=extra,
            downloader_env=conf["downloader_env"],
            inference_env=conf["inference_env"],
        )
        stack = await asyncio.to_thread(Stack(cfg).start)
        try:
            return await _measure(stack, img_base, corpus.names, rt_corpus.names, srv.pid, args)
        finally:
            await asyncio.to_thread(stack.stop)


async def _measure(
    stack: Any, img_base: str, names: list[str], rt_names: list[str], srv_pid: int, args: Any
) -> dict[str, Any]:
    base = stack.gateway_url
    urls = [f"{img_base}/img/{n}" for n in names]
    rt_urls = [f"{img_base}/img/{n}~rt" for n in rt_names]
    OUT.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def realtime(url: str) -> bool:
            async with s.post(f"{base}/v1/tags", json={"url": url}) as r:
                body = await r.json(content_type=None)
                return r.status == 200 and body["items"][0]["status"] == "ok"

        await load.closed_loop(realtime, rt_urls[:16], 8)
        spies = {}
        for name in SERVICES:
            pid = stack.service(name).proc.pid
            svg = OUT / f"{name.split('-')[0]}-{args.label}.svg"
            raw = _raw_path(name, args.label)
            spies[name] = (_pyspy(pid, svg, "flamegraph"), _pyspy(pid, raw, "raw"), raw)
        await asyncio.sleep(1.0)  # py-spy attaches
        spy_pids = {p.pid for a, b, _ in spies.values() for p in (a, b)}
        meter = CpuMeter(exclude={srv_pid, *spy_pids})
        meter.start()
        stop = asyncio.Event()
        rt_task = asyncio.create_task(load.open_loop(realtime, rt_urls, 2.0, stop))
        _, bulk = await bulk_job(s, base, urls, stack)
        stop.set()
        rt = await rt_task
        cpu = meter.stop(bulk["ok"] + rt.ok)
    images = bulk["ok"] + rt.ok
    seconds = bulk["seconds"]
    out: dict[str, Any] = {"bulk": bulk, "realtime": rt.summary(), "cpu": cpu, "services": {}}
    for name, (svg_p, raw_p, raw) in spies.items():
        for p in (svg_p, raw_p):
            p.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        for p in (svg_p, raw_p):
            await asyncio.to_thread(p.wait, 60)
        short = name.split("-")[0]
        cores = cpu["cores_by_process"].get(f"tagpipe-{short}", 0.0)
        out["services"][short] = summarise(raw, 1000 * cores * seconds / images)
    return out


def _again(label: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((OUT / f"profile-{label}.json").read_text())
    for name in SERVICES:
        short = name.split("-")[0]
        ms = doc["services"][short]["cpu_ms_per_image"]
        doc["services"][short] = summarise(_raw_path(name, label), ms)
    return doc


def _raw_path(name: str, label: str) -> Path:
    return Path(f"/tmp/tagpipe-profile-{name}-{label}.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--label", required=True, help="before / after: names the output files")
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for every service")
    ap.add_argument("--again", action="store_true", help="re-summarise the last run's stacks")
    args = ap.parse_args()
    doc = _again(args.label) if args.again else asyncio.run(profile(args))
    doc["label"], doc["env"] = args.label, args.env
    path = OUT / f"profile-{args.label}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("bulk", "cpu")}, indent=2))
    for name, s in doc["services"].items():
        print(f"\n{name}: {s['cpu_ms_per_image']} CPU ms/img")
        for f, ms in s["by_category"].items():
            print(f"  {ms:7.2f}  {f}")


if __name__ == "__main__":
    main()
