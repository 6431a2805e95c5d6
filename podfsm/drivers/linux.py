"""The Linux calls the drivers share: ctypes wrappers over those Python 3.11 lacks (unshare,
setns, mount, umount2, the namespace ioctls), /proc reads (a process's start time and parent),
pins, directories and their locks. Errors are OSError with errno and the path, like os.* raises.

unshare(CLONE_NEWUSER) and setns into a user namespace fail with EINVAL in a process with more
than one thread: call those only in a single-threaded child (see nsworker).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat

from podfsm.core.errors import ControllerLocked, UnsafeDirectory

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2
#: umount2: do not dereference the target if it is a symlink (a pin is never one)
UMOUNT_NOFOLLOW = 0x8

NS_GET_USERNS = 0xB701
NS_GET_PARENT = 0xB702
NS_GET_NSTYPE = 0xB703
NS_GET_OWNER_UID = 0xB704

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(rc: int, what: str, path: str | None = None) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        if path is None:
            raise OSError(e, f"{what}: {os.strerror(e)}")
        raise OSError(e, f"{what}: {os.strerror(e)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        "mount", target,
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def syncfs(fd: int) -> None:
    """Flush the file system that holds `fd` to stable storage (one call for a whole tree of
    new files, where an fsync of each would cost a disk flush per file)."""
    _check(_libc.syncfs(fd), "syncfs")


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def ns_inode(path: str) -> int:
    """The inode of the namespace at `path` (a pin file or /proc/<pid>/ns/<type>)."""
    return os.stat(path).st_ino


def netns_owner_inode(netns_path: str) -> int:
    """ioctl(NS_GET_USERNS): the inode of the user namespace that owns the netns at the path."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return os.fstat(owner).st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)


def netns_owner_problem(netns_path: str, userns_path: str,
                        want_userns_inode: int | None = None) -> str | None:
    """None when the user namespace pinned at `userns_path` (of inode `want_userns_inode`, when
    given) owns the netns at `netns_path`; else what is wrong, in words. The one check of a
    netns's owner for the namespace and runtime drivers."""
    try:
        owner = netns_owner_inode(netns_path)
        userns = ns_inode(userns_path)
    except OSError as exc:
        return f"cannot inspect the pod's namespaces: {exc}"
    if owner != userns:
        return (f"the netns {netns_path} is not owned by the pod's user namespace {userns_path} "
                f"(owner inode {owner}, user namespace inode {userns})")
    if want_userns_inode is not None and userns != want_userns_inode:
        return (f"the user namespace pinned at {userns_path} (inode {userns}) is not the pod's "
                f"(inode {want_userns_inode})")
    return None


def is_mountpoint_pin(path: str) -> bool:
    """True when `path` is a live namespace pin (a bind mount of an nsfs inode)."""
    try:
        st = os.stat(path)
        parent = os.stat(os.path.dirname(path) or ".")
    except FileNotFoundError:
        return False
    # nsfs inodes live on their own device; an unmounted pin file is on the parent's device.
    return st.st_dev != parent.st_dev


def unpin(path: str) -> None:
    """Detach a pin (if mounted) and unlink its file. Idempotent. A symlink in its place is
    only unlinked: neither the umount nor the unlink follows it."""
    try:
        umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(path)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, from field 3 (state, ppid, ...):
    `proc_stat(pid)[n - 3]` is field n. None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2:].decode("ascii", "replace").split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if no such process."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


def parent_pid(pid: int) -> int | None:
    """Field 4 of /proc/<pid>/stat, or None if no such process."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[1])


def remove_flat_dir(path: str) -> None:
    """Remove a directory that holds only files (a bundle, a sandbox's run directory): a
    listdir, an unlink per file and an rmdir, against shutil.rmtree's fd-safe walk that costs
    several times the system calls. Missing is fine; anything unexpected falls back to rmtree.
    Never follows a symlink: one at `path` is refused (OSError ELOOP / ENOTDIR), one inside is
    removed as a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(fd):
            os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError:
        os.close(fd)
        shutil.rmtree(path)  # fd-based: refuses a symlink at `path`, never follows one inside
        return
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def secure_dir(path: str, mode: int, what: str) -> None:
    """Make `path` a directory for root's state: created with `mode` when missing (parents
    0755), else it must be a directory owned by this process's user and not writable by group
    or others (whoever could write there could plant symlinks, pins or records that root then
    acts on). UnsafeDirectory names the problem otherwise."""
    try:
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # mkdir's mode went through the umask
        except FileExistsError:
            pass
        st = os.stat(path)
    except OSError as exc:
        raise UnsafeDirectory(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(
            f"{what} {path} is owned by uid {st.st_uid}, not by this process's uid "
            f"{os.geteuid()}: podfsm refuses to keep its state where another user can change it")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): podfsm refuses to use it; chmod go-w {path}")


def lock_dir(path: str, name: str, what: str) -> int:
    """Take the controller lock of directory `path`: flock(LOCK_EX | LOCK_NB) on its file
    `name`, created 0600 (never through a symlink). The returned fd holds the lock; closing it
    releases it, as does the end of the process. ControllerLocked when another controller holds
    it; OSError when the file cannot be opened."""
    fd = os.open(os.path.join(path, name),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControllerLocked(f"another podfsm controller is using {what} {path} "
                               f"(it holds the lock on its {name!r} file)") from None
    return fd
