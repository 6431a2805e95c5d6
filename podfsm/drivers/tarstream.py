"""An image layer read as a stream of tar entries: the blob decompressed (gzip, zstd or none, by
its media type), the diff id (sha256 of the uncompressed stream) hashed on the way, and the tar
headers (ustar, GNU long names, PAX) parsed out of one large buffer.

Nothing here touches the file system but the blob it reads; the extractor (untar.py) decides
what each entry becomes. `tarfile` is not used to read: its stream reader re-slices its whole
buffer on every read (quadratic with the large buffers that make extraction fast) and its
header decoder took more time than laying the entry down. Decompression and
hashing run in a thread of their own (zlib, zstd and sha256 release the GIL), as GNU tar runs
gzip in a process of its own.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import tarfile
import threading
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
_EXTENDED = (*_PAX, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
#: the most an extended header (PAX records, a GNU long name) may hold: names and xattrs of
#: real layers take a few KiB; a hostile header must not make the reader buffer gigabytes
MAX_EXTENDED = 1 << 20
#: ids are 32-bit, (uid_t)-1 meaning "unchanged" to chown: refused; sizes as tar's 64-bit
_MAX_ID = (1 << 32) - 1
_MAX_SIZE = 1 << 63
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


def _hashed(chunks: Iterator[bytes], digest: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


_DONE = object()


class Prefetch:
    """The chunks of `chunks` made ahead in a thread, a few at a time; close() stops it."""

    def __init__(self, chunks: Iterator[bytes], depth: int = 4) -> None:
        self._queue: queue.Queue[object] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True,
                                        name="layer-decompress")
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        item = self._queue.get()
        if item is _DONE or isinstance(item, BaseException):
            self._queue.put(_DONE)  # later calls end
            if item is _DONE:
                raise StopIteration
            raise item  # type: ignore[misc]
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class TarReader:
    """The uncompressed stream, hashed (diff id) as it is made, with exact reads, skips and
    copies to a file descriptor straight out of the buffer. close() when done."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._hash = hashlib.sha256()
        self._chunks = Prefetch(_hashed(chunks, self._hash))
        self._buf: bytes = b""
        self._pos = 0
        self.offset = 0  # bytes consumed
        self.total = 0  # bytes read from the decompressor

    def close(self) -> None:
        self._chunks.close()

    def _more(self) -> bool:
        chunk = next(self._chunks, b"")
        if not chunk:
            return False
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


#: the ustar header: name mode uid gid size mtime chksum type linkname magic+version uname
#: gname devmajor devminor prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s")
_POSIX_MAGIC = b"ustar\x0000"


def _num(field: bytes) -> int:
    """A numeric header field: octal digits, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        return int(tarfile.nti(field))  # type: ignore[attr-defined]
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _str(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


Header = tuple[str, bytes, int, int, int, int, int, str, int, int]


def _header(block: bytes, where: int) -> Header:
    """name, type, mode, uid, gid, size, mtime, linkname, devmajor, devminor of a header."""
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, _uname, _gname,
     devmajor, devminor, prefix) = _HEADER.unpack_from(block)
    try:
        want = _num(chksum)
        # the header's byte sum with its checksum field read as spaces
        got = sum(block) - sum(chksum) + 8 * 32
        if want != got:  # some old writers summed signed bytes
            high = sum(1 for i, b in enumerate(block) if b > 127 and not 148 <= i < 156)
            if want != got - 256 * high:
                raise ValueError(f"bad checksum {want}, the header sums to {got}")
        text = _str(name)
        if magic == _POSIX_MAGIC and prefix[0]:
            text = _str(prefix) + "/" + text
        if kind == tarfile.AREGTYPE and text.endswith("/"):
            kind = tarfile.DIRTYPE  # an old tar's directory
        device = kind in (CHARDEV, BLOCKDEV)
        return (text, kind, _num(mode), _num(uid), _num(gid), _num(size), _num(mtime),
                _str(linkname), _num(devmajor) if device else 0,
                _num(devminor) if device else 0)
    except ValueError as exc:
        raise UnpackError("", f"not a tar header at byte {where}: {exc}") from None


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
        (hname, kind, mode, uid, gid, size, mtime, hlink, devmajor, devminor
         ) = _header(block, where)
        padded = -(-size // BLOCK) * BLOCK
        if kind in _EXTENDED and size > MAX_EXTENDED:
            raise UnpackError(longname or hname, f"an extended header of {size} bytes at byte "
                                                 f"{where} (at most {MAX_EXTENDED})")
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
            # ignored, as containerd ignores them (git archive writes its commit id in one)
            _parse_pax(reader.read(padded)[:size], where)
            continue
        ext = pax
        name = _text(ext["path"]) if "path" in ext else longname or hname
        if any(k.startswith("GNU.sparse.") for k in ext) or kind == tarfile.GNUTYPE_SPARSE:
            raise UnpackError(name, "a sparse file (GNU sparse entries are not supported)")
        try:
            mtime_ns = _ns(ext["mtime"]) if "mtime" in ext else mtime * 1_000_000_000
            if "size" in ext:
                size = int(ext["size"])
            if "uid" in ext:
                uid = int(ext["uid"])
            if "gid" in ext:
                gid = int(ext["gid"])
            atime_ns = _ns(ext["atime"]) if "atime" in ext else mtime_ns
        except ValueError:
            raise UnpackError(name, f"a malformed number in the PAX header at byte {where}"
                              ) from None
        for what, number in (("size", size), ("uid", uid), ("gid", gid)):
            if number < 0 or number >= (_MAX_SIZE if what == "size" else _MAX_ID):
                raise UnpackError(name, f"a {what} of {number}")
        if kind in _HEADER_ONLY:
            size = 0  # whatever the size field says, as Go's archive/tar reads it
        padded = -(-size // BLOCK) * BLOCK
        entry = Entry(
            name=name, type=kind, mode=mode & 0o7777, uid=uid, gid=gid,
            mtime_ns=mtime_ns, atime_ns=atime_ns, size=size,
            linkname=_text(ext["linkpath"]) if "linkpath" in ext else longlink or hlink,
            devmajor=devmajor, devminor=devminor,
        )
        for key, value in ext.items():
            if key.startswith("SCHILY.xattr."):
                entry.xattrs[key[len("SCHILY.xattr."):]] = value
        longname = longlink = None
        pax = {}
        start = reader.offset
        yield entry
        reader.skip(start + padded - reader.offset)
