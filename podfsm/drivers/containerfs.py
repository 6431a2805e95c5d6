"""A container's files on the host: its record, its directory (bundle, overlay rootfs, upper
and work directories) and what the spec builder needs read from the system.

Layout, per container, under `<state_dir>/containers/<id>/`:
  record.json        the ContainerRecord (written atomically: temp file + rename)
  upper/, work/      the overlay's writable layer and its work directory
  rootfs/            the overlay mount: the image's unpacked layers (lowest last) + upper
  config.json        the OCI spec (the directory is the bundle)
  pid, conmon.pid    the container's init and its monitor, as conmon writes them
  exit/              the monitor's exit file (`exit/<id>`: the exit code) and `oom`
The directory lives under state_dir, not run_dir, so that the writable layer is on disk and
survives what a tmpfs would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from typing import Any

from podfsm.core.containerrecords import ContainerRecord
from podfsm.drivers import linux

log = logging.getLogger(__name__)

RECORD = "record.json"
_MAX_ETC = 1 << 20  # a passwd or group file larger than this is not read


class ContainerFiles:
    """The containers' directories under `root` (`<state_dir>/containers`)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def open(self) -> None:
        os.makedirs(self.root, mode=0o711, exist_ok=True)

    def dir(self, container_id: str) -> str:
        return os.path.join(self.root, container_id)

    # -- records -----------------------------------------------------------------------------

    def load_all(self) -> tuple[list[ContainerRecord], list[str]]:
        """Every readable record, and what was wrong with the others (their ids named). A
        directory without a record (its first save or its removal was cut short) is left to
        the orphan collection."""
        recs: list[ContainerRecord] = []
        problems: list[str] = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return [], []
        for name in names:
            path = os.path.join(self.root, name, RECORD)
            try:
                with open(path, "rb") as f:
                    recs.append(ContainerRecord.model_validate_json(f.read()))
            except FileNotFoundError:
                # a save or a removal cut short: the directory is collected as an orphan
                continue
            except (OSError, ValueError) as exc:
                problems.append(f"container record {path} is unreadable: {exc}")
        return recs, problems

    async def save(self, rec: ContainerRecord) -> None:
        await asyncio.to_thread(self._save, rec)

    def _save(self, rec: ContainerRecord) -> None:
        d = self.dir(rec.id)
        os.makedirs(d, mode=0o711, exist_ok=True)
        tmp = os.path.join(d, RECORD + ".tmp")
        with open(tmp, "wb") as f:
            f.write(rec.model_dump_json().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(d, RECORD))

    # -- rootfs ------------------------------------------------------------------------------

    def rootfs(self, container_id: str) -> str:
        return os.path.join(self.dir(container_id), "rootfs")

    async def mount_rootfs(self, container_id: str, lowers: list[str]) -> str:
        """Mount the overlay of `lowers` (topmost first) with this container's upper and work
        directories; the merged rootfs path. On failure nothing is left mounted."""
        return await asyncio.to_thread(self._mount_rootfs, container_id, lowers)

    def _mount_rootfs(self, container_id: str, lowers: list[str]) -> str:
        d = self.dir(container_id)
        upper, work, merged = (os.path.join(d, n) for n in ("upper", "work", "rootfs"))
        for p in (upper, work, merged):
            os.makedirs(p, mode=0o755, exist_ok=True)
        if os.path.ismount(merged):
            return merged
        for low in lowers:
            if not os.path.isdir(low):
                raise FileNotFoundError(errno.ENOENT, "image layer is not unpacked", low)
        data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        linux.mount("overlay", merged, "overlay", 0, data)
        return merged

    async def unmount_rootfs(self, container_id: str) -> None:
        """Unmount the overlay (idempotent)."""
        await asyncio.to_thread(self._unmount, self.rootfs(container_id))

    @staticmethod
    def _unmount(path: str) -> None:
        while os.path.ismount(path):
            try:
                linux.umount2(path, 0)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    linux.umount2(path, linux.MNT_DETACH)
                elif exc.errno in (errno.EINVAL, errno.ENOENT):
                    return
                else:
                    raise

    async def remove_dir(self, container_id: str) -> None:
        """Unmount and remove the container's whole directory, record last. Idempotent."""
        await asyncio.to_thread(self._remove_dir, container_id)

    def _remove_dir(self, container_id: str) -> None:
        d = self.dir(container_id)
        self._unmount(os.path.join(d, "rootfs"))
        if not os.path.isdir(d):
            return
        rec = os.path.join(d, RECORD)
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if p == rec:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec)
        os.rmdir(d)

    def write_spec(self, container_id: str, spec: dict[str, Any]) -> str:
        path = os.path.join(self.dir(container_id), "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(spec, f)
        os.replace(path + ".tmp", path)
        return path

    def remove_spec(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir(container_id), "config.json"))

    def read_spec(self, container_id: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.dir(container_id), "config.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_etc(self, rootfs: str, name: str) -> str:
        """The image's /etc/<name> as text ("" when missing), read without following a
        symlink out of the rootfs: only a regular file directly at that path."""
        path = os.path.join(rootfs, "etc", name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            return f.read(_MAX_ETC).decode("utf-8", "replace")

    @staticmethod
    def real_host_path(path: str) -> str:
        """A mount's host path with symlinks resolved (it must exist), as containerd does."""
        real = os.path.realpath(path, strict=True)
        return real

    @staticmethod
    def host_device(path: str) -> tuple[str, int, int, int, int, int]:
        """(kind c|b, major, minor, mode, uid, gid) of the device node at `path` (a symlink
        followed); ValueError when it is not a device, OSError when it cannot be read."""
        st = os.stat(path)
        if stat.S_ISCHR(st.st_mode):
            kind = "c"
        elif stat.S_ISBLK(st.st_mode):
            kind = "b"
        else:
            raise ValueError(f"{path} is not a character or block device")
        return (kind, os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode, st.st_uid,
                st.st_gid)

    def upper_usage(self, container_id: str) -> tuple[int, int]:
        """Bytes and inodes of the writable layer."""
        total = inodes = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(self.dir(container_id),
                                                                 "upper")):
            for n in dirnames + filenames:
                inodes += 1
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
        return total, inodes
