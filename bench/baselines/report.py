"""e2e.json -> a markdown table (spliced into docs/benchmarks.md) and a PNG chart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

START, END = "<!-- bench:e2e:start -->", "<!-- bench:e2e:end -->"
ORDER = ("ideal", "tagpipe", "tagpipe_r3", "naive", "ray_serve")
LABELS = {
    "ideal": "ideal (in-process loop, bytes in memory)",
    "tagpipe": "tagpipe (local stack, bulk job)",
    "tagpipe_r3": "tagpipe, 3 NATS servers, R3 streams",
    "naive": "naive monolith (FastAPI, batch 1)",
    "ray_serve": "Ray Serve peer (@serve.batch)",
}


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    m, c = doc["machine"], doc["corpus"]
    mix = ", ".join(f"{k} {v:.0%}" for k, v in c["mix"].items())
    lines = [
        f"Run {doc['finished_at']} on {m['cpu_model']}, {m['cores']} cores "
        f"({m['python']}, onnxruntime {m['onnxruntime']}). Corpus: {c['images']} images "
        f"({mix}; thumb = 640x480, phone = 4032x3024 JPEG), image server latency "
        f"{c['latency_ms']:g} ms. Real-time load: {doc['realtime_rate']:g} req/s of one image "
        "each, open-loop, during the bulk run.",
        "",
        "| system | bulk images/s | x ideal | x ideal just before | CPU ms/image | "
        "x ideal (CPU) | real-time p50 ms | p95 ms | p99 ms | rt failed | other cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ORDER:
        s = doc["systems"].get(key)
        if s is None:
            continue
        if "error" in s:
            lines.append(f"| {LABELS[key]} | failed: {s['error'][:80]} |" + " |" * 10)
            continue
        rt = s.get("realtime") or {}
        cpu = s.get("cpu") or {}
        lines.append(
            f"| {LABELS[key]} | {s['images_per_s']:,.1f} | {s.get('vs_ideal', float('nan')):.2f} | "
            f"{_x(s.get('vs_adjacent_ideal'))} | "
            f"{cpu.get('cpu_ms_per_image', '-')} | {s.get('cpu_vs_ideal', float('nan')):.2f} | "
            f"{_ms(rt.get('p50_ms'))} | {_ms(rt.get('p95_ms'))} | {_ms(rt.get('p99_ms'))} | "
            f"{rt.get('failed', '-')} | {cpu.get('other_cores_busy', '-')} |"
        )
    rep = doc.get("replication")
    if rep:
        rate, cpu = rep["images_per_s_r3_over_r1"], rep["cpu_ms_per_image_r3_over_r1"]
        lines += [
            "",
            f"Replication (R3 on 3 NATS servers vs R1 on one): {rate:.2f}x the images/s, "
            f"{'-' if cpu is None else f'{cpu:.2f}x'} the CPU ms per image.",
        ]
    goals = doc.get("goals", {})
    if goals:
        lines += ["", "Goals on this run:", ""] + [f"- {k}: {v}" for k, v in goals.items()]
    return "\n".join(lines)


def splice(md_path: Path, table: str) -> None:
    """Replace the text between the markers; keep the hand-written analysis around it."""
    text = md_path.read_text() if md_path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ORDER if k in doc["systems"] and "error" not in doc["systems"][k]]
    rates = [doc["systems"][k]["images_per_s"] for k in keys]
    p95 = [(doc["systems"][k].get("realtime") or {}).get("p95_ms") or 0 for k in keys]
    cpu = [(doc["systems"][k].get("cpu") or {}).get("cpu_ms_per_image") or 0 for k in keys]
    colors = {
        "ideal": "#999",
        "tagpipe": "#2a7",
        "tagpipe_r3": "#7c5",
        "naive": "#c55",
        "ray_serve": "#57c",
    }
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    panels = (
        (ax1, rates, "bulk images/s (wall clock)", "throughput", "{:.1f}"),
        (ax2, cpu, "CPU ms per image (lower is better)", "CPU cost", "{:.1f}"),
        (ax3, p95, "real-time p95 latency, ms", "real-time latency during bulk", "{:,.0f}"),
    )
    for ax, values, ylabel, title, fmt in panels:
        shown = [(k, v) for k, v in zip(keys, values, strict=True) if v]
        ax.bar([k for k, _ in shown], [v for _, v in shown], color=[colors[k] for k, _ in shown])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        for i, (_, v) in enumerate(shown):
            ax.text(i, v, fmt.format(v), ha="center", va="bottom")
    fig.suptitle(
        f"{doc['machine']['cores']} cores, image latency {doc['corpus']['latency_ms']:g} ms, "
        f"{doc['corpus']['images']} images"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
