"""The image store on disk: content-addressed blobs, image records and the layer directories.

    <image_dir>/blobs/sha256/<hex>      content, verified before it is renamed into place
    <image_dir>/ingest/<hex>.<rand>     downloads under way (removed at start: never used)
    <image_dir>/images/<id hex>.json    one record per image (core.images.ImageRecord)
    <image_dir>/layers/<chain hex>/     unpacked layers (drivers.layers.LayerStore)
    <image_dir>/images.lock             held by the controller that owns the directory

A blob is written to `ingest/` while its sha256 is taken, checked against its digest and size,
fsynced and renamed into `blobs/`, then the directory is fsynced: a blob under `blobs/` is
always whole and verified. A record is written the same way (temporary file, fsync, rename),
after every blob and layer it needs is in place, so a record never names missing content.
Recovery (`recover`) removes what a crash left: ingest files, temporary records, and every
blob and layer directory no record needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from podfsm.core.errors import DigestMismatch, StateDirError
from podfsm.core.imageref import is_digest
from podfsm.core.images import ImageRecord, needed, record_problem
from podfsm.drivers import linux

log = logging.getLogger(__name__)


def _hex(digest: str) -> str:
    if not is_digest(digest) or not digest.startswith("sha256:"):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return digest[len("sha256:"):]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ingest:
    """One blob being written: feed `write`, then `commit` (verifies, fsyncs, renames) or
    `abort`. `reset` starts over (another endpoint)."""

    def __init__(self, store: ImageStore, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self._store = store
        self.path = os.path.join(store.ingest_dir, f"{_hex(digest)}.{secrets.token_hex(4)}")
        self._fd = -1
        self.reset()

    def reset(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                               | os.O_NOFOLLOW, 0o600)
        else:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        self.written = 0
        self._sha = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.size:
            raise DigestMismatch(self.digest, f"more than the {self.size} bytes its "
                                              "descriptor gives")
        self._sha.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self) -> str:
        """Verify and move into the store; returns the blob's path."""
        if self.written != self.size:
            raise DigestMismatch(self.digest, f"{self.written} bytes, its descriptor says "
                                              f"{self.size}")
        got = "sha256:" + self._sha.hexdigest()
        if got != self.digest:
            raise DigestMismatch(self.digest, f"it hashes to {got}")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        dest = self._store.blob_path(self.digest)
        os.rename(self.path, dest)
        _fsync_dir(os.path.dirname(dest))
        return dest

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class ImageStore:
    """Blobs, records and layer directories under one directory (see the module's doc)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blob_dir = os.path.join(root, "blobs", "sha256")
        self.ingest_dir = os.path.join(root, "ingest")
        self.record_dir = os.path.join(root, "images")
        self.layer_dir = os.path.join(root, "layers")
        self._lock_fd = -1

    def open(self) -> None:
        """Create the directories (0700) and take the store's lock."""
        try:
            linux.secure_dir(self.root, 0o700, "image dir")
            for d in (os.path.dirname(self.blob_dir), self.blob_dir, self.ingest_dir,
                      self.record_dir, self.layer_dir):
                os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateDirError(f"image dir {self.root}: {exc}") from None
        self._lock_fd = linux.lock_dir(self.root, "images.lock", "image dir")

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # blobs

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blob_dir, _hex(digest))

    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return os.stat(self.blob_path(digest)).st_size == size
        except FileNotFoundError:
            return False

    def read_blob(self, digest: str) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    def ingest(self, digest: str, size: int) -> Ingest:
        return Ingest(self, digest, size)

    def put_blob(self, digest: str, data: bytes) -> None:
        """Store a small document already verified in memory."""
        w = self.ingest(digest, len(data))
        try:
            w.write(data)
            w.commit()
        except BaseException:
            w.abort()
            raise

    def remove_blobs(self, digests: set[str]) -> None:
        for d in digests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.blob_path(d))

    # records

    def save_image(self, rec: ImageRecord) -> None:
        path = os.path.join(self.record_dir, f"{_hex(rec.id)}.json")
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "x") as f:
                f.write(rec.model_dump_json())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            _fsync_dir(self.record_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateDirError(f"cannot write image record {path}: {exc}") from None

    def delete_image(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.record_dir, f"{_hex(image_id)}.json"))
        _fsync_dir(self.record_dir)

    def _load_records(self) -> dict[str, ImageRecord]:
        out: dict[str, ImageRecord] = {}
        for name in sorted(os.listdir(self.record_dir)):
            path = os.path.join(self.record_dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)  # a write a crash interrupted: the old record (if any) stands
                continue
            try:
                with open(path, "rb") as f:
                    rec = ImageRecord.model_validate_json(f.read())
                problem = record_problem(rec)
                if problem is None and name != f"{_hex(rec.id)}.json":
                    problem = "its file name is not its id"
                if problem is None:
                    missing = [b for b in rec.blobs if not os.path.exists(self.blob_path(b))]
                    if missing:
                        problem = f"blob(s) {', '.join(missing)} are missing"
            except (OSError, ValueError, ValidationError) as exc:
                problem = str(exc).splitlines()[0]
            if problem is not None:
                log.error("image record %s cannot be used (%s): removed; pull the image again",
                          path, problem)
                os.unlink(path)
                continue
            out[rec.id] = rec
        return out

    def recover(self, layer_names: list[str]) -> tuple[dict[str, ImageRecord], set[str]]:
        """Remove what a crash left and load the records. `layer_names` are the chain ids
        (hex) of the layer directories there are; returns the records and the chain ids of
        the layer directories no record needs (for the caller's layer store to remove)."""
        for name in os.listdir(self.ingest_dir):
            os.unlink(os.path.join(self.ingest_dir, name))
        images = self._load_records()
        blobs, layers = needed(images.values())
        for name in os.listdir(self.blob_dir):
            digest = f"sha256:{name}"
            if digest not in blobs:
                log.info("image store: removing blob %s that no image needs", digest)
                os.unlink(os.path.join(self.blob_dir, name))
        stale = {f"sha256:{n}" for n in layer_names} - layers
        return images, stale

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) of the store's directories, blobs, records and ingest files (the
        layers' contents are counted apart, by the layer store)."""
        total, inodes = 0, 0
        for d in (self.root, os.path.dirname(self.blob_dir), self.blob_dir, self.record_dir,
                  self.ingest_dir):
            for entry in _scan(d):
                st = entry.stat(follow_symlinks=False)
                total += st.st_blocks * 512
                inodes += 1
        return total, inodes

    def verbose_config(self, digest: str) -> Any:
        try:
            return json.loads(self.read_blob(digest))
        except (OSError, ValueError):
            return None


def _scan(path: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from it
    except FileNotFoundError:
        return


def check_document(digest: str, size: int | None, data: bytes) -> None:
    """DigestMismatch unless `data` is `size` bytes (when known) hashing to `digest`."""
    if size is not None and len(data) != size:
        raise DigestMismatch(digest, f"{len(data)} bytes, its descriptor says {size}")
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise DigestMismatch(digest, f"it hashes to {got}")



