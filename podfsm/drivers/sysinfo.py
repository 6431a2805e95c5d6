"""System reads for status, statistics and admission: a sandbox's cgroup counters, the usage
of the filesystems holding podfsm's directories, a bundle's runtime spec (each a few small
files under /proc, /sys or run_dir: microseconds, so inline); what the host's routing makes of
a host_ip (one netlink request); the sysctls a pod can set and whether the kernel takes a
pod's values (a child in new namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
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


#: the route types of `ip route get` (rtnetlink's RTN_*) that a host_ip can have, in words
_ROUTE_TYPES = {1: "not an address of this host", 2: "local", 3: "a broadcast address",
                5: "a multicast address"}


async def address_kind(address: str) -> str:
    """What the host's routing makes of packets to `address` (as portmap's `--dst-type LOCAL`
    does): "local" for an address of this host, else why not, in words."""
    from pyroute2 import AsyncIPRoute  # imported here: ~12 MB, and only host_ip checks need it
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        async with AsyncIPRoute() as ipr:
            kind = int((await ipr.route("get", dst=address))[0]["type"])
    except NetlinkError:
        return "not an address of this host (no route to it)"
    return _ROUTE_TYPES.get(kind, "not an address of this host")


def _bridge_indexes() -> set[int]:
    """The interface indexes of the host's bridges."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/class/net"):
            if os.path.isdir(f"/sys/class/net/{name}/bridge"):
                with contextlib.suppress(OSError, ValueError):
                    out.add(_read_int(f"/sys/class/net/{name}/ifindex"))
    return out


async def local_addresses() -> list[str]:
    """The addresses of this host's interfaces (its own network namespace's), IPv4 and IPv6,
    but those of its bridges (pod networks' gateways, which come and go with them) and IPv6
    link-local ones (one per veth, each only with a scope)."""
    from pyroute2 import AsyncIPRoute

    bridges = _bridge_indexes()
    out: list[str] = []
    async with AsyncIPRoute() as ipr:
        async for msg in await ipr.addr("dump"):
            address = msg.get("local") or msg.get("address")
            if isinstance(address, str) and address not in out \
                    and msg["index"] not in bridges \
                    and not address.lower().startswith("fe80:"):
                out.append(address)
    return out


# The namespaced sysctls a pod may set, listed in a new network and ipc namespace (owned by a
# new user namespace for a pod with its own): the kernel shows there only the ones such a
# namespace has (fewer net.core.* than the host's, none per host interface), and each as
# writable as the pod's runtime will find it. Run as a child: the daemon never unshares.
_LIST_SYSCTLS = r"""
import json, os, sys
out = {}
names = ["kernel/" + n for n in sys.argv[1].split(",")]
for top in ("net", "fs/mqueue"):
    for d, _, files in os.walk("/proc/sys/" + top):
        names += [os.path.join(d, f)[len("/proc/sys/"):] for f in files]
for name in names:
    path = "/proc/sys/" + name
    try:
        if not os.stat(path).st_mode & 0o222 or "." in name:
            continue
    except OSError:
        continue
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        value = None
    out[name.replace("/", ".")] = value
json.dump(out, sys.stdout)
"""

# A pod's sysctl values tried in new namespaces of the same kind: what the kernel refuses there
# it refuses in the pod, and is answered before anything is made. The child unshares itself
# (so it keeps its capabilities in a new user namespace), waits while the parent writes that
# namespace's id maps (as wide as the pod's: a value such as ping_group_range names ids), then
# becomes its root, as the runtime does before it writes the pod's sysctls.
_TRY_SYSCTLS = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
userns = sys.argv[1] == "userns"
if libc.unshare(0x40000000 | 0x08000000 | (0x10000000 if userns else 0)) != 0:
    sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
print("unshared", flush=True)
sys.stdin.readline()
if userns:
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
out = {}
for name, value in json.loads(sys.stdin.readline()).items():
    try:
        fd = os.open("/proc/sys/" + name.replace(".", "/"), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        out[name] = os.strerror(exc.errno or 0)
json.dump(out, sys.stdout)
"""


def _unshare(own_userns: bool) -> list[str]:
    user = ["--user", "--map-root-user"] if own_userns else []
    return ["unshare", "--net", "--ipc", *user, "--", sys.executable, "-I", "-S", "-c"]


_listed: dict[bool, dict[str, str | None] | None] = {}


def pod_sysctls(own_userns: bool, ipc_names: Iterable[str]) -> dict[str, str | None] | None:
    """The sysctls of net.*, fs.mqueue.* and `ipc_names` (kernel.*) that a pod (with its own
    user namespace or not) can write, each with the value it starts with (None if unreadable);
    None when they cannot be listed (no unshare here). Listed once per process (~30 ms)."""
    if own_userns not in _listed:
        names = ",".join(n.removeprefix("kernel.") for n in ipc_names)
        try:
            run = subprocess.run([*_unshare(own_userns), _LIST_SYSCTLS, names],
                                 capture_output=True, timeout=30, check=True,
                                 stdin=subprocess.DEVNULL)
            listed: dict[str, str | None] | None = json.loads(run.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            listed = None
        _listed[own_userns] = listed
    return _listed[own_userns]


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


async def try_sysctls(values: Mapping[str, str],
                      id_maps: tuple[str, str] | None) -> dict[str, str]:
    """Write `values` in new namespaces of the pod's kind: a new user namespace with these
    uid_map and gid_map lines (the pod's, or as wide), or None for the host's. Each sysctl the
    kernel refused, with the kernel's reason."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", _TRY_SYSCTLS, "userns" if id_maps else "host",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        if await proc.stdout.readline() == b"unshared\n" and id_maps is not None:
            for name, line in zip(("uid_map", "gid_map"), id_maps, strict=True):
                _write_proc(f"/proc/{proc.pid}/{name}", line)  # one write to /proc, inline
        proc.stdin.write(b"go\n" + json.dumps(dict(values)).encode() + b"\n")
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        raise OSError(f"cannot try the sysctls: {err.decode(errors='replace').strip()}")
    refused: dict[str, str] = json.loads(out)
    return refused
