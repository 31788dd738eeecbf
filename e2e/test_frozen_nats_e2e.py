"""The operator's scaling tick against a NATS that hangs without a TCP reset (issue 28).

A stopped server (`tagpipe up` killed, a deleted pod) refuses connections, which
every client notices at once. A frozen one (a VM paused, a partition, here SIGSTOP)
accepts bytes into its kernel buffers and answers nothing: a read without a bound
would wait for it for minutes. The operator's tick must keep its pace: each tick
gives up on the backlog read within its bound, reports the metrics stale, holds
the replicas, and ticks again; after SIGCONT the metrics are fresh again.

The test does not assert how long a tick takes (the machine may be busy): it
asserts that ticks keep coming while NATS is frozen (a hung tick would log no
more), and it reports the gaps between them.
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
from functools import partial
from typing import Any

from e2e_helpers import OperatorProcess, eventually
from tagpipe_cli.servers import ServerProcess
from tagpipe_common.nats_io import connect_nats
from tagpipe_common.subjects import Stage, stage_names
from tagpipe_operator.kube import KubeClient
from test_operator_e2e import condition, create, equals, pipeline, publish, replicas, stream_exists

# Ticks the operator must log while NATS stays frozen: at 1 s a tick and a bound of
# 2 x TAGPIPE_NATS_TIMEOUT_S (1 s in e2e) per read, a hung tick stops them at once.
TICKS_WHILE_FROZEN = 5


def _holding(operator: OperatorProcess, name: str) -> list[dict[str, Any]]:
    """The operator's one WARNING per tick that could not read the backlog."""
    return [
        r
        for r in operator.records()
        if r.get("level") == "WARNING"
        and f"/{name}:" in str(r.get("msg"))
        and "holding replicas" in str(r.get("msg"))
    ]


async def _stale(kube: KubeClient, ns: str, name: str, status: str) -> dict[str, Any] | None:
    cond = await condition(kube, ns, name, "MetricsStale")
    return cond if cond.get("status") == status else None


def _gaps_s(records: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive log records (their own timestamps), when they have them."""
    stamps = []
    for r in records:
        ts = r.get("ts") or r.get("time") or r.get("timestamp")
        if isinstance(ts, str):
            stamps.append(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
        elif isinstance(ts, int | float):
            stamps.append(float(ts))
    return [round(b - a, 2) for a, b in itertools.pairwise(stamps)]


async def test_a_frozen_nats_makes_ticks_stale_never_hung(
    kube: KubeClient, namespace: str, operator: OperatorProcess, own_nats: ServerProcess
) -> None:
    name, prefix = "frozen", "frozen"
    await create(kube, namespace, pipeline(name, own_nats.url, prefix, policy="Retain"))
    nc = await connect_nats([own_nats.url], "tagpipe-e2e-frozen")
    try:
        await eventually(partial(stream_exists, nc, stage_names(Stage.DOWNLOAD, prefix).stream))
        await publish(nc, prefix, 200, "frozen")
    finally:
        await nc.close()
    down = f"{name}-downloader"
    await eventually(equals(partial(replicas, kube, namespace, down), 4))
    await eventually(partial(_stale, kube, namespace, name, "False"))

    assert own_nats.proc is not None
    pid = own_nats.proc.pid
    os.kill(pid, signal.SIGSTOP)  # frozen: the socket stays open, nothing answers
    try:
        cond = await eventually(partial(_stale, kube, namespace, name, "True"), within=60)
        assert cond["reason"] == "NatsUnavailable", cond
        seen = len(_holding(operator, name))
        # Ticks keep coming while it stays frozen: one that hung would log no more.
        await eventually(lambda: len(_holding(operator, name)) >= seen + TICKS_WHILE_FROZEN, 90)
        assert await replicas(kube, namespace, down) == 4  # held, not guessed
    finally:
        os.kill(pid, signal.SIGCONT)
    await eventually(partial(_stale, kube, namespace, name, "False"), within=90)
    assert await replicas(kube, namespace, down) == 4
    frozen_ticks = _holding(operator, name)
    gaps = _gaps_s(frozen_ticks)
    print(f"ticks while frozen: {len(frozen_ticks)}; gaps between them (s): {gaps}")
    bad = [r for r in operator.records() if r.get("level") in ("ERROR", "CRITICAL", "RAW")]
    assert not bad, operator.tail()
