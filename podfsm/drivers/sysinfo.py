"""System reads for status and statistics: a sandbox's cgroup counters, the usage of the
filesystems holding podfsm's directories, a bundle's runtime spec. Read-only, and each read is
a few small files under /proc, /sys or run_dir (microseconds), so they run inline.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from podfsm.core.records import CgroupStats, FilesystemUsage

_CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_stats(pid: int) -> CgroupStats | None:
    """CPU and memory of the cgroup that process `pid` is in (cgroup v2, or v1's cpuacct and
    memory hierarchies); None when the process is gone or its cgroup cannot be read."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    paths: dict[str, str] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    try:
        if "memory" in paths and "cpuacct" in paths:
            return _v1(paths["cpuacct"], paths["memory"])
        if "" in paths:
            return _v2(paths[""])
    except (OSError, ValueError):
        return None
    return None


def _stat_file(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _v2(path: str) -> CgroupStats:
    base = _CGROUP_ROOT if os.path.exists(os.path.join(_CGROUP_ROOT, "cgroup.controllers")) \
        else os.path.join(_CGROUP_ROOT, "unified")
    d = os.path.join(base, path.lstrip("/"))
    now = time.time_ns()
    cpu = _stat_file(os.path.join(d, "cpu.stat"))
    usage = mem_stat = None
    with contextlib.suppress(FileNotFoundError):  # no memory controller delegated there
        usage = _read_int(os.path.join(d, "memory.current"))
        mem_stat = _stat_file(os.path.join(d, "memory.stat"))
    ms = mem_stat or {}
    return CgroupStats(
        cgroup=d, timestamp_ns=now, cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage or 0,
        memory_working_set_bytes=max(0, (usage or 0) - ms.get("inactive_file", 0)),
        memory_rss_bytes=ms.get("anon", 0), page_faults=ms.get("pgfault", 0),
        major_page_faults=ms.get("pgmajfault", 0),
    )


def _v1(cpuacct: str, memory: str) -> CgroupStats:
    cpu_dir = os.path.join(_CGROUP_ROOT, "cpuacct", cpuacct.lstrip("/"))
    mem_dir = os.path.join(_CGROUP_ROOT, "memory", memory.lstrip("/"))
    now = time.time_ns()
    usage = _read_int(os.path.join(mem_dir, "memory.usage_in_bytes"))
    ms = _stat_file(os.path.join(mem_dir, "memory.stat"))
    return CgroupStats(
        cgroup=mem_dir, timestamp_ns=now,
        cpu_usage_ns=_read_int(os.path.join(cpu_dir, "cpuacct.usage")),
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - ms.get("total_inactive_file", 0)),
        memory_rss_bytes=ms.get("total_rss", 0), page_faults=ms.get("total_pgfault", 0),
        major_page_faults=ms.get("total_pgmajfault", 0),
    )


def filesystem_usage(paths: list[str]) -> list[FilesystemUsage]:
    """One entry per filesystem holding any of `paths` (used bytes and inodes of the whole
    filesystem, with its mount point), in the order first met."""
    seen: set[int] = set()
    out: list[FilesystemUsage] = []
    for path in paths:
        try:
            dev = os.stat(path).st_dev
            st = os.statvfs(path)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        out.append(FilesystemUsage(
            mountpoint=_mountpoint(path), timestamp_ns=time.time_ns(),
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            inodes_used=max(0, st.f_files - st.f_ffree),
        ))
    return out


def _mountpoint(path: str) -> str:
    path = os.path.realpath(path)
    dev = os.stat(path).st_dev
    while path != "/":
        parent = os.path.dirname(path)
        if os.stat(parent).st_dev != dev:
            return path
        path = parent
    return "/"


def read_runtime_spec(bundle_path: str | None) -> dict[str, Any] | None:
    """The OCI runtime spec (config.json) of a bundle, or None when there is none."""
    if not bundle_path:
        return None
    try:
        with open(os.path.join(bundle_path, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None
