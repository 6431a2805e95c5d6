"""A SPDY/3.1 server session over a byte pipe: the streams a client opens, each readable and
writable with backpressure both ways.

Clients (spdystream) open every stream (SYN_STREAM, odd ids); `accept()` hands them over and the
handler answers with `stream.reply()` (SYN_REPLY) or `stream.reset()`. PINGs are answered, GOAWAY
ends the session, SETTINGS and WINDOW_UPDATE are read and ignored (spdystream does no flow
control: neither does this end).

Backpressure: a frame is written only after the pipe has drained below its high-water mark, so a
slow client holds at most one frame per writer in podfsm. Inbound, each stream buffers at most
`STREAM_BUFFER` bytes; past that the session stops reading the connection until the stream's
reader catches up (SPDY without flow control has no per-stream window, so the whole connection
waits, as TCP would).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Protocol

from podfsm.faces.stream import spdy

log = logging.getLogger(__name__)

#: bytes a stream may hold unread before the session stops reading its connection
STREAM_BUFFER = 1 << 20
#: the largest DATA frame this end writes (spdystream writes 32 KiB ones, io.Copy's buffer)
MAX_WRITE = 32 * 1024


class Pipe(Protocol):
    """The bytes under a session: a TCP connection, or a WebSocket tunnel."""

    async def recv(self) -> bytes:
        """Some bytes; b'' at the end."""

    async def send(self, data: bytes) -> None:
        """Write `data`, waiting while the pipe is above its high-water mark."""

    def close(self) -> None:
        """Drop the connection."""


class StreamReset(ConnectionError):
    """The stream was reset (RST_STREAM) or the session ended under it."""


class SpdyStream:
    """One stream a client opened: its headers, what it sent, and a way to answer."""

    def __init__(self, session: SpdySession, stream_id: int, headers: spdy.Headers,
                 fin: bool) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self._inbox: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self._remote_closed = fin
        self._local_closed = False
        self.reset_by_peer = False
        self._changed = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()

    def header(self, name: str) -> str:
        return spdy.first(self.headers, name)

    # -- called by the session -------------------------------------------------------------

    def _deliver(self, data: bytes, fin: bool) -> None:
        if data:
            self._inbox.append(data)
            self.buffered += len(data)
            if self.buffered > STREAM_BUFFER:
                self.drained.clear()
        self._remote_closed = self._remote_closed or fin
        self._changed.set()

    def _reset(self) -> None:
        self.reset_by_peer = True
        self._remote_closed = self._local_closed = True
        self._inbox.clear()
        self.buffered = 0
        self.drained.set()
        self._changed.set()

    # -- for handlers ----------------------------------------------------------------------

    async def read(self) -> bytes:
        """The next bytes the client sent; b'' once it half-closed. StreamReset if reset."""
        while not self._inbox:
            if self.reset_by_peer:
                raise StreamReset(f"stream {self.id} reset")
            if self._remote_closed:
                return b""
            self._changed.clear()
            await self._changed.wait()
        data = self._inbox.popleft()
        self.buffered -= len(data)
        if self.buffered <= STREAM_BUFFER:
            self.drained.set()
        return data

    async def reply(self) -> None:
        await self.session.send_frame(spdy.SynReply(self.id, {}))

    async def write(self, data: bytes) -> None:
        """Send `data` as DATA frames, each after the pipe has drained. StreamReset if the
        stream was reset or is closed already."""
        for i in range(0, len(data), MAX_WRITE):
            if self._local_closed:
                raise StreamReset(f"stream {self.id} is closed")
            await self.session.send_frame(spdy.Data(self.id, data[i:i + MAX_WRITE]))

    async def close(self) -> None:
        """Half-close: an empty DATA frame with FIN (once)."""
        if not self._local_closed:
            self._local_closed = True
            with contextlib.suppress(ConnectionError):
                await self.session.send_frame(spdy.Data(self.id, b"", fin=True))

    async def reset(self, status: int = spdy.RstStatus.CANCEL) -> None:
        if not self._local_closed or not self._remote_closed:
            self._local_closed = self._remote_closed = True
            with contextlib.suppress(ConnectionError):
                await self.session.send_frame(spdy.RstStream(self.id, status))
        self.session.forget(self)


class SpdySession:
    """The frames of one upgraded connection. `run()` reads until the client goes, handing
    new streams to `accept()`; `close()` says GOAWAY and drops the connection."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.framer = spdy.Framer()
        self.streams: dict[int, SpdyStream] = {}
        self._new: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_id = 0
        self.closed = asyncio.Event()
        self._send_lock = asyncio.Lock()

    async def send_frame(self, frame: spdy.Frame) -> None:
        if self.closed.is_set():
            raise StreamReset("the connection is closed")
        # encode and write under one lock: header blocks share one compressor, whose output
        # must reach the wire in the order it was made
        async with self._send_lock:
            await self.pipe.send(self.framer.encode(frame))

    async def accept(self) -> SpdyStream | None:
        """The next stream the client opens; None once the session has ended."""
        if self.closed.is_set() and self._new.empty():
            return None
        return await self._new.get()

    def forget(self, stream: SpdyStream) -> None:
        self.streams.pop(stream.id, None)

    async def run(self) -> None:
        """Read frames until the client closes, breaks the protocol or sends GOAWAY."""
        try:
            while True:
                data = await self.pipe.recv()
                if not data:
                    return
                for frame in self.framer.feed(data):
                    if not await self._handle(frame):
                        return
        except spdy.SpdyError as exc:
            log.info("SPDY session: %s", exc)
            with contextlib.suppress(ConnectionError, StreamReset):
                await self.send_frame(spdy.GoAway(self._last_id, spdy.GoAwayStatus.PROTOCOL_ERROR))
        except ConnectionError:
            return
        finally:
            self._end()

    async def _handle(self, frame: spdy.Frame) -> bool:
        if isinstance(frame, spdy.Data):
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                if frame.stream_id > self._last_id:  # never opened (a late FIN is dropped)
                    await self.send_frame(spdy.RstStream(frame.stream_id,
                                                         spdy.RstStatus.INVALID_STREAM))
                return True
            stream._deliver(frame.data, frame.fin)
            await stream.drained.wait()  # a reader that lags holds the connection, not memory
        elif isinstance(frame, spdy.SynStream):
            if frame.stream_id <= self._last_id or frame.stream_id % 2 == 0:
                raise spdy.SpdyError(f"stream id {frame.stream_id} after {self._last_id} or "
                                     "even (a client opens odd ids, increasing)")
            self._last_id = frame.stream_id
            stream = SpdyStream(self, frame.stream_id, frame.headers, frame.fin)
            self.streams[frame.stream_id] = stream
            self._new.put_nowait(stream)
        elif isinstance(frame, spdy.RstStream):
            stream = self.streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._reset()
        elif isinstance(frame, spdy.Ping):
            await self.send_frame(frame)
        elif isinstance(frame, spdy.GoAway):
            return False
        elif isinstance(frame, spdy.HeadersFrame) and frame.fin:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream._deliver(b"", True)
        return True  # SETTINGS, WINDOW_UPDATE, SYN_REPLY (a client's): nothing to do

    def _end(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self.streams.values()):
            stream._reset()
        self.streams.clear()
        self._new.put_nowait(None)

    async def close(self) -> None:
        """GOAWAY, then drop the connection (idempotent)."""
        if not self.closed.is_set():
            with contextlib.suppress(ConnectionError, StreamReset):
                await asyncio.wait_for(self.send_frame(spdy.GoAway(self._last_id)), 1.0)
        self._end()
        self.pipe.close()
