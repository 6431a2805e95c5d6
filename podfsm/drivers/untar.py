"""The layer extractor: tar entries (tarstream.py) laid down under one directory, kept as they
are (numeric owners, modes with setuid/setgid/sticky, times, xattrs, hard links, symlinks with
their targets verbatim, fifos, device nodes as real root) and whiteouts turned into overlay's
form, without ever writing outside that directory.

Containment: every operation is relative to an O_DIRECTORY|O_NOFOLLOW descriptor of a directory
inside the layer, reached one component at a time from the layer root's descriptor with
O_NOFOLLOW, so no path string is ever resolved through a symlink. An entry name is split into
components: empty and `.` components are dropped (so a leading `/` is stripped: `/etc/x` lands
at `<layer>/etc/x`, as GNU tar and containerd do), a `..` component is refused, and a name
whose parent crosses a symlink laid down earlier in the layer is refused; symlinks are never
followed, whatever they point at. A hard link's target must be an entry of the same layer laid
down before it, reached the same way. Missing parent directories are made (0755, root).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from podfsm.core.errors import UnpackError
from podfsm.drivers import tarstream as ts

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: directory descriptors kept open for the entries that follow (tar lists a directory's
#: entries together, so a small cache saves walking from the root for each one)
_CACHE_MAX = 256
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass
class Extracted:
    diff_id: str  # "sha256:<hex>" of the uncompressed stream
    tar_size: int  # bytes of the uncompressed stream
    entries: int


def real_root() -> bool:
    """Root in the initial user namespace, the only place device nodes are made."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def split_name(name: str) -> tuple[str, ...]:
    """An entry name as components inside the layer (empty for the layer root itself)."""
    if "\0" in name:
        raise UnpackError(name, "the name contains a NUL byte")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnpackError(name, "a '..' component would leave the layer directory")
    return parts


class Extractor:
    """Lays entries down under the directory `root_fd` (kept open by the caller)."""

    def __init__(self, root_fd: int, *, devices: bool) -> None:
        self._root = root_fd
        self._devices = devices
        self._dirs: dict[tuple[str, ...], int] = {}
        #: descriptors of removed directories, closed before the next entry (an entry being
        #: laid down may still hold one: it then writes in a deleted directory, never outside)
        self._stale: list[int] = []
        self._dir_times: list[tuple[tuple[str, ...], int, int]] = []

    def close(self) -> None:
        for fd in (*self._dirs.values(), *self._stale):
            os.close(fd)
        self._dirs.clear()
        self._stale.clear()

    # -- reaching directories -------------------------------------------------------------

    def _forget_dirs(self, parts: tuple[str, ...]) -> None:
        """Drop the cached descriptors of `parts` and below (it was removed)."""
        n = len(parts)
        for key in [k for k in self._dirs if k[:n] == parts]:
            self._stale.append(self._dirs.pop(key))

    def _dir(self, parts: tuple[str, ...], entry: str, *, create: bool) -> int:
        """The descriptor of the directory `parts`, walked from the root without following
        any symlink; missing directories are made when `create`."""
        if not parts:
            return self._root
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        i = len(parts) - 1
        while i and parts[:i] not in self._dirs:
            i -= 1
        fd = self._dirs[parts[:i]] if i else self._root
        for j in range(i, len(parts)):
            comp = parts[j]
            try:
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnpackError(entry, f"{'/'.join(parts[:j + 1])} is not in the layer "
                                             "(a hard link's target must come before it)"
                                      ) from None
                os.mkdir(comp, 0o755, dir_fd=fd)
                nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
                os.fchmod(nfd, 0o755)  # whatever the process's umask
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/".join(parts[:j + 1])
                st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise UnpackError(entry, f"the path crosses the symlink {where} laid down "
                                             "earlier in the layer (it is never followed)"
                                      ) from None
                raise UnpackError(entry, f"{where} is not a directory") from None
            self._dirs[parts[:j + 1]] = nfd
            fd = nfd
        return fd

    def _remove(self, pfd: int, parts: tuple[str, ...]) -> None:
        """Remove the existing entry `parts` (in `pfd`) that a later one of its name replaces."""
        base = parts[-1]
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self._forget_dirs(parts)
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)

    # -- entries ---------------------------------------------------------------------------

    def apply(self, e: ts.Entry, reader: ts.TarReader) -> None:
        """Lay down one entry (its data read from `reader`); UnpackError names a refused one."""
        try:
            self._apply(e, reader)
        except UnpackError:
            raise
        except OSError as exc:
            raise UnpackError(e.name, os.strerror(exc.errno) if exc.errno else str(exc)
                              ) from None
        except (ValueError, OverflowError) as exc:  # a NUL in a link target, a time past 2^63
            raise UnpackError(e.name, str(exc)) from None

    def _apply(self, e: ts.Entry, reader: ts.TarReader) -> None:
        if self._stale or len(self._dirs) > _CACHE_MAX:
            for fd in self._stale:
                os.close(fd)
            self._stale.clear()
            if len(self._dirs) > _CACHE_MAX:
                self._forget_dirs(())
        parts = split_name(e.name)
        if not parts:
            if e.type != ts.DIRECTORY:
                raise UnpackError(e.name, "names the layer root, which is a directory")
            self._meta_fd(e, self._root)
            self._dir_times.append(((), e.atime_ns, e.mtime_ns))
            return
        base = parts[-1]
        pfd = self._dir(parts[:-1], e.name, create=True)
        if base.startswith(WHITEOUT):
            self._whiteout(e, pfd, parts)
            return
        kind = e.type
        for key in e.xattrs:
            if key.startswith("trusted.overlay."):
                raise UnpackError(e.name, f"the xattr {key} is overlay's own metadata (only "
                                          "whiteouts are turned into it)")
        if kind in ts.REGULAR:
            self._file(e, pfd, parts, reader)
        elif kind == ts.DIRECTORY:
            self._directory(e, pfd, base, parts)
        elif kind == ts.SYMLINK:
            if "\0" in e.linkname or not e.linkname:
                raise UnpackError(e.name, "a symlink with an empty or NUL-bearing target")
            self._make(pfd, parts, lambda: os.symlink(e.linkname, base, dir_fd=pfd))
            self._meta_name(e, pfd, base, symlink=True)
        elif kind == ts.HARDLINK:
            self._hardlink(e, pfd, base, parts)
        elif kind == ts.FIFO:
            self._make(pfd, parts, lambda: os.mkfifo(base, 0o600, dir_fd=pfd))
            self._meta_name(e, pfd, base, symlink=False)
        elif kind in (ts.CHARDEV, ts.BLOCKDEV):
            what = "c" if kind == ts.CHARDEV else "b"
            if not self._devices:
                raise UnpackError(e.name, f"a device node ({what} {e.devmajor}:{e.devminor}) "
                                          "is made only when podfsm runs as real root")
            fmt = stat.S_IFCHR if kind == ts.CHARDEV else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
            self._make(pfd, parts, lambda: os.mknod(base, fmt | 0o600, dev, dir_fd=pfd))
            self._meta_name(e, pfd, base, symlink=False)
        else:
            raise UnpackError(e.name, f"an entry of tar type {kind!r} (not a file, directory, "
                                      "link, fifo or device)")

    def _make(self, pfd: int, parts: tuple[str, ...], make: Callable[[], None]) -> None:
        """Create with `make`, first removing an existing entry of that name."""
        try:
            make()
        except FileExistsError:
            self._remove(pfd, parts)
            make()

    def _file(self, e: ts.Entry, pfd: int, parts: tuple[str, ...],
              reader: ts.TarReader) -> None:
        base = parts[-1]
        try:
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, parts)
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            if e.size:
                reader.copy(e.size, fd)
            self._meta_fd(e, fd)
            os.utime(fd, ns=(e.atime_ns, e.mtime_ns))
        finally:
            os.close(fd)

    def _directory(self, e: ts.Entry, pfd: int, base: str, parts: tuple[str, ...]) -> None:
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a directory stays one; anything else is replaced
                self._remove(pfd, parts)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = self._dir(parts, e.name, create=False)
        self._meta_fd(e, fd)
        self._dir_times.append((parts, e.atime_ns, e.mtime_ns))  # set once its entries are in

    def _hardlink(self, e: ts.Entry, pfd: int, base: str, parts: tuple[str, ...]) -> None:
        try:
            target = split_name(e.linkname)
        except UnpackError as exc:
            raise UnpackError(e.name, f"the hard link's target {e.linkname!r}: {exc.reason}"
                              ) from None
        if not target:
            raise UnpackError(e.name, "a hard link to the layer root")
        if target == parts:
            return  # a link to itself: nothing to do
        tpfd = self._dir(target[:-1], e.name, create=False)
        tbase = target[-1]

        def link() -> None:
            # linkat without AT_SYMLINK_FOLLOW: a link to a symlink is a link to the symlink
            # itself, never to what it points at
            os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)

        try:
            self._make(pfd, parts, link)
        except FileNotFoundError:
            raise UnpackError(e.name, f"the hard link's target {e.linkname!r} is not in the "
                                      "layer (it must come before the link)") from None
        except PermissionError:
            raise UnpackError(e.name, f"the hard link's target {e.linkname!r} is a directory"
                              ) from None
        # the link entry's owner, mode and times apply to the shared inode, as containerd does
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        self._meta_name(e, pfd, base, symlink=stat.S_ISLNK(st.st_mode))

    def _whiteout(self, e: ts.Entry, pfd: int, parts: tuple[str, ...]) -> None:
        base = parts[-1]
        if base == OPAQUE:
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless to overlay
        name = base[len(WHITEOUT):]
        if name in ("", ".", ".."):
            raise UnpackError(e.name, "a whiteout of no file")
        self._make(pfd, (*parts[:-1], name),
                   lambda: os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd))
        os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)

    # -- metadata --------------------------------------------------------------------------

    def _meta_fd(self, e: ts.Entry, fd: int) -> None:
        """Owner, mode, xattrs, in that order: chown clears setuid/setgid and capabilities."""
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        for key, value in e.xattrs.items():
            os.setxattr(fd, key, value)

    def _meta_name(self, e: ts.Entry, pfd: int, base: str, *, symlink: bool) -> None:
        """The same for an entry that cannot be opened for writing (symlink, fifo, device,
        hard link); `base` is one component whose last is not followed."""
        os.chown(base, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if not symlink:
            os.chmod(base, e.mode, dir_fd=pfd)  # known not to be a symlink: nothing followed
        if e.xattrs:
            fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                for key, value in e.xattrs.items():
                    # the /proc magic link names the inode itself, even a symlink's
                    os.setxattr(f"/proc/self/fd/{fd}", key, value)
            finally:
                os.close(fd)
        os.utime(base, ns=(e.atime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def finish(self) -> None:
        """Set the directories' times, deepest first, now that nothing more is written in
        them. A directory replaced since is skipped."""
        for parts, atime, mtime in reversed(self._dir_times):
            try:
                fd = self._dir(parts, "/".join(parts), create=False)
            except (UnpackError, OSError):
                continue
            os.utime(fd, ns=(atime, mtime))
        self.close()


def extract(chunks: Iterator[bytes], root_fd: int, *, devices: bool) -> Extracted:
    """Unpack the uncompressed tar stream `chunks` under the directory `root_fd`."""
    reader = ts.TarReader(chunks)
    ex = Extractor(root_fd, devices=devices)
    count = 0
    try:
        for entry in ts.entries(reader):
            ex.apply(entry, reader)
            count += 1
        ex.finish()
        diff_id = reader.finish()
    finally:
        ex.close()
        reader.close()
    return Extracted(diff_id=diff_id, tar_size=reader.total, entries=count)
