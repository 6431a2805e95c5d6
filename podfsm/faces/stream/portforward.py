"""Port forwarding over SPDY (`portforward.k8s.io`), as kubelet's server does it
(pkg/kubelet/cri/streaming/portforward/httpstream.go): for each forwarded connection the
client opens an error stream and a data stream carrying the same `requestID` and `port`
headers; once both are there the server dials the port inside the pod and copies bytes both
ways. The data stream's FIN half-closes the connection to the pod; the pod's EOF ends the
data stream and, with nothing written on it, the error stream (the client waits for both). A
dial that fails writes its reason on the error stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from podfsm.faces.stream.session import SpdySession, SpdyStream, StreamReset

log = logging.getLogger(__name__)

PROTOCOL = "portforward.k8s.io"
#: seconds the second stream of a pair may take to follow the first (kubelet: 30)
PAIR_TIMEOUT = 30.0
CHUNK = 32 * 1024

Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class PortForwardSession:
    """The forwarded connections of one SPDY session into one pod."""

    def __init__(self, session: SpdySession, pod: str, dial: Dial,
                 allowed_ports: tuple[int, ...] = (), pair_timeout: float = PAIR_TIMEOUT) -> None:
        self.session = session
        self.pod = pod
        self.dial = dial
        self.allowed_ports = allowed_ports
        self.pair_timeout = pair_timeout
        self._pairs: dict[str, dict[str, SpdyStream]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve stream pairs until the session ends; then end every forwarded connection."""
        try:
            while (stream := await self.session.accept()) is not None:
                await self._add(stream)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, stream: SpdyStream) -> None:
        problem = self._check(stream)
        if problem:
            log.info("port-forward to %s: refusing stream %d: %s", self.pod, stream.id, problem)
            await stream.reset()
            return
        await stream.reply()
        kind = stream.header("streamtype")
        rid = stream.header("requestid")
        if not rid:  # clients before request ids: error and data streams are consecutive
            rid = str(stream.id if kind == "error" else stream.id - 2)
        pair = self._pairs.get(rid)
        if pair is None:
            pair = self._pairs[rid] = {}
            self._spawn(self._expire(rid))
        if kind in pair:
            msg = f"error processing stream for request {rid}: {kind} stream already assigned"
            await _print_error(pair.get("error"), msg)
            await stream.reset()
            return
        pair[kind] = stream
        if len(pair) == 2:
            del self._pairs[rid]
            self._spawn(self._forward(pair["data"], pair["error"]))

    def _check(self, stream: SpdyStream) -> str:
        port = stream.header("port")
        if not port.isdigit() or not 0 < int(port) < 65536:
            return f"'port' header {port!r} is not a port"
        if self.allowed_ports and int(port) not in self.allowed_ports:
            return f"port {port} was not asked for in PortForward"
        kind = stream.header("streamtype")
        if kind not in ("error", "data"):
            return f"stream type {kind!r} (a port-forward stream is 'error' or 'data')"
        return ""

    async def _expire(self, rid: str) -> None:
        await asyncio.sleep(self.pair_timeout)
        pair = self._pairs.pop(rid, None)
        if pair is not None:
            await _print_error(pair.get("error"), f"request {rid}: timed out waiting for streams")
            for stream in pair.values():
                await stream.reset()

    async def _forward(self, data: SpdyStream, error: SpdyStream) -> None:
        port = int(data.header("port"))
        try:
            try:
                reader, writer = await self.dial(port)
            except (OSError, TimeoutError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                msg = f"error forwarding port {port} to pod {self.pod}: {reason}"
                log.info("port-forward: %s", msg)
                await _print_error(error, msg)
                await data.close()
                return
            down = asyncio.ensure_future(_downstream(reader, data, error))
            up = asyncio.ensure_future(_upstream(data, writer))
            try:
                pending: set[asyncio.Future[None]] = {down, up}
                while down in pending:  # done once the pod's side has ended
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # the client's reset or departure ends both ways
            finally:
                for task in (down, up):
                    task.cancel()
                await asyncio.gather(down, up, return_exceptions=True)
                writer.close()
        except (ConnectionError, StreamReset) as exc:
            log.debug("port-forward to %s port %d ended: %s", self.pod, port, exc)
        finally:
            data.session.forget(data)
            error.session.forget(error)


async def _downstream(reader: asyncio.StreamReader, data: SpdyStream,
                      error: SpdyStream) -> None:
    while chunk := await reader.read(CHUNK):
        await data.write(chunk)
    await data.close()
    await error.close()


async def _upstream(data: SpdyStream, writer: asyncio.StreamWriter) -> None:
    while chunk := await data.read():
        writer.write(chunk)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _print_error(stream: SpdyStream | None, msg: str) -> None:
    if stream is not None:
        with contextlib.suppress(ConnectionError):
            await stream.write(msg.encode())
            await stream.close()
