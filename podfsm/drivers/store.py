"""The record store: one JSON file per sandbox under <state_dir>/sandboxes, written atomically
(temporary file, rename) so a crash leaves the old record or the new one, never half of either.
A lock file keeps a second controller off the same state_dir.

Durability against a crash of the MACHINE is paid for only where it is needed. After a reboot
the namespaces, mounts, processes and run_dir are gone whatever the records say; what outlives
them is the CNI plugins' IPAM store on disk. So the write that precedes the first system step
(before any address can be reserved) is `durable`: fsync of the file and of the directory, in a
worker thread. Later writes are not fsynced: a controller crash loses nothing (the page cache
stays), and after a power loss an older record is recovered to NotReady all the same and its
removal still runs CNI DEL. Those writes go to the page cache inline (~40 us of CPU), which is
cheaper than a trip to a thread (~100 us of CPU each).

Records carry `schema_version`; `migrate` brings an older record up to date step by step. A
record that cannot be read is set aside in <state_dir>/corrupt (with a logged error) so every
other sandbox still recovers; a record written by a NEWER podfsm stops the start instead (its
sandbox must not be taken for an orphan and torn down by an older podfsm).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiofiles
import aiofiles.os
import anyio
from pydantic import ValidationError

from podfsm.core.errors import ControllerLocked, StateDirError
from podfsm.core.records import SCHEMA_VERSION, SandboxRecord

log = logging.getLogger(__name__)

Migration = Callable[[dict[str, Any]], dict[str, Any]]

#: MIGRATIONS[n] turns a version-n record (decoded JSON) into a version n+1 one. Version 1 is
#: the first; a change to SandboxRecord that old records do not satisfy bumps SCHEMA_VERSION
#: and adds its step here, so a record written by any older podfsm still loads.
MIGRATIONS: dict[int, Migration] = {}


class RecordTooNew(ValueError):
    """The record was written by a newer podfsm than this one."""


def migrate(
    data: dict[str, Any],
    *,
    target: int = SCHEMA_VERSION,
    steps: Mapping[int, Migration] = MIGRATIONS,
) -> dict[str, Any]:
    """Bring a decoded record up to schema version `target` (ValueError if it cannot be)."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"record schema version {version!r} is not a version")
    if version > target:
        raise RecordTooNew(f"record schema version {version} is newer than this podfsm's "
                           f"({target}): upgrade podfsm")
    while version < target:
        step = steps.get(version)
        if step is None:
            raise ValueError(f"no migration from record schema version {version}")
        data = step(dict(data))
        version += 1
        data["schema_version"] = version
    return data


class FileStore:
    """Store implementation on the local filesystem."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "sandboxes")
        self.quarantine = os.path.join(state_dir, "corrupt")
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        self._tmp_names = itertools.count()

    def open(self) -> None:
        """Create the directories and take the controller lock (non-blocking). Raises
        ControllerLocked when another controller holds it, StateDirError when the state dir
        cannot be used (missing and not creatable, read-only)."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.state_dir, "lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirError(f"state dir {self.state_dir}: {_why(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControllerLocked(
                f"another podfsm controller is using state dir {self.state_dir} "
                "(it holds the lock on its 'lock' file)"
            ) from None
        self._lock_fd = fd
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not os.access(self.dir, os.W_OK):
            self.close()
            raise StateDirError(f"state dir {self.dir} is not writable")

    def close(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._dir_fd = self._lock_fd = None

    def _path(self, sandbox_id: str) -> str:
        return os.path.join(self.dir, f"{sandbox_id}.json")

    async def load_all(self) -> tuple[list[SandboxRecord], list[str]]:
        """Every readable record, and a problem line for each one set aside as corrupt.
        Temporary files of writes a crash interrupted are removed (the old record stands)."""
        records: list[SandboxRecord] = []
        problems: list[str] = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                try:
                    await aiofiles.os.remove(path)
                except OSError as exc:
                    raise StateDirError(f"cannot remove {path}: {_why(exc)}") from None
                continue
            if not name.endswith(".json"):
                continue
            try:
                async with aiofiles.open(path, "rb") as f:
                    data = json.loads(await f.read())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                rec = SandboxRecord.model_validate(migrate(data))
                if f"{rec.id}.json" != name:
                    raise ValueError(f"record id {rec.id!r} does not match its file name")
                records.append(rec)
            except RecordTooNew as exc:
                raise StateDirError(f"record {path}: {exc}") from None
            except (ValueError, ValidationError, UnicodeDecodeError, OSError) as exc:
                problem = self._set_aside(name, exc)
                log.error(problem)
                problems.append(problem)
        return records, problems

    def _set_aside(self, name: str, exc: Exception) -> str:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            os.makedirs(self.quarantine, mode=0o700, exist_ok=True)
            os.replace(os.path.join(self.dir, name), os.path.join(self.quarantine, name))
        except OSError as move:
            return f"corrupt record {name} (cannot set it aside: {_why(move)}): {first}"
        return f"corrupt record {name} set aside in {self.quarantine}: {first}"

    async def save(self, rec: SandboxRecord, *, durable: bool = False) -> None:
        """Atomically replace the record of rec.id; `durable` also survives a power loss (see
        the module's doc). On failure (StateDirError) the previous record stands and no
        temporary file is left."""
        path = self._path(rec.id)
        tmp = f"{path}.{os.getpid()}-{next(self._tmp_names)}.tmp"
        data = rec.model_dump_json().encode()
        try:
            if durable:
                # One trip to aiofiles' thread pool for the whole write. Shielded: a cancelled
                # write would go on in that thread anyway.
                with anyio.CancelScope(shield=True):
                    await _write_atomic(tmp, path, data, self._dir_fd)
            else:
                _write_atomic_sync(tmp, path, data, None, sync=False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateDirError(f"cannot write record {path}: {_why(exc)}") from None

    async def delete(self, sandbox_id: str) -> None:
        """Forget a sandbox. Idempotent. Not fsynced: a record that a power loss brings back
        is recovered NotReady and removed again (every step of a removal is idempotent)."""
        path = self._path(sandbox_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.EROFS and not os.path.lexists(path):
                return  # a read-only state dir says EROFS rather than ENOENT
            raise StateDirError(f"cannot delete record {path}: {_why(exc)}") from None


def _write_atomic_sync(tmp: str, path: str, data: bytes, dir_fd: int | None,
                       sync: bool = True) -> None:
    """Temporary file, (fsync), rename, (fsync of the directory): the old record or the new
    one survives a crash, never a mix."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync and dir_fd is not None:
        os.fsync(dir_fd)


_write_atomic = aiofiles.os.wrap(_write_atomic_sync)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the state dir is full (no space left on the device)"
    if exc.errno == errno.EROFS:
        return "the state dir is read-only (read-only file system)"
    return exc.strerror or str(exc)
