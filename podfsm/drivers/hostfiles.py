"""The sandbox's files on the host: its run directory, hostname, hosts and resolv.conf, the
per-pod /dev/shm tmpfs, the log directory, and the cgroup parent directories the runtime leaves
behind.

containerd writes the same files under the sandbox's root directory and mounts the shm tmpfs
there (internal/cri/server/podsandbox/sandbox_run_linux.go, setupSandboxFiles); the pause
container binds them read-only (core.ocispec.sandbox_file_mounts). Each step here has its
undo: release_shm at stop, remove_files at remove, both at an unwinding and at orphan
collection.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import socket
import stat
from collections.abc import Mapping
from typing import Any

from podfsm.core.ocispec import LOCALHOST_HOSTS, SHM_OPTIONS, resolv_conf
from podfsm.core.records import CgroupStats, FilesystemUsage, SandboxFiles
from podfsm.core.spec import IPC_SYSCTLS, IDMapping, PodSandboxConfig
from podfsm.drivers import linux, sysinfo

HOST_RESOLV_CONF = "/etc/resolv.conf"
HOST_HOSTS = "/etc/hosts"
HOST_SHM = "/dev/shm"
CGROUP_FS = "/sys/fs/cgroup"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o644)  # whatever the umask: the pod's mapped root reads it


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _make_dirs(path: str) -> str:
    """os.makedirs(path, 0o755); the topmost directory it created, "" if none."""
    missing = []
    p = path.rstrip("/")
    while p and not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, mode=0o755, exist_ok=True)
    return missing[-1] if missing else ""


def _remove_empty_dirs(leaf: str, top: str) -> None:
    """rmdir from `leaf` up to and including `top`, stopping at the first that is not empty."""
    if not top:
        return
    p = leaf.rstrip("/")
    while True:
        try:
            os.rmdir(p)
        except FileNotFoundError:
            pass
        except OSError:
            return
        if p == top or len(p) <= len(top):
            return
        p = os.path.dirname(p)


class HostFiles:
    """The real HostDriver. `mount_shm` False (controllers on fake drivers, whose pause never
    runs) writes the files but mounts nothing."""

    def __init__(self, *, mount_shm: bool = True, resolv_conf_path: str = HOST_RESOLV_CONF,
                 hosts_path: str = HOST_HOSTS) -> None:
        self._mount_shm = mount_shm
        self._resolv = resolv_conf_path
        self._hosts = hosts_path

    def create_sandbox_dir(self, path: str) -> None:
        os.makedirs(path, mode=0o711, exist_ok=True)
        os.chmod(path, 0o711)  # makedirs' mode went through the umask

    def remove_sandbox_dir(self, path: str) -> None:
        linux.remove_flat_dir(path)

    def sandbox_dirs(self, parent: str) -> list[str]:
        try:
            return os.listdir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return []

    # The calls below run on the event loop, not in a worker thread: each is a few small file
    # writes or unlinks and a tmpfs mount or unmount (tens of microseconds each), less than
    # the wake-ups of a trip to a thread and back cost (0.1-0.3 ms of CPU on a 2-core VM).

    async def setup_files(self, sandbox_dir: str, pod: PodSandboxConfig) -> SandboxFiles:
        return self._setup(sandbox_dir, pod)

    def _setup(self, sandbox_dir: str, pod: PodSandboxConfig) -> SandboxFiles:
        # network NODE: the host's UTS name and its /etc/hosts, as the pod shares its network
        hostname = pod.hostname or (pod.effective_hostname if pod.pod_netns
                                    else socket.gethostname())
        files = SandboxFiles(
            hostname_path=os.path.join(sandbox_dir, "hostname"),
            hosts_path=os.path.join(sandbox_dir, "hosts"),
            resolv_conf_path=os.path.join(sandbox_dir, "resolv.conf"),
            shm_path=HOST_SHM if pod.host_ipc else os.path.join(sandbox_dir, "shm"),
            log_directory=pod.log_directory,
        )
        try:
            _write(files.hostname_path, hostname + "\n")
            _write(files.hosts_path, LOCALHOST_HOSTS if pod.pod_netns else _read(self._hosts))
            _write(files.resolv_conf_path, resolv_conf(pod.dns_config)
                   if pod.dns_config is not None else _read(self._resolv))
            if not pod.host_ipc:
                os.mkdir(files.shm_path, 0o700)
                if self._mount_shm:
                    linux.mount("shm", files.shm_path, "tmpfs",
                                 linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
                                 SHM_OPTIONS)
                    files = files.model_copy(update={"shm_mounted": True})
            elif not os.path.isdir(HOST_SHM):
                raise OSError(errno.ENOENT, "the host has no /dev/shm for ipc NODE", HOST_SHM)
            if pod.log_directory:
                created = _make_dirs(pod.log_directory)
                files = files.model_copy(update={"log_directory_created": created})
        except BaseException:
            self._remove(files)
            raise
        return files

    async def release_shm(self, shm_path: str) -> None:
        _release_shm(shm_path)

    async def remove_files(self, files: SandboxFiles) -> None:
        self._remove(files)

    def _remove(self, files: SandboxFiles) -> None:
        if files.shm_path != HOST_SHM:
            _release_shm(files.shm_path)
        for path in (files.hostname_path, files.hosts_path, files.resolv_conf_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if files.log_directory:
            _remove_empty_dirs(files.log_directory, files.log_directory_created)

    async def remove_cgroup_parent(self, cgroup_parent: str, cgroup_root: str) -> None:
        remove_cgroup_parent(cgroup_parent, cgroup_root)

    def read_seccomp_profile(self, path: str, limit: int) -> bytes:
        # O_NONBLOCK and a regular file only: a FIFO or a device named by the pod must not
        # block admission or feed it without end.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{path} is not a regular file")
            text = f.read(limit + 1)
        if len(text) > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        return text

    def sysctl_exists(self, name: str) -> bool:
        return os.path.exists("/proc/sys/" + name.replace(".", "/"))

    def pod_sysctls(self, own_userns: bool) -> Mapping[str, str | None] | None:
        return sysinfo.pod_sysctls(own_userns, IPC_SYSCTLS)

    async def try_sysctls(self, values: Mapping[str, str],
                          id_maps: tuple[IDMapping, IDMapping] | None) -> dict[str, str]:
        lines = (id_maps[0].line(), id_maps[1].line()) if id_maps is not None else None
        return await sysinfo.try_sysctls(values, lines)

    async def local_addresses(self) -> list[str]:
        return await sysinfo.local_addresses()

    async def address_kind(self, address: str) -> str:
        return await sysinfo.address_kind(address)

    def security_modules(self) -> frozenset[str]:
        return frozenset(name for name, on in (("selinux", selinux_enabled()),
                                               ("apparmor", apparmor_enabled())) if on)

    def cgroup_stats(self, pid: int) -> CgroupStats | None:
        return sysinfo.cgroup_stats(pid)

    def filesystem_usage(self, paths: list[str]) -> list[FilesystemUsage]:
        return sysinfo.filesystem_usage(paths)

    def runtime_spec(self, bundle_path: str | None) -> dict[str, Any] | None:
        return sysinfo.read_runtime_spec(bundle_path)


def _release_shm(shm_path: str) -> None:
    """Unmount the pod's shm tmpfs (if mounted) and remove its mount point. Idempotent."""
    if shm_path == HOST_SHM:
        return
    try:
        linux.umount2(shm_path, linux.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.EBUSY:  # a process has a file open there: let it go lazily
            linux.umount2(shm_path, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
        elif exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.rmdir(shm_path)
    except FileNotFoundError:
        pass
    except OSError:
        # Still a mount point (mounted twice?) or not empty: never remove through a mount.
        if os.path.ismount(shm_path):
            raise
        shutil.rmtree(shm_path)


def remove_cgroup_parent(cgroup_parent: str, cgroup_root: str) -> None:
    """rmdir the empty directories from `cgroup_parent` up to (not including) `cgroup_root`
    in every cgroup hierarchy. Only what lies strictly under the root is touched."""
    root = "/" + cgroup_root.strip("/")
    parent = "/" + cgroup_parent.strip("/")
    if not parent.startswith(root + "/"):
        return
    hierarchies = [CGROUP_FS, *glob.glob(os.path.join(CGROUP_FS, "*"))]
    for h in hierarchies:
        if not os.path.isdir(h):
            continue
        p = parent
        while p != root and p.startswith(root + "/"):
            try:
                os.rmdir(h + p)
            except FileNotFoundError:
                pass
            except OSError:
                break  # in use (another pod's cgroup below) or not a cgroup directory
            p = os.path.dirname(p)


def selinux_enabled() -> bool:
    """True when SELinux is enabled on this host (selinuxfs mounted), as go-selinux decides."""
    return os.path.exists("/sys/fs/selinux/enforce")


def apparmor_enabled() -> bool:
    """True when AppArmor is enabled on this host, as containerd's apparmor.HostSupports."""
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False
