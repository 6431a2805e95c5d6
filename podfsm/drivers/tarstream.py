"""An image layer read as a stream of tar entries: the blob decompressed (gzip, zstd or none, by
its media type), the diff id (sha256 of the uncompressed stream) hashed on the way, and the tar
headers (ustar, GNU long names, PAX) parsed out of one large buffer.

Nothing here touches the file system but the blob it reads; the extractor (untar.py) decides
what each entry becomes. `tarfile` is used only to decode a 512-byte header
(`TarInfo.frombuf`): its stream reader re-slices its whole buffer on every read, which is
quadratic with the large buffers that make extraction fast.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from podfsm.core.errors import UnpackError

#: compressed bytes read from the blob at a time, and the most one decompression step yields
#: (a bound, so a small gzip bomb is inflated piecewise instead of at once)
CHUNK = 1 << 20
MAX_OUT = 4 << 20
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)

#: OCI and Docker layer media types -> their compression
COMPRESSION: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

# tar entry types, as bytes (tarfile's constants)
REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
HARDLINK = tarfile.LNKTYPE
SYMLINK = tarfile.SYMTYPE
CHARDEV = tarfile.CHRTYPE
BLOCKDEV = tarfile.BLKTYPE
DIRECTORY = tarfile.DIRTYPE
FIFO = tarfile.FIFOTYPE
_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_HEADER_ONLY = (HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO)


@dataclass(slots=True)
class Entry:
    """One member of the archive, its extended headers applied. `name` and `linkname` are as
    the archive spells them (decoded as UTF-8, undecodable bytes kept by surrogateescape)."""

    name: str
    type: bytes
    mode: int  # permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    size: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _gunzip(blob: BinaryIO) -> Iterator[bytes]:
    """The decompressed data of a gzip stream (all its members) in pieces of at most MAX_OUT."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = b""
    while True:
        if d.eof:
            pending = d.unused_data or blob.read(CHUNK)
            if not pending:
                return
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a further gzip member
        elif d.unconsumed_tail:
            pending = d.unconsumed_tail
        else:
            pending = blob.read(CHUNK)
            if not pending:
                raise UnpackError("", "the gzip stream is truncated")
        try:
            out = d.decompress(pending, MAX_OUT)
        except zlib.error as exc:
            raise UnpackError("", f"the gzip stream is corrupt: {exc}") from None
        if out:
            yield out


def _unzstd(blob: BinaryIO) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency of podfsm
        raise UnpackError("", "zstd layers need the Python package zstandard") from None
    reader = zstandard.ZstdDecompressor().stream_reader(
        blob, read_size=CHUNK, read_across_frames=True)
    while True:
        try:
            out = reader.read(MAX_OUT)
        except zstandard.ZstdError as exc:
            raise UnpackError("", f"the zstd stream is corrupt: {exc}") from None
        if not out:
            return
        yield out


def _plain(blob: BinaryIO) -> Iterator[bytes]:
    while out := blob.read(CHUNK):
        yield out


def decompressor(media_type: str) -> Callable[[BinaryIO], Iterator[bytes]]:
    """The decompression for a layer media type; UnpackError for one that is not a layer."""
    kind = COMPRESSION.get(media_type)
    if kind is None:
        raise UnpackError("", f"{media_type!r} is not a layer media type podfsm can unpack "
                              f"(known: {', '.join(sorted(COMPRESSION))})")
    return {"gzip": _gunzip, "zstd": _unzstd, "none": _plain}[kind]


class TarReader:
    """The uncompressed stream, hashed as it is read, with exact reads, skips and copies to a
    file descriptor straight out of the buffer."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf: bytes = b""
        self._pos = 0
        self._hash = hashlib.sha256()
        self.offset = 0  # bytes consumed
        self.total = 0  # bytes read from the decompressor

    def _more(self) -> bool:
        chunk = next(self._chunks, b"")
        if not chunk:
            return False
        self._hash.update(chunk)
        self.total += len(chunk)
        rest = self._buf[self._pos:]  # a header's worth at most, mostly nothing
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    def read(self, n: int) -> bytes:
        """Exactly n bytes; UnpackError when the stream ends first."""
        while len(self._buf) - self._pos < n:
            if not self._more():
                raise UnpackError("", f"the tar stream ends early (at byte {self.offset})")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def at_end(self) -> bool:
        return len(self._buf) == self._pos and not self._more()

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._more():
                    raise UnpackError("", f"the tar stream ends early (at byte {self.offset})")
                continue
            take = min(avail, n)
            self._pos += take
            self.offset += take
            n -= take

    def copy(self, n: int, fd: int) -> None:
        """Write the next n bytes of the stream to fd."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._more():
                    raise UnpackError("", f"the tar stream ends early (at byte {self.offset})")
                continue
            take = min(avail, n)
            view = memoryview(self._buf)[self._pos:self._pos + take]
            while view:
                view = view[os.write(fd, view):]
            self._pos += take
            self.offset += take
            n -= take

    def finish(self) -> str:
        """Read to the end (the blocks after the end-of-archive marker are part of the diff
        id) and return the diff id."""
        self._pos = len(self._buf)
        while self._more():
            self._pos = len(self._buf)
        return "sha256:" + self._hash.hexdigest()


def _parse_pax(data: bytes, where: int) -> dict[str, bytes]:
    """PAX extended header records (`<len> <key>=<value>\\n`); values stay bytes (xattrs are
    binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            length = 0
        record = data[sp + 1:pos + length]
        if sp < 0 or length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise UnpackError("", f"a malformed PAX extended header at byte {where}")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


def _ns(value: bytes) -> int:
    """A PAX time (`1700000000.123456789`, maybe negative) in nanoseconds."""
    text = value.decode("ascii", "replace")
    neg = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    return -ns if neg else ns


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def entries(reader: TarReader) -> Iterator[Entry]:
    """The archive's entries in order. The consumer reads (copy/skip) at most `size` bytes of
    an entry's data before asking for the next one; the rest and the padding are skipped."""
    pax_global: dict[str, bytes] = {}
    longname: str | None = None
    longlink: str | None = None
    pax: dict[str, bytes] = {}
    while True:
        where = reader.offset
        if reader.at_end():
            return  # no end-of-archive marker: accepted, as Go's archive/tar does
        block = reader.read(BLOCK)
        if block == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise UnpackError("", f"not a tar header at byte {where}: {exc}") from None
        size = info.size
        padded = -(-size // BLOCK) * BLOCK
        kind = info.type
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            text = _text(reader.read(padded)[:size].split(b"\0", 1)[0])
            if kind == tarfile.GNUTYPE_LONGNAME:
                longname = text
            else:
                longlink = text
            continue
        if kind in _PAX:
            pax.update(_parse_pax(reader.read(padded)[:size], where))
            continue
        if kind == tarfile.XGLTYPE:
            pax_global.update(_parse_pax(reader.read(padded)[:size], where))
            continue
        ext = {**pax_global, **pax} if pax_global else pax
        name = _text(ext["path"]) if "path" in ext else longname or info.name
        if any(k.startswith("GNU.sparse.") for k in ext) or kind == tarfile.GNUTYPE_SPARSE:
            raise UnpackError(name, "a sparse file (GNU sparse entries are not supported)")
        mtime_ns = _ns(ext["mtime"]) if "mtime" in ext else int(info.mtime) * 1_000_000_000
        if "size" in ext:
            size = int(ext["size"])
        if kind in _HEADER_ONLY:
            size = 0  # whatever the size field says, as Go's archive/tar reads it
        padded = -(-size // BLOCK) * BLOCK
        entry = Entry(
            name=name, type=kind, mode=info.mode & 0o7777,
            uid=int(ext["uid"]) if "uid" in ext else info.uid,
            gid=int(ext["gid"]) if "gid" in ext else info.gid,
            mtime_ns=mtime_ns,
            atime_ns=_ns(ext["atime"]) if "atime" in ext else mtime_ns,
            size=size,
            linkname=_text(ext["linkpath"]) if "linkpath" in ext else longlink or info.linkname,
            devmajor=info.devmajor, devminor=info.devminor,
        )
        for key, value in ext.items():
            if key.startswith("SCHILY.xattr."):
                entry.xattrs[key[len("SCHILY.xattr."):]] = value
        longname = longlink = None
        pax = {}
        start = reader.offset
        yield entry
        reader.skip(start + padded - reader.offset)
