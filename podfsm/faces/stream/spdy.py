"""SPDY/3.1 framing, both directions, without I/O: the wire format that Kubernetes' streaming
clients (client-go over moby/spdystream: crictl, kubectl, the kubelet) speak after an
`Upgrade: SPDY/3.1`.

A `Framer` belongs to one connection: it holds that connection's two zlib contexts (header
blocks are compressed with one stream per direction for the connection's whole life, primed
with the SPDY/3 dictionary and cut with a sync flush after each block). `feed()` takes bytes as
they arrive and returns the frames they complete; `encode()` turns a frame into bytes.

Frames: SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE and
DATA. spdystream never sends WINDOW_UPDATE or SETTINGS and ignores flow control, so a session
parses them and does nothing with them. Control frames of an unknown type are skipped, as the
spec asks. Header names are lowercase on the wire; a header's several values are joined by NUL.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
#: the largest payload a frame's 24-bit length can carry
MAX_LENGTH = (1 << 24) - 1
#: a decompressed header block larger than this is refused (kubernetes' are ~100 bytes)
MAX_HEADER_BLOCK = 64 * 1024
_CONTROL = 0x8000
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02


class FrameType(enum.IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SpdyError(ValueError):
    """Bytes that are not SPDY/3: the session ends with GOAWAY(PROTOCOL_ERROR)."""


def _dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed
    header names and common values, then a run of status lines, dates and media types."""
    names = [
        "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
        "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
        "authorization", "cache-control", "connection", "content-base", "content-encoding",
        "content-language", "content-length", "content-location", "content-md5",
        "content-range", "content-type", "date", "etag", "expect", "expires", "from",
        "host", "if-match", "if-modified-since", "if-none-match", "if-range",
        "if-unmodified-since", "last-modified", "location", "max-forwards", "pragma",
        "proxy-authenticate", "proxy-authorization", "range", "referer", "retry-after",
        "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary",
        "via", "warning", "www-authenticate", "method", "get", "status",
    ]
    names += ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive",
              "origin"]
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8"
        "charset=iso-8859-1,utf-,*,enq=0.")
    out = b"".join(struct.pack(">I", len(n)) + n.encode() for n in names)
    return out + tail.encode()


DICTIONARY = _dictionary()

Headers = dict[str, str]


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    fin: bool = False
    unidirectional: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    #: (flags, id, value) triples
    entries: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


Frame = (SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway
         | WindowUpdate | Data)


def encode_header_block(headers: Headers) -> bytes:
    """The uncompressed name/value block: a count, then length-prefixed lowercase names and
    values (several values of one name joined by NUL)."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        n, v = name.lower().encode(), value.encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """The headers of an uncompressed block; SpdyError if it is malformed or repeats a name."""
    try:
        (count,), pos = struct.unpack_from(">I", block), 4
        headers: Headers = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", block, pos)
            name = block[pos + 4:pos + 4 + n]
            pos += 4 + n
            (v,) = struct.unpack_from(">I", block, pos)
            value = block[pos + 4:pos + 4 + v]
            pos += 4 + v
            if len(name) != n or len(value) != v or not name:
                raise SpdyError("truncated header block")
            key = name.decode("latin-1")
            if key in headers:
                raise SpdyError(f"header {key!r} repeated in one block")
            headers[key.lower()] = value.decode("utf-8", "replace")
    except struct.error:
        raise SpdyError("truncated header block") from None
    if pos != len(block):
        raise SpdyError(f"{len(block) - pos} bytes after the header block's last pair")
    return headers


def first(headers: Headers, name: str) -> str:
    """The first value of header `name` ('' when absent); names match case-insensitively."""
    return headers.get(name.lower(), "").split("\0", 1)[0]


class Framer:
    """The SPDY/3 frames of one connection: `feed()` parses, `encode()` serialises."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 9,
                                         zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    # -- reading ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by `data` (the rest waits for more). SpdyError on bad bytes."""
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= 8:
            word, flags_length = struct.unpack_from(">II", self._buf)
            length = flags_length & MAX_LENGTH
            if len(self._buf) < 8 + length:
                break
            flags = flags_length >> 24
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            if word & 0x80000000:
                version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    raise SpdyError(f"SPDY version {version} (only 3 is spoken)")
                frame = self._control(ftype, flags, payload)
                if frame is not None:
                    frames.append(frame)
            else:
                if word == 0:
                    raise SpdyError("DATA frame on stream 0")
                frames.append(Data(word, payload, bool(flags & FLAG_FIN)))
        return frames

    def _control(self, ftype: int, flags: int, p: bytes) -> Frame | None:
        fin = bool(flags & FLAG_FIN)
        try:
            if ftype == FrameType.SYN_STREAM:
                sid, assoc, pri = struct.unpack_from(">IIB", p)
                return SynStream(self._sid(sid), self._headers(p[10:]), fin,
                                 bool(flags & FLAG_UNIDIRECTIONAL), assoc & 0x7FFFFFFF,
                                 pri >> 5)
            if ftype == FrameType.SYN_REPLY:
                (sid,) = struct.unpack_from(">I", p)
                return SynReply(self._sid(sid), self._headers(p[4:]), fin)
            if ftype == FrameType.HEADERS:
                (sid,) = struct.unpack_from(">I", p)
                return HeadersFrame(self._sid(sid), self._headers(p[4:]), fin)
            if ftype == FrameType.RST_STREAM:
                sid, status = struct.unpack(">II", p)
                return RstStream(self._sid(sid), status)
            if ftype == FrameType.SETTINGS:
                (count,) = struct.unpack_from(">I", p)
                if len(p) != 4 + 8 * count:
                    raise SpdyError(f"SETTINGS of {len(p)} bytes for {count} entries")
                pairs = struct.iter_unpack(">II", p[4:])
                return Settings(tuple((fid >> 24, fid & 0xFFFFFF, v) for fid, v in pairs))
            if ftype == FrameType.PING:
                (pid,) = struct.unpack(">I", p)
                return Ping(pid)
            if ftype == FrameType.GOAWAY:
                last, status = struct.unpack(">II", p)
                return GoAway(last & 0x7FFFFFFF, status)
            if ftype == FrameType.WINDOW_UPDATE:
                sid, delta = struct.unpack(">II", p)
                return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        except struct.error:
            raise SpdyError(f"{FrameType(ftype).name} frame of {len(p)} bytes") from None
        return None  # an unknown control frame is skipped (SPDY/3 section 2.2.1)

    @staticmethod
    def _sid(word: int) -> int:
        sid = word & 0x7FFFFFFF
        if sid == 0:
            raise SpdyError("stream id 0 in a stream frame")
        return sid

    def _headers(self, compressed: bytes) -> Headers:
        try:
            block = self._inflate.decompress(compressed, MAX_HEADER_BLOCK + 1)
        except zlib.error as exc:
            raise SpdyError(f"header block does not inflate: {exc}") from None
        if len(block) > MAX_HEADER_BLOCK or self._inflate.unconsumed_tail:
            raise SpdyError(f"header block over {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)

    # -- writing ---------------------------------------------------------------------------

    def encode(self, frame: Frame) -> bytes:
        """The bytes of `frame` (header blocks go through this connection's compressor, so
        frames must be written in the order they are encoded)."""
        if isinstance(frame, Data):
            if not 0 < frame.stream_id <= 0x7FFFFFFF or len(frame.data) > MAX_LENGTH:
                raise ValueError(f"bad DATA frame: stream {frame.stream_id}, "
                                 f"{len(frame.data)} bytes")
            return struct.pack(">II", frame.stream_id,
                               (FLAG_FIN if frame.fin else 0) << 24 | len(frame.data)) + frame.data
        if isinstance(frame, SynStream):
            flags = (FLAG_FIN if frame.fin else 0) | (
                FLAG_UNIDIRECTIONAL if frame.unidirectional else 0)
            body = struct.pack(">IIBB", frame.stream_id, frame.associated_id,
                               (frame.priority & 7) << 5, 0) + self._compress(frame.headers)
            return self._control_frame(FrameType.SYN_STREAM, flags, body)
        if isinstance(frame, SynReply | HeadersFrame):
            ftype = FrameType.SYN_REPLY if isinstance(frame, SynReply) else FrameType.HEADERS
            body = struct.pack(">I", frame.stream_id) + self._compress(frame.headers)
            return self._control_frame(ftype, FLAG_FIN if frame.fin else 0, body)
        if isinstance(frame, RstStream):
            return self._control_frame(FrameType.RST_STREAM, 0,
                                       struct.pack(">II", frame.stream_id, frame.status))
        if isinstance(frame, Settings):
            body = struct.pack(">I", len(frame.entries)) + b"".join(
                struct.pack(">II", f << 24 | i, v) for f, i, v in frame.entries)
            return self._control_frame(FrameType.SETTINGS, 0, body)
        if isinstance(frame, Ping):
            return self._control_frame(FrameType.PING, 0, struct.pack(">I", frame.ping_id))
        if isinstance(frame, GoAway):
            return self._control_frame(FrameType.GOAWAY, 0,
                                       struct.pack(">II", frame.last_good_id, frame.status))
        return self._control_frame(FrameType.WINDOW_UPDATE, 0,
                                   struct.pack(">II", frame.stream_id, frame.delta))

    def _compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    @staticmethod
    def _control_frame(ftype: FrameType, flags: int, body: bytes) -> bytes:
        return struct.pack(">HHI", _CONTROL | VERSION, ftype, flags << 24 | len(body)) + body
