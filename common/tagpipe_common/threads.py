"""Worker threads at a lower OS priority, for bulk work beside latency-bound work.

Both tiers decode bulk images on threads that share the node's cores with a
real-time item's path (its decode, the event loops, the model). Such threads
run at a higher nice value: the kernel then gives the real-time work the cores
first and the bulk work everything left over, which under bulk load is nearly
all of it. Nice values compare across the node's processes only within one
scheduling group (one session under Linux's autogroup, one pod's cgroup).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


def _lower_this_thread(nice: int) -> None:
    """Thread initializer: raise this thread's nice value by `nice` (Linux sets it per
    thread; raising needs no privilege, so this works in a non-root pod). Relative:
    a process started under `nice` keeps its bulk threads below its other threads."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except OSError as exc:
        log.warning("bulk thread keeps its priority: %s", exc)


def niced_pool(threads: int, nice: int, name: str = "decode") -> ThreadPoolExecutor:
    """`threads` threads at nice `nice` (0, or not Linux: normal priority)."""
    if nice <= 0 or sys.platform != "linux":
        return ThreadPoolExecutor(threads, thread_name_prefix=name)
    return ThreadPoolExecutor(
        threads,
        thread_name_prefix=f"{name}-bulk",
        initializer=_lower_this_thread,
        initargs=(nice,),
    )
