"""Building image layers in tests: tar entries made with tarfile (writing only), the archive
compressed as a registry would serve it, and its diff id and chain id."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass

from podfsm.drivers.layers import chain_id_for

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def _info(name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    return ti


@dataclass
class Item:
    info: tarfile.TarInfo
    data: bytes = b""


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
         mtime: int = 1_600_000_000, xattrs: dict[str, bytes] | None = None) -> Item:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
    ti.size = len(data)
    for key, value in (xattrs or {}).items():
        ti.pax_headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    return Item(ti, data)


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0,
              mtime: int = 1_600_000_000) -> Item:
    return Item(_info(name, tarfile.DIRTYPE, mode, uid, gid, mtime))


def symlink(name: str, target: str, uid: int = 0, gid: int = 0) -> Item:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, gid, 1_600_000_000)
    ti.linkname = target
    return Item(ti)


def hardlink(name: str, target: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Item:
    ti = _info(name, tarfile.LNKTYPE, mode, uid, gid, 1_600_000_000)
    ti.linkname = target
    return Item(ti)


def fifo(name: str, mode: int = 0o640) -> Item:
    return Item(_info(name, tarfile.FIFOTYPE, mode, 0, 0, 1_600_000_000))


def chardev(name: str, major: int, minor: int, mode: int = 0o666) -> Item:
    ti = _info(name, tarfile.CHRTYPE, mode, 0, 0, 1_600_000_000)
    ti.devmajor, ti.devminor = major, minor
    return Item(ti)


def tar_bytes(items: list[Item]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for item in items:
            tf.addfile(item.info, io.BytesIO(item.data) if item.info.isreg() else None)
    return buf.getvalue()


@dataclass
class Layer:
    blob: str
    media_type: str
    diff_id: str
    chain_id: str
    parent: str | None


def write_layer(directory_: str, items: list[Item] | bytes, parent: str | None = None,
                media_type: str = GZIP) -> Layer:
    """The layer's blob written under `directory_`, compressed per `media_type`."""
    raw = items if isinstance(items, bytes) else tar_bytes(items)
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    if media_type in (GZIP, DOCKER_GZIP):
        blob = gzip.compress(raw, compresslevel=1, mtime=0)
    elif media_type == ZSTD:
        import zstandard
        blob = zstandard.ZstdCompressor().compress(raw)
    else:
        blob = raw
    path = os.path.join(directory_, "blob-" + hashlib.sha256(blob).hexdigest()[:16])
    with open(path, "wb") as f:
        f.write(blob)
    return Layer(path, media_type, diff_id, chain_id_for(parent, diff_id), parent)
