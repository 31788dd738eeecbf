"""Text and chart output for `tagpipe simulate` (kept apart from the model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tagpipe_cli.simulate import SimResult


def render(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"trace {s['trace']}: {s['arrivals']:,} images over {s['hours']} h "
        f"(mean {s['mean_rate_img_s']:,.0f}/s, peak {s['peak_rate_img_s']:,.0f}/s), "
        f"tick {s['tick_s']:g} s",
        f"completed {s['completed']:,}, still queued at end {s['queued_at_end']:,}",
        f"time with oldest image older than {s['latency_target_s']:g} s: "
        f"{s['time_over_latency_target_s']:,.0f} s (max age {s['max_head_of_line_age_s']:,.0f} s)",
        "",
        f"{'stage':<11} {'img/s/rep':>9} {'peak backlog':>12} {'max rep':>8} "
        f"{'rep-hours':>10} {'static':>8} {'ratio':>6} {'static+hr':>9} {'ratio':>6} "
        f"{'events':>7} {'reversals':>9}",
    ]
    for st in s["stages"]:
        lines.append(
            f"{st['stage']:<11} {st['per_replica_img_s']:>9,.1f} {st['peak_backlog']:>12,} "
            f"{st['max_replicas']:>8,} {st['replica_hours']:>10,.0f} "
            f"{st['static_replica_hours']:>8,.0f} {st['vs_static']:>6.2f} "
            f"{st['static_headroom_replica_hours']:>9,.0f} {st['vs_static_headroom']:>6.2f} "
            f"{st['scale_events']:>7,} {st['direction_reversals']:>9,}"
        )
    lines += [
        "",
        "static = replicas for the trace's peak rate held all day, with no headroom;",
        "static+hr = the same with the headroom the autoscaler keeps (target_backlog/in_flight)",
        "latency is resolved to one tick; events = replica changes, reversals = up<->down flips",
        f"chart: {s.get('chart', '-')}",
    ]
    return "\n".join(lines)


def plot(res: SimResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit: runs in CI and containers
    import matplotlib.pyplot as plt

    tr = res.trace
    hours = np.arange(len(tr.arrivals)) * tr.tick_s / 3600
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax_rate, ax_backlog, ax_rep = axes
    ax_rate.plot(hours, tr.arrivals / tr.tick_s, lw=0.8, label="arrivals")
    ax_rate.plot(hours, res.stages[-1].served / tr.tick_s, lw=0.8, label="completed")
    ax_rate.set_ylabel("images/s")
    ax_rate.legend(loc="upper left")
    ax_rate.set_title(f"tagpipe simulate: {tr.name} trace through operator decide()")
    for s in res.stages:
        ax_backlog.plot(hours, s.backlog, lw=0.8, label=f"{s.name} queued")
        ax_rep.plot(hours, s.desired, lw=0.8, label=f"{s.name} replicas")
        ax_rep.plot(hours, s.ready, lw=0.6, ls="--", label=f"{s.name} ready")
    ax_backlog.set_ylabel("backlog (images)")
    ax_backlog.legend(loc="upper left")
    ax_rep.set_ylabel("replicas")
    ax_rep.set_xlabel("hours")
    ax_rep.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
