"""The streaming server: the URLs that CRI Exec, Attach and PortForward answer, and the
HTTP/1.1 upgrades behind them (SPDY/3.1 or WebSocket), as kubelet's streaming server serves
them (pkg/kubelet/cri/streaming/server.go).

A URL is `http://<address>:<port>/<exec|attach|portforward>/<token>`; the token is good once,
for a minute (tokens.py); any other request is answered 404 and closed. The server listens on
127.0.0.1 unless told otherwise: whoever reaches it with a token gets a shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from podfsm.drivers.procstreams import ContainerStreams, ProcessStreams
from podfsm.faces.stream import portforward, remotecommand, websocket
from podfsm.faces.stream.session import SpdySession
from podfsm.faces.stream.tokens import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    RequestCache,
    StreamRequest,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"
#: a request head larger than this, or slower than HEAD_TIMEOUT, is refused
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
_KINDS = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}

#: (sandbox id, port) -> a connection to that port in the pod's network namespace
PodDial = Callable[[str, int],
                   Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class TcpPipe:
    """A session.Pipe on an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> bytes:
        try:
            return await self.reader.read(64 * 1024)
        except ConnectionError:
            return b""

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class _Head:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("not an HTTP/1.1 request line")
        self.method, self.target = parts[0], parts[1]
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"bad header line {line[:40]!r}")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def values(self, name: str) -> list[str]:
        """Every comma-separated value of header `name`, in order."""
        return [v.strip() for line in self.headers.get(name, []) for v in line.split(",")
                if v.strip()]


class StreamServer:
    """Serves exec, attach and port-forward sessions for tokens it handed out.

    `containers` is the container layer (None until there is one: exec and attach URLs
    cannot be made then); `dial` connects to a port inside a sandbox's network namespace.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, port: int = 0, *,
                 containers: ContainerStreams | None = None, dial: PodDial | None = None,
                 cache: RequestCache | None = None) -> None:
        self.address = address
        self.port = port
        self.containers = containers
        self.dial = dial
        self.cache = cache or RequestCache()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.base_url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.address, self.port,
                                                  limit=MAX_HEAD, reuse_address=True)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port}"
        log.info("streaming server (exec, attach, port-forward) on %s", self.base_url)
        if not is_loopback(host):
            log.warning("the streaming server listens on %s, not loopback: whoever reaches it "
                        "with a URL gets into a pod", host)

    async def stop(self) -> None:
        """Stop listening and end every session (their processes are closed)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- URLs ------------------------------------------------------------------------------

    def url_for(self, request: StreamRequest) -> str:
        """A single-use URL for `request` (CacheFull when too many are outstanding)."""
        if not self.base_url:
            raise RuntimeError("the streaming server is not started")
        if not isinstance(request, PortForwardRequest) and self.containers is None:
            raise RuntimeError("exec and attach need a container layer")
        kind = next(k for k, cls in _KINDS.items() if isinstance(request, cls))
        return f"{self.base_url}/{kind}/{self.cache.insert(request)}"

    # -- connections -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            head = _Head(raw)
        except asyncio.LimitOverrunError:
            return await _answer(writer, 431, "request head too large")
        except ValueError as exc:
            return await _answer(writer, 400, str(exc))
        parts = urlsplit(head.target).path.strip("/").split("/")
        kind, token = (parts[0], parts[1]) if len(parts) == 2 else ("", "")
        request = self.cache.consume(token) if kind in _KINDS and token else None
        if request is None or not isinstance(request, _KINDS[kind]) or head.method not in (
                "GET", "POST"):
            return await _answer(writer, 404, "not found: unknown, used or expired token")
        upgrade = [v.lower() for v in head.values("upgrade")]
        if "websocket" in upgrade:
            await self._websocket(reader, writer, head, request)
        elif "spdy/3.1" in upgrade:
            await self._spdy(reader, writer, head, request)
        else:
            await _answer(writer, 400, "this URL needs an upgrade to SPDY/3.1 or websocket")

    async def _spdy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    head: _Head, request: StreamRequest) -> None:
        offered = head.values("x-stream-protocol-version")
        supported = ((portforward.PROTOCOL,) if isinstance(request, PortForwardRequest)
                     else remotecommand.SPDY_PROTOCOLS)
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None and not offered:
            chosen = supported[-1]  # clients before negotiation (kubelet does the same)
        if chosen is None:
            accepted = "".join(f"X-Accepted-Stream-Protocol-Versions: {p}\r\n"
                               for p in supported)
            return await _answer(writer, 403, f"unable to upgrade: unable to negotiate "
                                 f"protocol: client supports {offered}, server accepts "
                                 f"{list(supported)}", accepted)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: SPDY/3.1\r\n"
                     + f"X-Stream-Protocol-Version: {chosen}\r\n\r\n".encode())
        await writer.drain()
        session = SpdySession(TcpPipe(reader, writer))
        await self._run_spdy(session, chosen, request)

    async def _run_spdy(self, session: SpdySession, protocol: str,
                        request: StreamRequest) -> None:
        frames = asyncio.ensure_future(session.run())
        try:
            if isinstance(request, PortForwardRequest):
                await portforward.PortForwardSession(
                    session, request.sandbox_id, self._dialer(request)).run()
                return
            try:
                channels = await remotecommand.spdy_channels(
                    session, protocol, stdin=request.stdin, stdout=request.stdout,
                    stderr=request.stderr and not request.tty, tty=request.tty)
            except (TimeoutError, ConnectionError) as exc:
                log.info("exec/attach: no session: %s", exc or "timed out waiting for streams")
                return
            await remotecommand.run_session(channels, self._starter(request),
                                            _cmd_of(request))
        finally:
            await session.close()
            frames.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await frames

    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         head: _Head, request: StreamRequest) -> None:
        ws = websocket.WebSocket(reader, writer)
        offered = head.values("sec-websocket-protocol")
        if isinstance(request, PortForwardRequest):
            try:
                await ws.accept(head.raw, offered, (websocket.TUNNEL_PROTOCOL,))
            except ValueError as exc:
                log.info("port-forward over WebSocket refused: %s", exc)
                return
            await self._run_spdy(SpdySession(websocket.TunnelPipe(ws)), portforward.PROTOCOL,
                                 request)
            return
        try:
            protocol = await ws.accept(head.raw, offered, websocket.CHANNEL_PROTOCOLS)
        except ValueError as exc:
            log.info("exec/attach over WebSocket refused: %s", exc)
            return
        channels = websocket.WsChannels(ws, protocol, stdin=request.stdin, tty=request.tty)
        try:
            await channels.write_stdout(b"")  # kubelet's "the streams are up" message
            await remotecommand.run_session(channels, self._starter(request), _cmd_of(request))
        finally:
            await channels.close()

    def _dialer(self, request: PortForwardRequest) -> portforward.Dial:
        dial = self.dial
        if dial is None:
            raise RuntimeError("port-forward needs a dialer")

        async def to_port(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            assert dial is not None
            return await dial(request.sandbox_id, port)

        return to_port

    def _starter(self, request: ExecRequest | AttachRequest
                 ) -> Callable[[], Awaitable[ProcessStreams]]:
        containers = self.containers
        if containers is None:
            raise RuntimeError("exec and attach need a container layer")
        opts = {"tty": request.tty, "stdin": request.stdin, "stdout": request.stdout,
                "stderr": request.stderr and not request.tty}
        if isinstance(request, ExecRequest):
            return lambda: containers.exec_stream(request.container_id, request.cmd, **opts)
        return lambda: containers.attach_stream(request.container_id, **opts)


def _cmd_of(request: ExecRequest | AttachRequest) -> tuple[str, ...] | None:
    return request.cmd if isinstance(request, ExecRequest) else None


async def _answer(writer: asyncio.StreamWriter, status: int, text: str,
                  extra_headers: str = "") -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               431: "Request Header Fields Too Large"}
    body = (text + "\n").encode()
    writer.write(f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: text/plain; "
                 f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                 f"{extra_headers}\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def is_loopback(address: str) -> bool:
    """Whether `address` is a loopback address (what `serve` binds by default)."""
    try:
        infos = socket.getaddrinfo(address, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
