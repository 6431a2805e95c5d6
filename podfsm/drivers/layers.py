"""The layer store: each image layer unpacked once, keyed by its chain id, into a directory
that serves as an overlay lower dir.

    <root>/<chain id hex>/fs          the layer's files (whiteouts in overlay's form)
    <root>/<chain id hex>/layer.json  chain id, parent, diff id, sizes (LayerInfo)
    <root>/.tmp-<hex>-<random>/       a layer being unpacked (removed by recover())
    <root>/.rm-<hex>-<random>/        a layer being removed (removed by recover())

A layer is unpacked into a temporary directory beside its final place, flushed to disk
(syncfs: one call for the whole tree), and renamed into place, so <root>/<hex> is either
absent or complete. The diff id (sha256 of the uncompressed tar) is hashed while the layer is
unpacked and must give the chain id asked for (a layer's chain id is its diff id; above a
parent it is sha256 of "<parent chain id> <diff id>"), so a blob that is not the layer the image
config names is refused and nothing of it is kept. Synchronous: callers run it in a worker
thread; recover() is for the start, before any ensure().
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from podfsm.core.errors import StepFailed, UnpackError
from podfsm.core.failpoints import Failpoint
from podfsm.drivers import linux, untar
from podfsm.drivers import tarstream as ts

log = logging.getLogger(__name__)

_CHAIN_ID = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
META = "layer.json"
FS = "fs"
TMP_PREFIX = ".tmp-"
RM_PREFIX = ".rm-"


@dataclass(frozen=True)
class LayerInfo:
    """What layer.json records of an unpacked layer."""

    chain_id: str
    parent: str | None
    diff_id: str  # sha256 of the uncompressed tar stream
    media_type: str
    tar_size: int  # bytes of the uncompressed tar stream
    entries: int  # tar entries laid down
    usage_bytes: int  # disk blocks the layer's files take (st_blocks * 512, each inode once)
    inodes: int
    path: str  # the directory to use as an overlay lower dir


def chain_id_for(parent_chain_id: str | None, diff_id: str) -> str:
    """The OCI chain id of a layer with this diff id above that parent chain."""
    if parent_chain_id is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain_id} {diff_id}".encode()).hexdigest()


def _hex(chain: str) -> str:
    m = _CHAIN_ID.match(chain)
    if m is None:
        raise ValueError(f"{chain!r} is not a chain id (sha256:<64 hex digits>)")
    return m[1]


def _usage(root_fd: int) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes of the tree under root_fd, each inode once."""
    seen: set[int] = set()
    blocks = 0
    st = os.fstat(root_fd)
    seen.add(st.st_ino)
    blocks += st.st_blocks
    for _top, dirs, files, dfd in os.fwalk(".", dir_fd=root_fd):
        for name in dirs + files:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                blocks += st.st_blocks
    return blocks * 512, len(seen)


def _rmtree(path: str) -> None:
    """Remove a tree of ours, whatever its modes (root removes read-only dirs alike)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


class LayerStore:
    """Unpacked layers under `root` (made 0700 if missing). `failpoints` (a parsed
    PODFSM_FAILPOINTS plan) may hold unpack_layer.before (fired once the temporary directory
    exists, before the first entry) and unpack_layer.after (fired once the layer is in
    place)."""

    def __init__(self, root: str, failpoints: Mapping[str, Failpoint] | None = None) -> None:
        self.root = root
        self._failpoints = failpoints or {}
        os.makedirs(root, mode=0o700, exist_ok=True)
        self._devices = untar.real_root()

    # -- the store -------------------------------------------------------------------------

    def recover(self) -> None:
        """Remove what a crash left: half-unpacked and half-removed layers, and any layer
        directory without its layer.json (never made by ensure(), which renames whole)."""
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.startswith((TMP_PREFIX, RM_PREFIX)):
                log.info("layer store: removing %s left by an interrupted unpack or removal",
                         name)
                _rmtree(path)
            elif _HEX.match(name) and not os.path.exists(os.path.join(path, META)):
                log.warning("layer store: removing %s, which has no %s", name, META)
                _rmtree(path)

    def path(self, chain: str) -> str:
        """The lower dir of layer `chain` (whether or not it is unpacked)."""
        return os.path.join(self.root, _hex(chain), FS)

    def info(self, chain: str) -> LayerInfo | None:
        """What is recorded of an unpacked layer; None if it is not unpacked."""
        try:
            with open(os.path.join(self.root, _hex(chain), META)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        return LayerInfo(**{**data, "path": self.path(chain)})

    def layers(self) -> list[str]:
        """The chain ids of the unpacked layers."""
        return sorted(f"sha256:{n}" for n in os.listdir(self.root) if _HEX.match(n))

    def ensure(self, chain_id: str, parent_chain_id: str | None, blob_path: str,
               media_type: str) -> str:
        """Unpack the layer blob at `blob_path` (its compression from `media_type`) as layer
        `chain_id` above `parent_chain_id`, unless it is unpacked already, and return its lower
        dir. UnpackError (naming the entry and why) for a blob that is not that layer or holds
        a hostile entry; nothing of it is left."""
        hexid = _hex(chain_id)
        if parent_chain_id is not None:
            _hex(parent_chain_id)
        final = os.path.join(self.root, hexid)
        if os.path.exists(os.path.join(final, META)):
            return os.path.join(final, FS)
        decompress = ts.decompressor(media_type)
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{hexid}-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o700)
        try:
            self._hit("unpack_layer.before")
            os.mkdir(os.path.join(tmp, FS), 0o755)
            root_fd = os.open(os.path.join(tmp, FS), untar.DIR_FLAGS)
            try:
                os.fchmod(root_fd, 0o755)  # whatever the umask; a `./` entry may change it
                with open(blob_path, "rb", buffering=0) as blob:
                    done = untar.extract(decompress(blob), root_fd, devices=self._devices)
                got = chain_id_for(parent_chain_id, done.diff_id)
                if got != chain_id:
                    raise UnpackError("", f"its uncompressed content hashes to {done.diff_id}, "
                                          f"which gives chain id {got}, not the {chain_id} "
                                          "of the config's diff_id")
                usage_bytes, inodes = _usage(root_fd)
                info = LayerInfo(chain_id=chain_id, parent=parent_chain_id,
                                 diff_id=done.diff_id, media_type=media_type,
                                 tar_size=done.tar_size, entries=done.entries,
                                 usage_bytes=usage_bytes, inodes=inodes,
                                 path=os.path.join(final, FS))
                meta = {k: v for k, v in asdict(info).items() if k != "path"}
                with open(os.path.join(tmp, META), "x") as f:
                    json.dump(meta, f)
                linux.syncfs(root_fd)
            finally:
                os.close(root_fd)
            try:
                os.rename(tmp, final)
            except OSError as exc:  # another ensure() of the same layer got there first
                if not os.path.exists(os.path.join(final, META)):
                    raise UnpackError("", f"cannot move the layer into place: {exc}") from None
                _rmtree(tmp)
            self._fsync_root()
        except UnpackError as exc:
            _rmtree(tmp)
            exc.layer = chain_id
            raise
        except BaseException:
            _rmtree(tmp)
            raise
        self._hit("unpack_layer.after")
        return os.path.join(final, FS)

    def remove(self, chain_id: str) -> None:
        """Remove an unpacked layer (nothing if it is not there). Renamed aside first, so a
        crash midway leaves no half layer under its own name."""
        final = os.path.join(self.root, _hex(chain_id))
        aside = os.path.join(self.root, f"{RM_PREFIX}{_hex(chain_id)}-{secrets.token_hex(4)}")
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return
        self._fsync_root()
        _rmtree(aside)

    def usage(self) -> tuple[int, int]:
        """Bytes and inodes the store takes: each layer's as recorded when it was unpacked,
        plus the store's own directories and files."""
        used_bytes, inodes = 0, 1
        for chain in self.layers():
            info = self.info(chain)
            if info is None:
                continue
            used_bytes += info.usage_bytes
            inodes += info.inodes
            st = os.stat(os.path.join(self.root, _hex(chain), META))
            used_bytes += st.st_blocks * 512
            inodes += 2  # <hex>/ and layer.json
        used_bytes += os.stat(self.root).st_blocks * 512
        return used_bytes, inodes

    # -- helpers ---------------------------------------------------------------------------

    def _fsync_root(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _hit(self, name: str) -> None:
        point = self._failpoints.get(name)
        if point is None or not point.take():
            return
        if point.kind == "crash":
            log.warning("failpoint %s: crashing", name)
            os.kill(os.getpid(), signal.SIGKILL)
        elif point.kind == "delay":
            time.sleep(point.delay_ms / 1000)
        else:
            raise StepFailed(name, "injected failure")

