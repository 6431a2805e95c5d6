"""A small SPDY/3.1 client for the tests, on podfsm's own framing: it speaks to the streaming
server as client-go does (upgrade, then SYN_STREAMs with streamType headers)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from urllib.parse import urlsplit

from podfsm.faces.stream import spdy


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: str) -> None:
        self.reader, self.writer, self.protocol = reader, writer, protocol
        self.framer = spdy.Framer()
        self.next_id = 1
        self.data: dict[int, bytearray] = collections.defaultdict(bytearray)
        self.fin: set[int] = set()
        self.replied: set[int] = set()
        self.reset: set[int] = set()
        self.frames: list[spdy.Frame] = []
        self.changed = asyncio.Event()
        self.eof = False
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, protocols: list[str]) -> Client:
        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        writer.write(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
                     f"Upgrade: SPDY/3.1\r\n".encode()
                     + b"".join(f"X-Stream-Protocol-Version: {p}\r\n".encode()
                                for p in protocols) + b"\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionRefusedError(head.decode(errors="replace"))
        chosen = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-stream-protocol-version:"))
        return cls(reader, writer, chosen)

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            for f in self.framer.feed(data):
                self.frames.append(f)
                if isinstance(f, spdy.Data):
                    self.data[f.stream_id] += f.data
                    if f.fin:
                        self.fin.add(f.stream_id)
                elif isinstance(f, spdy.SynReply):
                    self.replied.add(f.stream_id)
                elif isinstance(f, spdy.RstStream):
                    self.reset.add(f.stream_id)
            self.changed.set()
        self.eof = True
        self.changed.set()

    def send(self, frame: spdy.Frame) -> None:
        self.writer.write(self.framer.encode(frame))

    async def open(self, headers: dict[str, str], fin: bool = False) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.send(spdy.SynStream(sid, headers, fin=fin))
        await self.writer.drain()
        return sid

    async def until(self, cond: object, timeout: float = 10.0) -> None:
        async def wait() -> None:
            while not cond():  # type: ignore[operator]
                self.changed.clear()
                if self.eof:
                    raise ConnectionError("server closed the connection")
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._task
