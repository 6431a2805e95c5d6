"""Sockets in a pod's network namespace: `python -m podfsm.drivers.netnsdial` is a small
single-threaded helper that, for each request, enters the namespace it is handed, creates a TCP
socket there, goes back to its own namespace and hands the socket back. A socket stays bound
to the namespace it was created in, so podfsm then connects it (to 127.0.0.1:port, the pod's
loopback) in its own event loop; podfsm itself never changes namespace.

Protocol, on a SOCK_SEQPACKET pair (the helper's end is the descriptor its argument names):
podfsm sends b"4" or b"6" (the
address family) with the namespace's descriptor (SCM_RIGHTS), opened by podfsm from the pin;
the helper answers b"ok" with the socket's descriptor, or b"error: ..." without one. EOF ends
the helper. A helper that cannot get back to its own namespace exits at once, so it never
serves a request from the wrong one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

from podfsm.drivers import linux

CLONE_NEWNET = 0x40000000


def _serve(chan: socket.socket) -> int:
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(chan, 16, 1)
        except OSError:
            return 1
        if not msg:
            return 0
        if len(fds) != 1 or msg not in (b"4", b"6"):
            for fd in fds:
                os.close(fd)
            chan.send(b"error: a request is b'4' or b'6' with one namespace descriptor")
            continue
        family = socket.AF_INET if msg == b"4" else socket.AF_INET6
        try:
            linux.setns(fds[0], CLONE_NEWNET)
        except OSError as exc:
            chan.send(f"error: cannot enter the network namespace: {exc.strerror}".encode())
            continue
        finally:
            os.close(fds[0])
        try:
            sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
            error = ""
        except OSError as exc:
            sock, error = None, f"error: socket: {exc.strerror}"
        try:
            linux.setns(home, CLONE_NEWNET)
        except OSError:
            return 2  # never serve from a namespace that is not ours
        if sock is None:
            chan.send(error.encode())
        else:
            socket.send_fds(chan, [b"ok"], [sock.fileno()])
            sock.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m podfsm.drivers.netnsdial FD", file=sys.stderr)
        return 2
    return _serve(socket.socket(fileno=int(argv[0])))


class NetnsDialer:
    """TCP connections from inside network namespaces, through one helper process started
    on first use (and again if it died). `close()` ends it."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._proc: asyncio.subprocess.Process | None = None
        self._chan: socket.socket | None = None
        self._lock = asyncio.Lock()

    async def _helper(self) -> socket.socket:
        if self._chan is not None and self._proc is not None and self._proc.returncode is None:
            return self._chan
        await self.close()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "podfsm.drivers.netnsdial", str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._chan = mine
        return mine

    async def socket_in(self, netns_path: str, family: int = socket.AF_INET) -> socket.socket:
        """An unconnected TCP socket of the namespace pinned at `netns_path`. OSError if the
        pin cannot be opened or the helper refuses (never a socket of another namespace)."""
        ns = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            async with self._lock:
                chan = await self._helper()
                req = b"4" if family == socket.AF_INET else b"6"
                reply = await asyncio.to_thread(_exchange, chan, req, ns)
        finally:
            os.close(ns)
        msg, fds = reply
        if msg != b"ok" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(msg.decode(errors="replace").removeprefix("error: ")
                          or "the namespace helper went away")
        return socket.socket(fileno=fds[0])

    async def connect(self, netns_path: str | None, port: int,
                      timeout: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to 127.0.0.1:`port` in the namespace at `netns_path`; on the host
        when None (host-network pods)."""
        if netns_path is None:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        sock = await self.socket_in(netns_path)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, ("127.0.0.1", port)), timeout)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        chan, self._chan = self._chan, None
        proc, self._proc = self._proc, None
        if chan is not None:
            chan.close()  # EOF: the helper exits
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _exchange(chan: socket.socket, req: bytes, ns: int) -> tuple[bytes, list[int]]:
    socket.send_fds(chan, [req], [ns])
    msg, fds, _, _ = socket.recv_fds(chan, 256, 1)
    return msg, fds


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
