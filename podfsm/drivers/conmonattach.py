"""Attach through conmon: a ProcessStreams on a container monitor's attach socket and control
FIFO, for the container layer's `attach_stream` (CRI-O's AttachContainer speaks the same).

conmon's attach socket (`<bundle>/attach` with `--full-attach`) is SOCK_SEQPACKET: each
message the client sends is stdin for the container; each message conmon sends starts with
the pipe it came from (2 stdout, 3 stderr: conmon's stdpipe_t) followed by the data. The
client's `shutdown(SHUT_WR)` is the end of its stdin (conmon closes the container's stdin then
when the container was created with stdin_once). The socket ends when the container's output
does. The control FIFO (`<bundle>/ctl`) takes `"1 <height> <width>\\n"` to resize the
container's terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

#: conmon's STDIO_BUF_SIZE: a message is at most this much data (plus its pipe byte)
BUF_SIZE = 8192
PIPE_STDOUT, PIPE_STDERR = 2, 3
_RESIZE = 1


class ConmonAttach:
    """One attach session; `open()` connects. Output is sorted into stdout and stderr by one
    reader, which waits while either holds QUEUE messages (so conmon's socket fills, not
    podfsm's memory)."""

    QUEUE = 16

    def __init__(self, sock: socket.socket, ctl_path: str | None) -> None:
        self.sock = sock
        self.ctl_path = ctl_path
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._err: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = asyncio.Event()
        self._done = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())
        self._closed = False

    @classmethod
    async def open(cls, attach_socket: str, ctl_path: str | None = None) -> ConmonAttach:
        """Connect to conmon's attach socket. OSError (naming the socket) if nothing answers
        there: the container is not running, or has no monitor."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, attach_socket)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot attach through {attach_socket}: "
                                     f"{exc.strerror}") from None
        return cls(sock, ctl_path)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while msg := await loop.sock_recv(self.sock, BUF_SIZE + 1):
                queue = {PIPE_STDOUT: self._out, PIPE_STDERR: self._err}.get(msg[0])
                if queue is None or len(msg) == 1:
                    continue
                while queue.qsize() >= self.QUEUE:
                    self._room.clear()
                    await self._room.wait()
                queue.put_nowait(msg[1:])
        except OSError:
            pass
        finally:
            self._out.put_nowait(b"")
            self._err.put_nowait(b"")
            self._done.set()

    async def write_stdin(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for i in range(0, len(data), BUF_SIZE):  # a longer message would be cut by conmon
            await loop.sock_sendall(self.sock, data[i:i + BUF_SIZE])

    async def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def _get(self, queue: asyncio.Queue[bytes]) -> bytes:
        data = await queue.get()
        self._room.set()
        if not data:
            queue.put_nowait(b"")  # the end stays the end
        return data

    async def read_stdout(self) -> bytes:
        return await self._get(self._out)

    async def read_stderr(self) -> bytes:
        return await self._get(self._err)

    async def resize(self, width: int, height: int) -> None:
        if self.ctl_path is None or not (0 < width < 65536 and 0 < height < 65536):
            return
        fd = os.open(self.ctl_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise OSError(f"{self.ctl_path} is not conmon's control FIFO")
            os.write(fd, f"{_RESIZE} {height} {width}\n".encode())
        finally:
            os.close(fd)

    async def wait(self) -> None:
        """Returns once the container's output has ended: an attach has no exit code."""
        await self._done.wait()

    async def close(self) -> None:
        """Detach (the container goes on)."""
        if self._closed:
            return
        self._closed = True
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.sock.close()
