"""The record store: each sandbox's record lives in two slot files under
<state_dir>/sandboxes, `<id>.0.rec` and `<id>.1.rec`, each a header line (sequence number,
length, CRC-32) and the record as one line of JSON (`sed 1d <id>.0.rec | jq .` shows one). A
write goes to the slot that does NOT hold the newest record; a load takes the newest slot whose
header checks out. So a write torn by a crash (of the controller or of the machine) leaves the
previous record standing, never half of either. A lock file keeps a second controller off the
same state_dir.

Durability against a crash of the MACHINE is paid for only where it is needed. After a reboot
the namespaces, mounts, processes and run_dir are gone whatever the records say; what outlives
them is the CNI plugins' IPAM store on disk. So the write that precedes the first system step
(before any address can be reserved) is `durable`: a temporary file, fsync, rename over the
slot, fsync of the directory, in one trip to aiofiles' thread pool (the temporary file of an
interrupted one is removed at load). The later writes of a lifecycle overwrite their slot in
place, inline and without fsync: a controller crash loses nothing that reached the page cache,
and after a power loss an older record is recovered to NotReady all the same and its removal
still runs CNI DEL. Measured on ext4: a create + rename costs 40-280 us of kernel CPU (inode
allocation, the forced flush of the new data), a trip to a thread ~100 us, an in-place write
~3 us; a lifecycle writes six records.

Slot files are recycled rather than created and unlinked: `delete` moves a sandbox's slots to
<state_dir>/spare and empties them (up to MAX_SPARES), and a new sandbox's slots are spares
renamed into place, its durable first write going to a spare as its temporary file. Creating a
file costs the allocation of an inode, ~30 us of kernel CPU in a quiet ext4 block group and
300-500 us in one where many inodes were deleted recently (ext4 skips those while it looks for
a free one; measured on this project's test VM), where a rename costs ~40 us; a lifecycle needs
two slot files.

Records carry `schema_version`; `migrate` brings an older record up to date step by step. A
record that cannot be used is set aside in <state_dir>/corrupt (with a logged error) so every
other sandbox still recovers: a torn or oversized slot, JSON nested deeper than any record is, a
file name that is not a sandbox id, a slot that is not a regular file (a symlink is never
followed), or a record the caller's `check` refuses (the controller checks that every path it
holds is the one it would use itself); so is any other entry of <state_dir>/sandboxes that is
not a slot file (a directory with a temporary file's name among them: no entry, whoever made it,
stops a start). A record written by a NEWER podfsm stops the start instead (its sandbox must
not be taken for an orphan and torn down by an older podfsm).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import stat
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import aiofiles
import aiofiles.os
import anyio

from podfsm.core import sizes
from podfsm.core.errors import StateDirError
from podfsm.core.records import SCHEMA_VERSION, SandboxRecord
from podfsm.core.requests import SetAside
from podfsm.drivers import linux

log = logging.getLogger(__name__)

Migration = Callable[[dict[str, Any]], dict[str, Any]]
#: A caller's last word on a decoded record: None to use it, else why it cannot be used.
RecordCheck = Callable[[SandboxRecord], "str | None"]

#: The sandbox-id format (64 lower-case hex digits, as containerd's ids): a slot file whose name
#: does not carry one is set aside, so no other name ever reaches a path.
SANDBOX_ID = re.compile(r"[0-9a-f]{64}")
#: A record is a few KiB (its history grows by ~150 bytes per transition); anything larger than
#: this is not one, and is not read into memory. Admission keeps every record under it
#: (podfsm.core.sizes), and `save` refuses to write one it would not read back.
MAX_RECORD_BYTES = sizes.MAX_RECORD_BYTES
#: Records nest 6 levels deep (CNI results a few more): json.loads on a deeper document could
#: exhaust the interpreter's stack (RecursionError), and pydantic or a face would later.
MAX_JSON_DEPTH = 64

#: How many emptied slot files are kept for reuse (see the module's doc); more are unlinked.
MAX_SPARES = 64

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

    SLOTS = (".0.rec", ".1.rec")

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.dir = os.path.join(state_dir, "sandboxes")
        self.quarantine = os.path.join(state_dir, "corrupt")
        self.spare_dir = os.path.join(state_dir, "spare")
        #: emptied slot files ready for reuse, under spare_dir
        self._spares: list[str] = []
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None
        #: the sequence number of each sandbox's newest record
        self._seq: dict[str, int] = {}
        self._tmp_names = itertools.count()

    def open(self) -> None:
        """Create the directories and take the controller lock (non-blocking). Raises
        ControllerLocked when another controller holds it, StateDirError when the state dir
        cannot be used (missing and not creatable, read-only)."""
        linux.secure_dir(self.state_dir, 0o700, "state dir")
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._lock_fd = linux.lock_dir(self.state_dir, "lock", "state dir")
        except OSError as exc:
            raise StateDirError(f"state dir {self.state_dir}: {_why(exc)}") from None
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not os.access(self.dir, os.W_OK):
            self.close()
            raise StateDirError(f"state dir {self.dir} is not writable")
        self._spares = self._find_spares()

    def _find_spares(self) -> list[str]:
        """The spare slot files left by the last run, emptied (a crash may have come between
        a slot's move here and its truncation); anything but a regular file is removed. Empty
        when the spare directory is not on the records' filesystem (a rename could not move
        a spare)."""
        try:
            os.makedirs(self.spare_dir, mode=0o700, exist_ok=True)
            if os.stat(self.spare_dir).st_dev != os.stat(self.dir).st_dev:
                return []  # and _retire's renames fail: slots are unlinked, as without spares
            names = os.listdir(self.spare_dir)
        except OSError as exc:  # spares are an optimisation: without them, files are created
            log.warning("spare record files in %s unusable: %s", self.spare_dir, _why(exc))
            return []
        spares: list[str] = []
        for name in names:
            path = os.path.join(self.spare_dir, name)
            with contextlib.suppress(OSError):
                if len(spares) < MAX_SPARES and stat.S_ISREG(os.lstat(path).st_mode):
                    os.truncate(path, 0)
                    spares.append(path)
                elif os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        return spares

    def _take_spare(self, path: str) -> None:
        """Rename a spare slot file to `path` if one is left (else the write creates it)."""
        while self._spares:
            try:
                os.rename(self._spares.pop(), path)
                return
            except FileNotFoundError:
                continue
            except OSError:
                return

    def close(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._dir_fd = self._lock_fd = None

    def paths(self, sandbox_id: str) -> list[str]:
        """The slot files of a sandbox's record (either may not exist)."""
        return [os.path.join(self.dir, f"{sandbox_id}{slot}") for slot in self.SLOTS]

    async def load_all(
        self, check: RecordCheck | None = None
    ) -> tuple[list[SandboxRecord], list[SetAside]]:
        """Every usable record, and each one set aside (with a logged error): unreadable, or
        refused by `check` (which returns why, or None)."""
        return await anyio.to_thread.run_sync(self._load_all_sync, check)

    def _load_all_sync(
        self, check: RecordCheck | None = None
    ) -> tuple[list[SandboxRecord], list[SetAside]]:
        records: list[SandboxRecord] = []
        names = os.listdir(self.dir)
        set_aside = self._clear_strays(names)
        ids = sorted({name[: -len(self.SLOTS[0])] for name in names if name.endswith(self.SLOTS)})
        for sid in ids:
            try:
                if not SANDBOX_ID.fullmatch(sid):
                    raise ValueError("its file name is not a sandbox id")
                rec, seq = self._load_one(sid)
                refused = check(rec) if check is not None else None
                if refused is not None:
                    raise ValueError(refused)
            except RecordTooNew as exc:
                raise StateDirError(f"record {sid!r}: {exc}") from None
            except Exception as exc:  # whatever a record holds, start-up goes on
                problem = self._set_aside(sid, exc)
                log.error(problem)
                set_aside.append(SetAside(sid, problem))
                continue
            self._seq[sid] = seq
            records.append(rec)
        return records, set_aside

    def _clear_strays(self, names: list[str]) -> list[SetAside]:
        """Remove the temporary files of durable writes a crash interrupted (their slot
        stands) and set aside whatever else among `names` is not a slot file, each with a
        logged reason: no entry, whoever put it there, stops the start."""
        set_aside = []
        for name in names:
            if name.endswith(self.SLOTS):
                continue  # a record's slot: read, or set aside, with its record
            path = os.path.join(self.dir, name)
            try:
                if name.endswith(".tmp") and not stat.S_ISDIR(os.lstat(path).st_mode):
                    os.unlink(path)  # a symlink goes as a link, never followed
                    continue
                why = "a temporary name that is a directory" if name.endswith(".tmp") else (
                    "not a record's slot file")
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = f"a temporary file that cannot be removed ({_why(exc)})"
            problem = self._move_aside(name, why)
            log.error(problem)
            set_aside.append(SetAside(ascii(name)[1:-1], problem))
        return set_aside

    def _move_aside(self, name: str, why: str) -> str:
        """Move the entry `name` of the records' directory to the quarantine (under a new
        name if it holds one already); what was done, for the log."""
        shown = ascii(name)[1:-1]
        try:
            os.makedirs(self.quarantine, mode=0o700, exist_ok=True)
            dest = os.path.join(self.quarantine, name)
            for n in itertools.count(1):
                if not os.path.lexists(dest):
                    break
                dest = os.path.join(self.quarantine, f"{name}.{n}")
            os.rename(os.path.join(self.dir, name), dest)
        except OSError as move:
            return (f"unexpected entry {shown} in {self.dir} (cannot set it aside: "
                    f"{_why(move)}): {why}")
        return f"unexpected entry {shown} set aside in {self.quarantine}: {why}"

    def _load_one(self, sid: str) -> tuple[SandboxRecord, int]:
        """The newest intact slot of `sid` (ValueError naming the problem when none is)."""
        best: tuple[int, bytes] | None = None
        why = "no slot file"
        for path in self.paths(sid):
            try:
                seq, body = _unframe(_read_slot(path))
            except FileNotFoundError:
                continue
            except ValueError as exc:
                why = str(exc)
                continue
            if best is None or seq > best[0]:
                best = (seq, body)
        if best is None:
            raise ValueError(why)
        data = json.loads(best[1])
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if _depth(data) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        rec = SandboxRecord.model_validate(migrate(data))
        if rec.id != sid:
            raise ValueError(f"record id {rec.id!r} does not match its file name")
        return rec, best[0]

    def _set_aside(self, sid: str, exc: Exception) -> str:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RecursionError):
            first = "JSON nested too deeply to decode"
        # the name may be anything a file name can be: shown escaped, never raw to a terminal
        shown = ascii(sid)[1:-1]
        try:
            os.makedirs(self.quarantine, mode=0o700, exist_ok=True)
            for path in self.paths(sid):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, os.path.join(self.quarantine, os.path.basename(path)))
        except OSError as move:
            return f"corrupt record {shown} (cannot set it aside: {_why(move)}): {first}"
        return f"corrupt record {shown} set aside in {self.quarantine}: {first}"

    async def save(self, rec: SandboxRecord, *, durable: bool = False) -> None:
        """Replace the record of rec.id (see the module's doc); `durable` also survives a
        power loss. On failure (StateDirError) the previous record stands."""
        seq = self._seq.get(rec.id, -1) + 1
        path = self.paths(rec.id)[seq % 2]
        body = rec.model_dump_json().encode()
        if len(body) > MAX_RECORD_BYTES:  # never written: the next start would set it aside
            raise StateDirError(f"record of sandbox {rec.id} would take {len(body)} bytes, more "
                                f"than the {MAX_RECORD_BYTES} the store reads back")
        data = _frame(seq, body)
        try:
            if durable:
                # a spare (taken here, on the loop) is the temporary file if one is left
                spare = self._spares.pop() if self._spares else None
                tmp = spare or f"{path}.{os.getpid()}-{next(self._tmp_names)}.tmp"
                # One trip to aiofiles' thread pool for the whole write. Shielded: a cancelled
                # write would go on in that thread anyway.
                with anyio.CancelScope(shield=True):
                    try:
                        await _write_durably(tmp, path, data, self._dir_fd, spare is not None)
                    except OSError:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
            else:
                if seq <= 1:  # the slot is new (or holds no record worth keeping)
                    self._take_spare(path)
                _write_in_place(path, data)
        except OSError as exc:
            if seq <= 1:  # the slot was new: leave no file that holds no record
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise StateDirError(f"cannot write record {path}: {_why(exc)}") from None
        self._seq[rec.id] = seq

    async def delete(self, sandbox_id: str) -> None:
        """Forget a sandbox. Idempotent. Not fsynced: a record that a power loss brings back
        is recovered NotReady and removed again (every step of a removal is idempotent).
        Each slot is moved to the spares, then emptied; unlinked when they are full."""
        for path in self.paths(sandbox_id):
            if len(self._spares) < MAX_SPARES and self._retire(path):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EROFS and not os.path.lexists(path):
                    continue  # a read-only state dir says EROFS rather than ENOENT
                raise StateDirError(f"cannot delete record {path}: {_why(exc)}") from None
        self._seq.pop(sandbox_id, None)

    def _retire(self, path: str) -> bool:
        """Move a slot file to the spares (out of the records first, so a crash never leaves
        an emptied slot among them), then empty it. False when it could not be moved (it may
        not exist: then unlinking it says so)."""
        spare = os.path.join(self.spare_dir, f"{os.getpid()}-{next(self._tmp_names)}")
        try:
            os.rename(path, spare)
        except OSError:
            return False
        try:
            os.truncate(spare, 0)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(spare)
            return True
        self._spares.append(spare)
        return True


_MAGIC = b"podfsm-record"


def _read_slot(path: str) -> bytes:
    """A slot's content: a regular file, never through a symlink, at most MAX_RECORD_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{os.path.basename(path)} is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{os.path.basename(path)} is not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{os.path.basename(path)} is larger than {MAX_RECORD_BYTES} bytes")
        return f.read(MAX_RECORD_BYTES + 1)


def _depth(obj: Any) -> int:
    """How deeply `obj` (decoded JSON) nests; iterative, so any depth is measured safely."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _frame(seq: int, body: bytes) -> bytes:
    return b"%s %d %d %08x\n%s\n" % (_MAGIC, seq, len(body), zlib.crc32(body), body)


def _unframe(data: bytes) -> tuple[int, bytes]:
    """(sequence number, record JSON) of a slot's content; ValueError when it is torn."""
    header, sep, rest = data.partition(b"\n")
    parts = header.split()
    if not sep or len(parts) != 4 or parts[0] != _MAGIC:
        raise ValueError("not a podfsm record (bad header)")
    seq, length, crc = int(parts[1]), int(parts[2]), int(parts[3], 16)
    body = rest[:length]
    if len(body) != length or rest[length:] != b"\n" or zlib.crc32(body) != crc:
        raise ValueError("torn record (length or checksum mismatch)")
    return seq, body


def _write_in_place(path: str, data: bytes) -> None:
    """Overwrite the slot in place, truncated to the new length. A crash in the middle leaves
    a slot whose length or checksum does not match: the other slot stands."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _write_durably_sync(tmp: str, path: str, data: bytes, dir_fd: int | None,
                        spare: bool = False) -> None:
    """Temporary file, fsync, rename over the slot, fsync of the directory: after a crash of
    the machine the slot holds the old content or the new, never a mix. `spare`: `tmp` is a
    spare slot file (made anew if it has gone), else a new file."""
    exclusive = os.O_NOFOLLOW if spare else os.O_EXCL
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | exclusive, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if spare:
            os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if dir_fd is not None:
        os.fsync(dir_fd)


_write_durably = aiofiles.os.wrap(_write_durably_sync)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the state dir is full (no space left on the device)"
    if exc.errno == errno.EROFS:
        return "the state dir is read-only (read-only file system)"
    return exc.strerror or str(exc)
