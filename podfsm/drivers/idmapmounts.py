"""Idmapped mounts: a container's view of host files through its pod's user namespace.

A pod with its own user namespace (uid 0 inside = say 100000 outside) would see an image's
files, owned by 0 on disk, as 65534. Chowning a copy of the image per pod costs time and disk;
an idmapped mount (Linux 5.12) shows the same files shifted instead: through it, on-disk uid 0
is host uid 100000, so the container's root owns its image. The recipe is the new mount API:

  open_tree(src, OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC|AT_RECURSIVE)  a detached copy of the tree
  mount_setattr(fd, MOUNT_ATTR_IDMAP, userns_fd)                    shift it by the pod's maps
  move_mount(fd, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH)        attach it at dst

A rootfs is an overlay, which cannot itself be idmapped (mount_setattr says EINVAL); since
Linux 5.19 its LOWER layers may be idmapped mounts. containerd 2.x (core/mount/mount_linux.go,
doPrepareIDMappedOverlay) attaches idmapped clones of the lowers under a temporary directory,
mounts the overlay over them and then detaches them. podfsm skips the attaching: the layers'
common parent is cloned detached and idmapped read-only, and overlayfs is given the lowers as
`/proc/self/fd/<n>/<layer>`, a path into that clone; once the overlay holds its lowers the fd
is closed. No temporary mount point ever exists, so none can be left behind. The upper and
work directories belong to the pod's mapped root, so what the container writes lands as that
uid; both are plain directories.

Threads: none of these calls needs a single-threaded process (no setns, no unshare); they act
on the mount namespace every thread of the process shares, and the userns is only an fd. So
the async wrappers run them in a worker thread (asyncio.to_thread), not in nsworker or the
reaper: a round trip to another process would cost more than the calls (tens of us each). A
crash between open_tree and move_mount leaks nothing (the detached tree dies with its fd); a
crash after an attach leaves a mount under the container's directory, which `recover` removes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import functools
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass

from podfsm.core.errors import StepFailed
from podfsm.drivers import linux

STEP = "idmap"

#: open_tree, move_mount, mount_setattr: the same numbers in the unified table of x86_64 and
#: the generic one of aarch64 (these calls came after the tables were unified)
SYSCALLS: dict[str, tuple[int, int, int]] = {
    "x86_64": (428, 429, 442),
    "aarch64": (428, 429, 442),
}
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
CLONE_NEWUSER = linux.CLONE_NEWUSER
#: what the kernel shows for an id the user namespace does not map
OVERFLOW_ID = 65534

class IdmapUnsupported(StepFailed):
    """The kernel or a filesystem cannot make this idmapped mount: the message names which
    and why. podfsm then refuses the container; it never falls back to a chown-copy."""

    def __init__(self, message: str) -> None:
        super().__init__(STEP, message)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    try:
        return SYSCALLS[machine]
    except KeyError:
        raise IdmapUnsupported(f"idmapped mounts: podfsm knows no syscall numbers for "
                               f"{machine}") from None


def _fs_name(path: str) -> str:
    """The filesystem type of the mount holding `path`, from /proc/self/mountinfo."""
    try:
        st_dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                major, minor = fields[2].split(":")
                if os.makedev(int(major), int(minor)) == st_dev:
                    return fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _explain(call: str, err: int, path: str) -> IdmapUnsupported | OSError:
    kernel = platform.release()
    if err == errno.ENOSYS:
        return IdmapUnsupported(f"{call} is not available on kernel {kernel} (idmapped mounts "
                                "need Linux 5.12, an overlay over idmapped layers 5.19)")
    if call == "mount_setattr" and err == errno.EINVAL:
        return IdmapUnsupported(f"the {_fs_name(path)} filesystem of {path} cannot be idmapped "
                                f"on kernel {kernel} (mount_setattr(MOUNT_ATTR_IDMAP): EINVAL)")
    if call == "mount_setattr" and err == errno.EPERM:
        return IdmapUnsupported(f"idmapping {path} was refused (EPERM): the user namespace is "
                                "the host's own, or this process lacks CAP_SYS_ADMIN over it")
    return OSError(err, f"{call}: {os.strerror(err)}", path)


def _open_tree(path: str, recursive: bool) -> int:
    nr = _numbers()[0]
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    fd = _syscall(nr, AT_FDCWD, os.fsencode(path), ctypes.c_uint(flags))
    if fd < 0:
        raise _explain("open_tree", ctypes.get_errno(), path)
    return int(fd)


def _mount_setattr(fd: int, attr: _MountAttr, recursive: bool, path: str) -> None:
    nr = _numbers()[2]
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    if _syscall(nr, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr))) < 0:
        raise _explain("mount_setattr", ctypes.get_errno(), path)


def _move_mount(fd: int, dst: str) -> None:
    nr = _numbers()[1]
    if _syscall(nr, fd, b"", AT_FDCWD, os.fsencode(dst),
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)) < 0:
        raise _explain("move_mount", ctypes.get_errno(), dst)


#: the first kernel whose overlayfs takes idmapped lower layers
OVERLAY_IDMAP_KERNEL = (5, 19)


def _release_tuple(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.lru_cache(maxsize=1)
def support_problem() -> str | None:
    """None when this kernel can give containers an idmapped rootfs; else why not, in words.
    Asks the kernel itself: a detached clone of / and mount_setattr(MOUNT_ATTR_IDMAP) with the
    host's own user namespace, which a kernel with idmapped mounts answers EPERM (before it
    looks at the filesystem) and one without ENOSYS. Filesystems are checked per mount, where
    an unsupported one is refused by name. Cached: the kernel does not change under us."""
    release = platform.release()
    if _release_tuple(release) < OVERLAY_IDMAP_KERNEL:
        return (f"kernel {release} is older than 5.19: overlayfs cannot use idmapped layers")
    try:
        _numbers()
        fd = _open_tree("/", recursive=False)
    except (IdmapUnsupported, OSError) as exc:
        return str(exc)
    try:
        own = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _mount_setattr(fd, _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=own), False, "/")
        except IdmapUnsupported as exc:
            if "EPERM" in str(exc):
                return None
            return str(exc)
        finally:
            os.close(own)
    finally:
        os.close(fd)
    return "mount_setattr(MOUNT_ATTR_IDMAP) accepted the host's own user namespace"


def open_userns(userns_path: str) -> int:
    """An fd of the user namespace pinned at `userns_path` (a pin, /proc/<pid>/ns/user), or
    of the one owning the network namespace there (a netns pin: ioctl NS_GET_USERNS); the
    caller closes it. StepFailed when the path holds neither."""
    try:
        fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StepFailed(STEP, f"cannot open the pod's user namespace {userns_path}: "
                         f"{exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, linux.NS_GET_NSTYPE)
        if kind == linux.CLONE_NEWNET:
            owner = fcntl.ioctl(fd, linux.NS_GET_USERNS)
            os.close(fd)
            fd, kind = owner, CLONE_NEWUSER
    except OSError:
        kind = -1
    if kind != CLONE_NEWUSER:
        os.close(fd)
        raise StepFailed(STEP, f"{userns_path} is neither a user namespace nor a network "
                         "namespace")
    return fd


def idmapped_tree(src: str, userns_fd: int, *, readonly: bool, recursive: bool = True) -> int:
    """A detached clone of the tree at `src`, idmapped by the user namespace `userns_fd` (and
    read-only if asked): an fd to attach with `attach` or to stat; closing it drops the clone."""
    fd = _open_tree(src, recursive)
    try:
        attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0),
                          userns_fd=userns_fd)
        _mount_setattr(fd, attr, recursive, src)
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(tree_fd: int, dst: str) -> None:
    """Attach a detached tree at `dst` (an existing directory or file)."""
    _move_mount(tree_fd, dst)


def mapped_root(userns_path: str, probe_dir: str) -> tuple[int, int]:
    """The host uid and gid the user namespace at `userns_path` maps its root (0) to, read
    through an idmapped clone of `probe_dir`, which must be a directory owned 0:0 (a
    container's own directory): no process needs to enter the namespace to read its maps.
    IdmapUnsupported when the namespace does not map 0."""
    st = os.stat(probe_dir)
    if (st.st_uid, st.st_gid) != (0, 0):
        raise StepFailed(STEP, f"{probe_dir} must be owned by 0:0 to probe a user namespace, "
                         f"not {st.st_uid}:{st.st_gid}")
    ns = open_userns(userns_path)
    try:
        fd = idmapped_tree(probe_dir, ns, readonly=True, recursive=False)
    finally:
        os.close(ns)
    try:
        shown = os.fstat(fd)
    finally:
        os.close(fd)
    if OVERFLOW_ID in (shown.st_uid, shown.st_gid):
        raise IdmapUnsupported(f"the user namespace {userns_path} does not map uid and gid 0")
    return shown.st_uid, shown.st_gid


def idmap_bind(src: str, dst: str, userns_path: str, readonly: bool = False) -> None:
    """Mount `src` (a directory or a file) at `dst` idmapped by the pod's user namespace: a
    host-path volume whose files the container sees with their own ids, and whose new files
    are stored with the container's ids. `dst` is made (an empty directory or file, like
    `src`) if missing. Recursive: mounts below `src` come along, idmapped too (a submount
    that cannot be is refused, naming it). Nothing is left mounted on failure."""
    if not os.path.lexists(dst):
        if os.path.isdir(src):
            os.mkdir(dst, 0o755)
        else:
            os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    ns = open_userns(userns_path)
    try:
        fd = idmapped_tree(src, ns, readonly=readonly)
    finally:
        os.close(ns)
    try:
        attach(fd, dst)
    finally:
        os.close(fd)


def volume_path(container_dir: str, index: int) -> str:
    """Where the `index`th idmapped volume of a container is attached on the host: inside the
    container's directory, so `recover` finds it; the OCI spec binds it from there."""
    return os.path.join(container_dir, "volumes", str(index))


def idmapped_volume(container_dir: str, index: int, src: str, userns_path: str,
                    readonly: bool) -> str:
    """Idmap a CRI mount's host path for a container of a user-namespaced pod, the same way
    for runc and crun: runc 1.1 ignores OCI per-mount uidMappings, crun 1.8 honours them, and
    one mechanism (podfsm's own idmapped bind) keeps both alike, its errors podfsm's and its
    clean-up in `recover`. The path to bind into the container."""
    path = volume_path(container_dir, index)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    idmap_bind(src, path, userns_path, readonly)
    return path


@dataclass(frozen=True)
class OverlayMount:
    """What `idmapped_overlay` mounted: `target`, over the layer directories `lowers` (seen
    idmapped), its upper and work owned by `root_uid`:`root_gid`."""

    target: str
    lowers: tuple[str, ...]
    root_uid: int
    root_gid: int


def _lower_groups(lowers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(directory to idmap, the lowers below it as relative paths): one group for the common
    parent of the layers (the usual case: one layer store), or one per layer when they have
    nothing in common below /."""
    real = [os.path.realpath(p) for p in lowers]
    common = os.path.commonpath(real)
    if common != "/":
        return [(common, [os.path.relpath(p, common) for p in real])]
    return [(p, ["."]) for p in real]


def idmapped_overlay(lower_dirs: Sequence[str], upper: str, work: str, target: str,
                     userns_path: str, *, root_ids: tuple[int, int] | None = None
                     ) -> OverlayMount:
    """Mount at `target` an overlay of `lower_dirs` (topmost first) whose lowers are seen
    through the pod's user namespace, with `upper` and `work` chowned to the pod's mapped root
    (`root_ids`, else probed through the namespace with `target`'s parent, which must be
    owned 0:0: the container's directory).

    The layers' common parent is cloned detached, idmapped read-only, and handed to overlayfs
    as `/proc/self/fd/<n>/<layer>`: the clone is never attached anywhere, so there is no
    scratch mount point to remove and a crash at any step leaves nothing but, at most, the
    overlay itself (see `recover`). On failure nothing is left mounted. IdmapUnsupported names
    the kernel or filesystem that cannot do it (overlay over idmapped layers needs Linux 5.19).
    """
    if not lower_dirs:
        raise ValueError("an overlay needs at least one lower directory")
    for p in (*lower_dirs, upper, work, target):
        if ":" in p or "," in p:
            raise ValueError(f"overlay paths may not hold ':' or ',': {p!r}")
        if not os.path.isdir(p):
            raise FileNotFoundError(errno.ENOENT, "overlay directory is missing", p)
    if root_ids is None:
        root_ids = mapped_root(userns_path, os.path.dirname(os.path.abspath(target)))
    for d in (upper, work):
        os.chown(d, *root_ids)
    trees: list[int] = []
    try:
        ns = open_userns(userns_path)
        lowers: list[str] = []
        try:
            for src, rels in _lower_groups(lower_dirs):
                fd = idmapped_tree(src, ns, readonly=True)
                trees.append(fd)
                lowers += [os.path.normpath(f"/proc/self/fd/{fd}/{r}") for r in rels]
        finally:
            os.close(ns)
        data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        try:
            if len(os.fsencode(data)) < MOUNT_DATA_MAX:
                linux.mount("overlay", target, "overlay", 0, data)
            else:
                _mount_overlay_by_layers(lowers, upper, work, target)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise IdmapUnsupported(
                    f"overlay over idmapped layers was refused (EINVAL) on kernel "
                    f"{platform.release()}: it needs Linux 5.19, and its upper and work "
                    f"directories one filesystem ({_fs_name(upper)} and {_fs_name(work)})"
                ) from None
            raise
        return OverlayMount(target, tuple(lower_dirs), *root_ids)
    finally:
        # The overlay holds its lowers: the detached clones are not needed once it exists.
        for fd in trees:
            os.close(fd)


#: mount(2) copies its options into one page: with many layers the lowerdir list is longer
MOUNT_DATA_MAX = 4095
#: the kernel from which overlayfs takes its lower layers one `lowerdir+` at a time
LOWERDIR_PLUS_KERNEL = (6, 8)
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
#: fsopen, fsconfig, fsmount: like the other new mount calls, one number on x86_64 and aarch64
FS_SYSCALLS = (430, 431, 432)


def _fsconfig(fs: int, key: str, value: str | None, cmd: int = FSCONFIG_SET_STRING) -> None:
    val = None if value is None else os.fsencode(value)
    if _syscall(FS_SYSCALLS[1], fs, ctypes.c_uint(cmd), None if key == "" else key.encode(),
                val, 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fsconfig({key or 'create'}): {os.strerror(e)}", value)


def _mount_overlay_by_layers(lowers: Sequence[str], upper: str, work: str,
                             target: str) -> None:
    """The overlay through the new mount API, one `lowerdir+` per layer (Linux 6.8): for an
    image whose lowerdir list does not fit mount(2)'s one page of options."""
    release = platform.release()
    if _release_tuple(release) < LOWERDIR_PLUS_KERNEL:
        raise IdmapUnsupported(
            f"the {len(lowers)} layers' lowerdir list is longer than mount(2)'s {MOUNT_DATA_MAX}"
            f" bytes, and kernel {release} cannot take layers one by one (Linux 6.8)")
    _numbers()
    fs = _syscall(FS_SYSCALLS[0], b"overlay", ctypes.c_uint(FSOPEN_CLOEXEC))
    if fs < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fsopen(overlay): {os.strerror(e)}")
    try:
        for layer in lowers:
            _fsconfig(fs, "lowerdir+", layer)
        _fsconfig(fs, "upperdir", upper)
        _fsconfig(fs, "workdir", work)
        _fsconfig(fs, "", None, FSCONFIG_CMD_CREATE)
        mnt = _syscall(FS_SYSCALLS[2], fs, ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(0))
        if mnt < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"fsmount(overlay): {os.strerror(e)}", target)
        try:
            _move_mount(int(mnt), target)
        finally:
            os.close(mnt)
    finally:
        os.close(fs)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


def mounts_under(path: str) -> list[str]:
    """The mount points at or below `path` in this process's mount table, deepest first."""
    root = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount(target: str) -> None:
    """Unmount what is mounted at `target`, every layer of it (idempotent: EINVAL says nothing
    is mounted there). A busy mount is detached (MNT_DETACH): it is gone from the table at
    once, freed when its last user goes."""
    while True:
        try:
            linux.umount2(target, linux.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                linux.umount2(target, linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
            elif exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            else:
                raise


def recover(container_dir: str) -> list[str]:
    """Make a container's directory mount-free after a crash at any step: every mount at or
    below it (the rootfs overlay, idmapped volumes) is unmounted, deepest first. (A crash
    before an attach leaks nothing: a detached clone dies with the process's fds.) Returns the
    mount points it removed."""
    if not os.path.isdir(container_dir):
        return []
    removed = mounts_under(container_dir)
    for point in removed:
        unmount(point)
    return removed


async def idmapped_overlay_async(lower_dirs: Sequence[str], upper: str, work: str,
                                 target: str, userns_path: str,
                                 root_ids: tuple[int, int] | None = None) -> OverlayMount:
    """`idmapped_overlay` in a worker thread (see the module's note on threads)."""
    return await asyncio.to_thread(idmapped_overlay, lower_dirs, upper, work, target,
                                   userns_path, root_ids=root_ids)


async def idmap_bind_async(src: str, dst: str, userns_path: str,
                           readonly: bool = False) -> None:
    """`idmap_bind` in a worker thread."""
    await asyncio.to_thread(idmap_bind, src, dst, userns_path, readonly)


async def recover_async(container_dir: str) -> list[str]:
    """`recover` in a worker thread."""
    return await asyncio.to_thread(recover, container_dir)


async def idmapped_volume_async(container_dir: str, index: int, src: str, userns_path: str,
                                readonly: bool) -> str:
    """`idmapped_volume` in a worker thread."""
    return await asyncio.to_thread(idmapped_volume, container_dir, index, src, userns_path,
                                   readonly)


async def unmount_async(target: str) -> None:
    """`unmount` in a worker thread."""
    await asyncio.to_thread(unmount, target)
