"""drivers.base.ContainerDriver on this host: the containers' files (podfsm.drivers.containerfs)
and their runtimes under conmon (podfsm.drivers.monitor), one facade for the controller."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import stat
from collections.abc import Mapping
from typing import Any

from podfsm.core.containerrecords import ContainerRecord, Exit
from podfsm.core.errors import PrerequisiteMissing
from podfsm.core.records import TaskInfo
from podfsm.core.secctx import ALL_CAPS
from podfsm.drivers import idmapmounts
from podfsm.drivers.containerfs import ContainerFiles
from podfsm.drivers.execstreams import attach
from podfsm.drivers.layers import LayerStore
from podfsm.drivers.monitor import CONMON, ContainerRuntime
from podfsm.drivers.procstreams import ProcessStreams


class LocalContainers:
    def __init__(self, root: str, run_dir: str, layer_dir: str, conmon: str = CONMON,
                 command_timeout: float = 60.0) -> None:
        self.files = ContainerFiles(root)
        self.run_dir = run_dir
        self._layer_dir = layer_dir
        self._layers: LayerStore | None = None
        self._conmon = conmon
        self._timeout = command_timeout
        self._runtimes: dict[str, ContainerRuntime] = {}

    def open(self, runtimes: Mapping[str, Any]) -> None:
        """Take the started pause runtime drivers (their binaries and the reaper)."""
        self.files.open()
        for name, rt in runtimes.items():
            binary = getattr(rt, "resolved_binary", None)
            reaper = getattr(rt, "reaper", None)
            if binary is None or reaper is None:
                continue
            crt = ContainerRuntime(name, self.run_dir, reaper, binary, self._conmon,
                                   self._timeout)
            crt.check()
            self._runtimes[name] = crt

    def _rt(self, name: str) -> ContainerRuntime:
        rt = self._runtimes.get(name)
        if rt is None:
            raise PrerequisiteMissing(f"runtime handler {name!r} cannot run containers here")
        return rt

    # records and files
    def load_all(self) -> tuple[list[ContainerRecord], list[str]]:
        return self.files.load_all()

    async def save(self, rec: ContainerRecord) -> None:
        await self.files.save(rec)

    def dir(self, container_id: str) -> str:
        return self.files.dir(container_id)

    def layer_path(self, chain_id: str) -> str:
        if self._layers is None:
            self._layers = LayerStore(self._layer_dir)
        return self._layers.path(chain_id)

    async def mount_rootfs(self, container_id: str, lowers: list[str],
                           userns_path: str | None = None) -> str:
        return await self.files.mount_rootfs(container_id, lowers, userns_path)

    async def mount_volume(self, container_id: str, index: int, src: str, userns_path: str,
                           readonly: bool) -> str:
        return await self.files.mount_volume(container_id, index, src, userns_path, readonly)

    def idmap_problem(self) -> str | None:
        return idmapmounts.support_problem()

    async def unmount_rootfs(self, container_id: str) -> None:
        await self.files.unmount_rootfs(container_id)

    async def remove_dir(self, container_id: str) -> None:
        await self.files.remove_dir(container_id)

    async def read_etc(self, rootfs: str, name: str) -> str:
        return await asyncio.to_thread(self.files.read_etc, rootfs, name)

    def host_device(self, path: str) -> tuple[str, int, int, int, int, int]:
        return self.files.host_device(path)

    def real_host_path(self, path: str) -> str:
        return self.files.real_host_path(path)

    def held_capabilities(self) -> list[str]:
        return held_capabilities()

    def host_devices(self) -> dict[str, tuple[str, int, int, int, int, int]]:
        return host_devices()

    def platform(self) -> tuple[str, tuple[int, int]]:
        m = re.match(r"(\d+)\.(\d+)", platform.release())
        return platform.machine(), (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    async def write_spec(self, container_id: str, spec: dict[str, Any]) -> None:
        await asyncio.to_thread(self.files.write_spec, container_id, spec)

    def remove_spec(self, container_id: str) -> None:
        self.files.remove_spec(container_id)

    def read_spec(self, container_id: str) -> dict[str, Any] | None:
        return self.files.read_spec(container_id)

    def usage(self, container_id: str) -> tuple[int, int]:
        return self.files.upper_usage(container_id)

    # runtime and monitor
    async def create(self, runtime: str, container_id: str, name: str, log_path: str, *,
                     tty: bool, stdin: bool, stdin_once: bool = False
                     ) -> tuple[TaskInfo, TaskInfo]:
        return await self._rt(runtime).create(container_id, name, self.dir(container_id),
                                              log_path, tty=tty, stdin=stdin,
                                              stdin_once=stdin_once)

    async def start(self, runtime: str, container_id: str) -> None:
        await self._rt(runtime).start(container_id)

    async def kill(self, runtime: str, container_id: str, sig: int) -> None:
        await self._rt(runtime).kill(container_id, sig)

    async def delete(self, runtime: str, container_id: str) -> None:
        await self._rt(runtime).delete(container_id)

    async def state(self, runtime: str, container_id: str) -> str | None:
        return await self._rt(runtime).state(container_id)

    def exists(self, runtime: str, container_id: str) -> bool:
        return self._rt(runtime).exists(container_id)

    def runtime_ids(self) -> dict[str, list[str]]:
        return {name: rt.list() for name, rt in self._runtimes.items()}

    def dir_ids(self) -> list[str]:
        try:
            return sorted(os.listdir(self.files.root))
        except FileNotFoundError:
            return []

    def exit_of(self, container_id: str) -> Exit | None:
        return ContainerRuntime.exit_of(self.dir(container_id), container_id)

    async def wait_exit(self, monitor: TaskInfo) -> None:
        await ContainerRuntime.wait_exit(monitor)

    def alive(self, task: TaskInfo) -> bool:
        return ContainerRuntime.alive(task)

    async def reopen_log(self, container_id: str, log_path: str) -> None:
        await ContainerRuntime.reopen_log(self.dir(container_id), log_path)

    async def exec_sync(self, runtime: str, container_id: str, process: dict[str, Any],
                        timeout: float) -> tuple[int, str, str]:
        return await self._rt(runtime).exec_sync(container_id, process,
                                                 self.dir(container_id), timeout)

    async def exec_stream(self, runtime: str, container_id: str, process: dict[str, Any], *,
                          tty: bool, stdin: bool) -> ProcessStreams:
        return await self._rt(runtime).exec_stream(container_id, process,
                                                   self.dir(container_id), tty=tty,
                                                   stdin=stdin)

    async def attach_stream(self, container_id: str) -> ProcessStreams:
        return await attach(self.dir(container_id))

    async def update(self, runtime: str, container_id: str, resources: dict[str, Any]
                     ) -> None:
        await self._rt(runtime).update(container_id, resources, self.dir(container_id))

    async def read_lines(self, path: str, offset: int) -> tuple[list[str], int]:
        return await asyncio.to_thread(_read_lines, path, offset)


def held_capabilities() -> list[str]:
    """The names of the capabilities in this process's bounding set (/proc/self/status)."""
    with open("/proc/self/status") as f:
        bnd = next((int(line.split()[1], 16) for line in f if line.startswith("CapBnd:")), 0)
    return [name for i, name in enumerate(ALL_CAPS) if bnd >> i & 1]


#: what containerd leaves out of a privileged container's devices (oci.HostDevices)
_SKIP_DEV = ("/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/.lxc", "/dev/.lxd-mounts",
             "/dev/.udev")


def host_devices(root: str = "/dev") -> dict[str, tuple[str, int, int, int, int, int]]:
    """Every character and block device node under `root` (symlinks not followed), by path."""
    out: dict[str, tuple[str, int, int, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in _SKIP_DEV]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if path == "/dev/console":  # the runtime makes the container's own
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out[path] = ("c" if stat.S_ISCHR(st.st_mode) else "b", os.major(st.st_rdev),
                             os.minor(st.st_rdev), st.st_mode, st.st_uid, st.st_gid)
    return out


def _read_lines(path: str, offset: int) -> tuple[list[str], int]:
    """The whole lines of `path` from byte `offset`, and the offset after the last one."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end
