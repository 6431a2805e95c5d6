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
import logging
import os
import shutil
import socket
import stat
from collections.abc import Collection
from typing import Any

from podfsm.core import paths
from podfsm.core.ocispec import LOCALHOST_HOSTS, SHM_OPTIONS, resolv_conf
from podfsm.core.records import CgroupStats, FilesystemUsage, SandboxFiles
from podfsm.core.spec import PodSandboxConfig
from podfsm.drivers import linux, sysinfo

log = logging.getLogger(__name__)

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


#: a directory reached without following a symlink: O_PATH needs no permission on it and
#: serves as the dir_fd of mkdirat, openat and unlinkat
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(fd: int, names: list[str]) -> int:
    """A descriptor of the directory `names` below the one `fd` holds, reached one name at a
    time without following a symlink (OSError ELOOP or ENOTDIR where one is met). `fd` is
    closed either way."""
    try:
        for name in names:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir_nofollow(path: str) -> int:
    """A descriptor of directory `path` (absolute, normalised), reached from / without
    following any symlink on the way."""
    return _walk(os.open("/", _DIR_FLAGS), [n for n in path.split("/") if n])


def make_log_dirs(path: str) -> tuple[str, list[str]]:
    """Create the log directory `path` (absolute, normalised; 0755 through the umask, as
    os.makedirs) and the missing directories above it; (the directory with symlinks resolved,
    the directories made, top first). The part of `path` that exists is followed as the host
    lays it out (/var/run is a symlink); what is made is made through directory descriptors,
    each opened with O_NOFOLLOW, so a symlink planted meanwhile is refused rather than
    followed. On failure what was made is removed."""
    names = [n for n in path.split("/") if n]
    have = len(names)
    while have and not os.path.isdir("/" + "/".join(names[:have])):
        have -= 1
    fd = os.open("/" + "/".join(names[:have]), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    made: list[str] = []
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        for name in names[have:]:
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
                fresh = True
            except FileExistsError:  # made meanwhile by someone else: used, not ours
                fresh = False
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
            real = os.path.join(real, name)
            if fresh:
                made.append(real)
    except BaseException:
        remove_dirs(made, set())
        raise
    finally:
        os.close(fd)
    return real, made


def remove_dirs(made: list[str], busy: set[str]) -> list[str]:
    """rmdir the directories `made` (absolute, top first) deepest first, each through a
    descriptor of its parent reached from / without following a symlink, skipping those in
    `busy` (another sandbox uses them) and those not empty; what could not be reached (a
    parent replaced by a symlink, say) is left. The directories left, and why."""
    left = []
    for path in reversed(made):
        if path in busy:
            continue
        parent, name = path.rsplit("/", 1)
        try:
            fd = _open_dir_nofollow(parent)
        except FileNotFoundError:
            continue
        except OSError as exc:
            left.append(f"{path}: {parent} not reached without a symlink ({exc.strerror})")
            continue
        try:
            os.rmdir(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                left.append(f"{path}: {exc.strerror}")
        finally:
            os.close(fd)
    return left


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

    async def setup_files(self, sandbox_dir: str, pod: PodSandboxConfig,
                          made_by_others: Collection[str] = ()) -> SandboxFiles:
        return self._setup(sandbox_dir, pod, made_by_others)

    def _setup(self, sandbox_dir: str, pod: PodSandboxConfig,
               made_by_others: Collection[str]) -> SandboxFiles:
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
                real, made = make_log_dirs(pod.log_directory)
                # what another sandbox made and this one uses is this one's to remove too,
                # should it be the last to use it
                shared = [d for d in dict.fromkeys(made_by_others)
                          if paths.within(real, d) and d not in made]
                files = files.model_copy(update={
                    "log_directory_real": real,
                    "log_directory_created": made[0] if made else "",
                    "log_directories_made": sorted(shared + made, key=len)})
        except BaseException:
            self._remove(files, ())
            raise
        return files

    async def release_shm(self, shm_path: str) -> None:
        _release_shm(shm_path)

    async def remove_files(self, files: SandboxFiles, in_use: Collection[str] = (),
                           named: Collection[str] = ()) -> None:
        self._remove(files, in_use, named)

    def _remove(self, files: SandboxFiles, in_use: Collection[str],
                named: Collection[str] = ()) -> None:
        if files.shm_path != HOST_SHM:
            _release_shm(files.shm_path)
        for path in (files.hostname_path, files.hosts_path, files.resolv_conf_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        made = files.log_directories_made or paths.legacy_chain(files.log_directory,
                                                                 files.log_directory_created)
        if made:
            # what other sandboxes use, resolved; those named only, as named and resolved now
            busy = paths.in_use(made, [*in_use, *named, *(
                os.path.realpath(p) for p in named if p.startswith("/"))])
            for problem in remove_dirs(made, busy):
                log.warning("log directory left: %s", problem)

    async def remove_cgroup_parent(self, cgroup_parent: str, cgroup_root: str,
                                   in_use: Collection[str] = ()) -> None:
        remove_cgroup_parent(cgroup_parent, cgroup_root, in_use)

    def real_path(self, path: str) -> str:
        return os.path.realpath(path)

    def read_seccomp_profile(self, path: str, limit: int) -> bytes:
        return read_regular_file(path, limit)

    def sysctl_exists(self, name: str) -> bool:
        return os.path.exists("/proc/sys/" + name.replace(".", "/"))

    def security_modules(self) -> frozenset[str]:
        return frozenset(name for name, on in (("selinux", selinux_enabled()),
                                               ("apparmor", apparmor_enabled())) if on)

    def cgroup_stats(self, pid: int) -> CgroupStats | None:
        return sysinfo.cgroup_stats(pid)

    def filesystem_usage(self, paths: list[str]) -> list[FilesystemUsage]:
        return sysinfo.filesystem_usage(paths)

    def runtime_spec(self, bundle_path: str | None) -> dict[str, Any] | None:
        return sysinfo.read_runtime_spec(bundle_path)


class NotARegularFile(ValueError):
    """A path a pod config names is not a regular file podfsm can read. One error whatever
    the reason (missing, a directory, a device, a FIFO, a socket, no permission), so that an
    answer does not tell a client what lies at a path of the daemon's host."""


def read_regular_file(path: str, limit: int) -> bytes:
    """The content of `path`, a regular file of at most `limit` bytes, for a path that a pod
    config names (a seccomp profile). The path is first opened with O_PATH, which opens
    nothing for I/O: a terminal (/dev/pts/N, /dev/tty*) is not acquired as the daemon's
    controlling terminal, a FIFO's writer waiting in open(2) is not released, a device's
    open routine is not run. Only a regular file is then opened for reading, through
    /proc/self/fd (the same inode, however the path changes meanwhile), with O_NOCTTY and
    O_NONBLOCK all the same. Raises NotARegularFile (a ValueError) or, for a regular file
    that is too large, ValueError saying so."""
    try:
        ref = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        raise NotARegularFile("it is not a readable regular file") from None
    try:
        if not stat.S_ISREG(os.fstat(ref).st_mode):
            raise NotARegularFile("it is not a readable regular file")
        try:
            fd = os.open(f"/proc/self/fd/{ref}",
                         os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise NotARegularFile("it is not a readable regular file") from None
    finally:
        os.close(ref)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # never otherwise: the same inode
            raise NotARegularFile("it is not a readable regular file")
        text = f.read(limit + 1)
    if len(text) > limit:
        raise ValueError(f"it is larger than {limit} bytes")
    return text


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


def remove_cgroup_parent(cgroup_parent: str, cgroup_root: str,
                         in_use: Collection[str] = ()) -> None:
    """rmdir the empty directories from `cgroup_parent` up to (not including) `cgroup_root`
    in every cgroup hierarchy, stopping at one that is `in_use` or above one that is (another
    sandbox's parent, which its runtime may be about to fill). Only what lies strictly under
    the root is touched."""
    root = "/" + cgroup_root.strip("/")
    parent = "/" + cgroup_parent.strip("/")
    if not parent.startswith(root + "/"):
        return
    busy = paths.in_use(list(paths.ancestors(parent)), in_use)
    hierarchies = [CGROUP_FS, *glob.glob(os.path.join(CGROUP_FS, "*"))]
    for h in hierarchies:
        if not os.path.isdir(h):
            continue
        p = parent
        while p != root and p.startswith(root + "/") and p not in busy:
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
