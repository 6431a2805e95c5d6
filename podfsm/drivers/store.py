"""The record store: one JSON file per sandbox under <state_dir>/sandboxes, written atomically
(temporary file, fsync, rename, fsync of the directory) so a crash leaves the old record or the
new one, never half of either. A lock file keeps a second controller off the same state_dir."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from typing import Any

import aiofiles
import aiofiles.os
from pydantic import ValidationError

from podfsm.core.errors import ControllerLocked, StateDirError
from podfsm.core.records import SCHEMA_VERSION, SandboxRecord

log = logging.getLogger(__name__)

_fsync = aiofiles.os.wrap(os.fsync)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a decoded record up to SCHEMA_VERSION. Version 1 is the first; later versions add
    their step here, so a record written by any older podfsm still loads."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"record schema version {version!r} is newer than this podfsm's "
                         f"({SCHEMA_VERSION})")
    data["schema_version"] = SCHEMA_VERSION
    return data


class FileStore:
    """Store implementation on the local filesystem."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "sandboxes")
        self.quarantine = os.path.join(state_dir, "corrupt")
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None

    def open(self) -> None:
        """Create the directories and take the controller lock (non-blocking)."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirError(f"state dir {self.state_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ControllerLocked(
                f"another podfsm controller is using state dir {self.state_dir}"
            ) from None
        self._lock_fd = fd
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
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
        records: list[SandboxRecord] = []
        problems: list[str] = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                # a write that a crash interrupted before its rename: the old record stands
                await aiofiles.os.remove(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                async with aiofiles.open(path, "rb") as f:
                    data = json.loads(await f.read())
                rec = SandboxRecord.model_validate(migrate(data))
                if f"{rec.id}.json" != name:
                    raise ValueError(f"record id {rec.id!r} does not match its file name")
                records.append(rec)
            except (ValueError, ValidationError, UnicodeDecodeError) as exc:
                problem = self._set_aside(name, exc)
                log.error(problem)
                problems.append(problem)
        return records, problems

    def _set_aside(self, name: str, exc: Exception) -> str:
        os.makedirs(self.quarantine, mode=0o700, exist_ok=True)
        os.replace(os.path.join(self.dir, name), os.path.join(self.quarantine, name))
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"corrupt record {name} set aside in {self.quarantine}: {first}"

    async def save(self, rec: SandboxRecord) -> None:
        path = self._path(rec.id)
        tmp = path + ".tmp"
        data = rec.model_dump_json().encode()
        try:
            async with aiofiles.open(tmp, "wb") as f:
                await f.write(data)
                await f.flush()
                await _fsync(f.fileno())
            await aiofiles.os.replace(tmp, path)
            if self._dir_fd is not None:
                await _fsync(self._dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            what = "full" if exc.errno == errno.ENOSPC else exc.strerror
            raise StateDirError(f"cannot write record {path}: {what}") from None

    async def delete(self, sandbox_id: str) -> None:
        try:
            await aiofiles.os.remove(self._path(sandbox_id))
        except FileNotFoundError:
            return
        if self._dir_fd is not None:
            await _fsync(self._dir_fd)
