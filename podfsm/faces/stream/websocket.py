"""WebSocket transports (wsproto): the channel protocols of exec and attach
(`v5.channel.k8s.io`, `v4.channel.k8s.io`: each binary message starts with its channel's
number, 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds [255, n], "channel n is
closed", which is how a client ends stdin) and the SPDY tunnel of port-forward
(`SPDY/3.1+portforward.k8s.io`: the binary messages carry a SPDY session's bytes).

A message is at most MAX_MESSAGE bytes (a larger one closes the connection, 1009), so a client
cannot make podfsm hold more than that per connection; writes wait for the socket to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from podfsm.faces.stream import remotecommand
from podfsm.faces.stream.remotecommand import ResizeDecoder

log = logging.getLogger(__name__)

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
#: exec/attach subprotocols over WebSocket, preferred first
CHANNEL_PROTOCOLS = (V5, V4)
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
MAX_MESSAGE = 1 << 20
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


class WebSocket:
    """One server-side WebSocket on an asyncio stream, from its HTTP request on."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.SERVER)
        self._parts: list[bytes] = []
        self._size = 0
        self.closed = asyncio.Event()

    async def accept(self, head: bytes, offered: list[str], supported: tuple[str, ...]) -> str:
        """Answer the upgrade whose request head is `head` with the first protocol of
        `offered` (the client's order) that is `supported`; ValueError (after a 400) when
        none is."""
        self.ws.receive_data(head)
        request = next((e for e in self.ws.events() if isinstance(e, Request)), None)
        chosen = next((p for p in offered if p in supported), None)
        if request is None or chosen is None:
            body = (f"no supported WebSocket subprotocol: offered {offered}, this server "
                    f"speaks {list(supported)}").encode()
            if request is not None:
                await self._send(self.ws.send(RejectConnection(
                    status_code=400, headers=[(b"content-length", str(len(body)).encode())],
                    has_body=True)) + self.ws.send(RejectData(data=body)))
            raise ValueError(body.decode())
        await self._send(self.ws.send(AcceptConnection(subprotocol=chosen)))
        return chosen

    async def _send(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ConnectionResetError("the WebSocket is closed")
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        await self._send(self.ws.send(Message(data=data)))

    async def recv_message(self) -> bytes | None:
        """The next whole binary message (a text one as its UTF-8); None once closed."""
        while not self.closed.is_set():
            for event in self.ws.events():
                if isinstance(event, BytesMessage | TextMessage):
                    part = (event.data.encode() if isinstance(event.data, str)
                            else bytes(event.data))
                    self._parts.append(part)
                    self._size += len(part)
                    if self._size > MAX_MESSAGE:
                        await self._close(1009, "message too big")
                        return None
                    if event.message_finished:
                        msg = b"".join(self._parts)
                        self._parts, self._size = [], 0
                        return msg
                elif isinstance(event, Ping):
                    await self._send(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        await self._send(self.ws.send(event.response()))
                    self._end()
                    return None
            data = await self.reader.read(64 * 1024)
            if not data:
                self._end()
                return None
            self.ws.receive_data(data)
        return None

    async def _close(self, code: int, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            await self._send(self.ws.send(CloseConnection(code=code, reason=reason)))
        self._end()

    async def close(self) -> None:
        await self._close(1000)

    def _end(self) -> None:
        self.closed.set()
        self.writer.close()


class TunnelPipe:
    """The bytes of a SPDY session carried in a WebSocket's binary messages (a session.Pipe)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def recv(self) -> bytes:
        return await self.ws.recv_message() or b""

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    def close(self) -> None:
        self.ws._end()


class WsChannels:
    """remotecommand.Channels on channel-numbered WebSocket messages. One reader task sorts
    incoming messages: stdin and resize each queue at most `QUEUE` messages before the
    reader waits (and so stops reading the socket)."""

    QUEUE = 16

    def __init__(self, ws: WebSocket, protocol: str, *, stdin: bool, tty: bool) -> None:
        self.ws = ws
        self.protocol = protocol
        self.stdin = stdin
        self.resize = tty
        # unbounded, but the reader waits while one holds QUEUE: room is left for the end
        self._stdin: asyncio.Queue[bytes] = asyncio.Queue()
        self._resize: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        self._room = asyncio.Event()
        self._decoder = ResizeDecoder()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while (msg := await self.ws.recv_message()) is not None:
                if not msg:
                    continue
                channel, data = msg[0], msg[1:]
                if channel == STDIN and self.stdin and data:
                    await self._put(self._stdin, data)
                elif channel == RESIZE and self.resize:
                    try:
                        for size in self._decoder.feed(data):
                            await self._put(self._resize, size)
                    except ValueError as exc:
                        log.info("exec/attach over WebSocket: %s", exc)
                elif channel == CLOSE and data[:1] == bytes([STDIN]) and self.protocol == V5:
                    self._stdin.put_nowait(b"")
        finally:
            self._stdin.put_nowait(b"")
            self._resize.put_nowait(None)

    async def _put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        while queue.qsize() >= self.QUEUE:
            self._room.clear()
            await self._room.wait()
        queue.put_nowait(item)

    async def read_stdin(self) -> bytes:
        if not self.stdin:
            return b""
        data = await self._stdin.get()
        self._room.set()
        return data

    async def read_resize(self) -> tuple[int, int] | None:
        size = await self._resize.get()
        self._room.set()
        return size

    async def write_stdout(self, data: bytes) -> None:
        await self.ws.send(bytes([STDOUT]) + data)

    async def write_stderr(self, data: bytes) -> None:
        await self.ws.send(bytes([STDERR]) + data)

    async def end_output(self) -> None:
        if self.protocol == V5:
            for channel in (STDOUT, STDERR):
                await self.ws.send(bytes([CLOSE, channel]))

    async def write_status(self, status: dict[str, Any]) -> None:
        await self.ws.send(bytes([ERROR]) + remotecommand.status_bytes(status, self.protocol))

    async def gone(self) -> None:
        await self.ws.closed.wait()

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()
