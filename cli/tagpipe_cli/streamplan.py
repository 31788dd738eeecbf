"""`tagpipe plan`'s flow-control section: the consumer limits a plan implies, and
each stream's peak load, from the wire contracts' real message sizes.

Pure: sizes come from serialising sample messages (download task) and from
`make bench-hop`'s measured crop sizes (inference hop); nothing is assumed that
the output does not label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tagpipe_common.flowlimits import ConsumerLimits, StreamLoad, consumer_limits
from tagpipe_common.messages import DownloadTask, InferenceTask
from tagpipe_common.subjects import Lane, Stage, stage_names

# The CRD's defaults: downloader concurrency, and inference's two batches of 32.
DOWNLOAD_SLOTS = 32
INFERENCE_SLOTS = 64
RAW_CROP = (224, 224, 3)
# bench-hop's label for each hop encoding's measured crop sizes.
_HOP_LABELS = {
    "jpeg": "jpeg q95 4:4:4 (hop: jpeg)",
    "webp-lossless": "webp lossless (hop: webp-lossless)",
    "original": "small JPEGs as downloaded (hop: original)",
}


@dataclass(frozen=True)
class StageFlow:
    stage: str
    replicas: int
    slots: int
    limits: ConsumerLimits
    load: StreamLoad


def download_task_bytes(url_chars: int = 120) -> int:
    """A bulk download task as it crosses NATS, with a URL of `url_chars` characters."""
    task = DownloadTask(
        item_id="0" * 32,
        job_id="0" * 32,
        client_item_id="photo-0000000000",
        lane=Lane.BULK,
        url="https://photos.example.com/" + "x" * max(0, url_chars - 27),
    )
    return len(task.to_json())


def inference_task_bytes(hop: str, results_dir: Path) -> tuple[int, str]:
    """One inference hop frame: header plus payload, and where the payload size came from."""
    payload, source = RAW_CROP[0] * RAW_CROP[1] * RAW_CROP[2], "raw 224x224x3 crop"
    if hop != "raw":
        path = results_dir / "hop-encoding.json"
        data = json.loads(path.read_text())
        payload = int(data["encodings"][_HOP_LABELS[hop]]["bytes_median"])
        source = f"median of {path}"
    header = InferenceTask(
        item_id="0" * 32, job_id="0" * 32, lane=Lane.BULK, shape=RAW_CROP, source="x" * 120
    ).to_wire()
    return len(header) + payload, source


def stage_flows(
    rate: float,
    replicas: dict[Stage, int],
    msg_bytes: dict[Stage, int],
    stream_replicas: int,
    prefix: str = "tagpipe",
) -> list[StageFlow]:
    """Each stage's consumer limits at `replicas` and its stream at `rate` msgs/s."""
    slots = {Stage.DOWNLOAD: DOWNLOAD_SLOTS, Stage.INFER: INFERENCE_SLOTS}
    out = []
    for stage in Stage:
        load = StreamLoad(
            stage_names(stage, prefix).stream, rate, msg_bytes[stage], stream_replicas
        )
        limits = consumer_limits(replicas[stage], slots[stage])
        out.append(StageFlow(stage.value, replicas[stage], slots[stage], limits, load))
    return out


def render_flows(flows: list[StageFlow]) -> list[str]:
    lines = [
        f"{'stream':<16} {'msgs/s':>8} {'msg KB':>7} {'MB/s':>7} {'MB/s xR':>8}  "
        f"{'replicas x slots':>16} {'max_ack_pending':>15} {'max_waiting':>11} {'parts':>5}"
    ]
    for f in flows:
        ld, lim = f.load, f.limits
        lines.append(
            f"{ld.stream:<16} {ld.msgs_per_s:>8,.0f} {ld.msg_bytes / 1e3:>7.1f} "
            f"{ld.bytes_per_s / 1e6:>7.1f} {ld.replicated_bytes_per_s / 1e6:>8.1f}  "
            f"{f'{f.replicas} x {f.slots}':>16} {lim.max_ack_pending:>15,} "
            f"{lim.max_waiting:>11,} {lim.partitions:>5}"
        )
    return lines
