"""Downloader defaults derived from the cores the process may really use, and the item deadline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from tagpipe_downloader.settings import INFLIGHT_PER_CPU, DownloaderSettings, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("50000 100000\n")  # half a core: still one decode thread
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 cores round up
    assert usable_cpus(cpu_max) == min(AFFINITY, 2)


def test_no_quota_means_the_affinity(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == AFFINITY
    assert usable_cpus(tmp_path / "missing") == AFFINITY
    cpu_max.write_text("garbage\n")
    assert usable_cpus(cpu_max) == AFFINITY


def test_defaults_follow_the_cores() -> None:
    cpus = usable_cpus()
    fields = DownloaderSettings.model_fields
    assert fields["decode_workers"].default == cpus
    assert fields["max_inflight"].default == min(256, INFLIGHT_PER_CPU * cpus)


def test_the_item_deadline_defaults_to_two_minutes_and_reaches_the_fetcher() -> None:
    assert DownloaderSettings().fetch_config().item_deadline_s == 120.0
    assert DownloaderSettings(item_deadline_s=5).fetch_config().item_deadline_s == 5.0
    with pytest.raises(ValidationError):
        DownloaderSettings(item_deadline_s=0)
