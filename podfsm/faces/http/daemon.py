"""`podfsm serve`: uvicorn running the app on a unix socket (and TCP when asked), signals, and
the Controller held for the daemon's life."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from podfsm import __version__
from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.faces.http.app import DEFAULT_HEARTBEAT, Shim
from podfsm.faces.http.errors import DaemonError
from podfsm.faces.http.events import DEFAULT_MAX_STREAMS
from podfsm.faces.http.guard import TcpGuard, listening_names, load_or_create_token
from podfsm.faces.sockets import stale_socket_problem, unlink_if_ours
from podfsm.faces.wire import DEFAULT_SOCKET

if TYPE_CHECKING:
    from podfsm.faces.stream import StreamServer

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
DEFAULT_GRACEFUL_TIMEOUT = 30
#: seconds a request's head, then its body, may take to arrive
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
#: the token file's name beside the unix socket, unless --token-file says otherwise
TOKEN_FILE = "http-token"
#: the longest request path uvicorn's access log shows whole (h11 takes ~16 KiB)
ACCESS_PATH_MAX = 160


class _ClipPath(logging.Filter):
    """Cut the path of uvicorn's access log lines after ACCESS_PATH_MAX characters: a client
    chooses it (an id of any length), and one request must not make a 16 KB log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) \
                and len(args[2]) > ACCESS_PATH_MAX:
            path = args[2]
            record.args = (*args[:2], f"{path[:ACCESS_PATH_MAX]}... ({len(path)} characters)",
                           *args[3:])
        return True


def _clip_access_paths() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _ClipPath) for f in access.filters):
        access.addFilter(_ClipPath())


class _Server(uvicorn.Server):
    """uvicorn, told when shutdown begins (so event streams end instead of holding the
    graceful shutdown open), and without its own signal handling: uvicorn re-raises a caught
    signal after shutting down, which would kill the process before the Controller is left."""

    def __init__(self, config: uvicorn.Config, shim: Shim) -> None:
        super().__init__(config)
        self._shim = shim

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._shim.close_streams()
        await super().shutdown(sockets)


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request: its head must arrive within
    `header_timeout` of its first byte (or of the connection), its body within `body_timeout`
    of its head. A connection that misses one is closed: 20 half-sent requests (slowloris)
    hold nothing for longer than that. Idle keep-alive connections are uvicorn's own timeout."""

    header_timeout = DEFAULT_HEADER_TIMEOUT
    body_timeout = DEFAULT_BODY_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(h11.IDLE)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm(h11.IDLE)  # the first byte of the next request on this connection
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._waiting_for is not h11.SEND_BODY:
            self._arm(h11.SEND_BODY)
        elif state is not h11.IDLE and state is not h11.SEND_BODY:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, waiting_for: object) -> None:
        self._disarm()
        self._waiting_for = waiting_for
        timeout = self.header_timeout if waiting_for is h11.IDLE else self.body_timeout
        self._deadline = self.loop.call_later(timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._waiting_for = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent %s too slowly",
                     "a request's head" if self._waiting_for is h11.IDLE else "a request body")
            self.transport.close()


class Daemon:
    """`podfsm serve`: a Controller and the HTTP shim on a unix socket, and on TCP if a port is
    given (with a token: see guard.py). `run()` returns after a graceful shutdown
    (SIGTERM/SIGINT in the main thread, or `request_exit()` from anywhere); the sandboxes keep
    running.

    The sockets are bound only once the Controller is entered (its recovery done): a client
    that waits for the socket file to appear is never answered 503 "starting".

    `controller` replaces the Controller built from `cfg` (tests pass one with fake drivers).
    `token_file` (TCP only) defaults to `http-token` beside the unix socket.
    """

    def __init__(self, cfg: ControllerConfig, socket_path: str | None = None,
                 host: str | None = None, port: int | None = None, *,
                 controller: Controller | None = None,
                 token_file: str | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 max_streams: int = DEFAULT_MAX_STREAMS,
                 cri_socket: str | None = None,
                 stream_address: str = "127.0.0.1", stream_port: int | None = 0) -> None:
        if host is not None and port is None:
            raise DaemonError("a host to listen on needs a port (--port)")
        self.cfg = cfg
        self.socket_path = socket_path or DEFAULT_SOCKET
        self.host = host or "127.0.0.1"
        self.port = port
        self.token_file = token_file or os.path.join(
            os.path.dirname(self.socket_path) or ".", TOKEN_FILE)
        self._ctl = controller
        #: where the CRI face (podfsm.faces.cri) listens, from recovery done until shutdown;
        #: None: no CRI socket
        self.cri_socket = cri_socket
        #: where the streaming server (exec, attach, port-forward URLs) listens, with the CRI
        #: socket; port 0 picks a free one, None: no streaming server
        self.stream_address = stream_address
        self.stream_port = stream_port
        #: the streaming server, while it runs
        self.stream: StreamServer | None = None
        self._heartbeat = heartbeat
        self._graceful_timeout = graceful_timeout
        self._protocol = type("BoundedH11", (_BoundedH11,), {
            "header_timeout": header_timeout, "body_timeout": body_timeout})
        self._max_streams = max_streams
        #: set once the listeners accept connections (the Controller has recovered)
        self.listening = threading.Event()
        #: the TCP address bound, when a port was given (port 0 picks one)
        self.tcp_address: tuple[str, int] | None = None
        #: the token TCP requests need, when a port was given
        self.token: str | None = None
        self._server: _Server | None = None
        self._exit_requested = False

    def request_exit(self) -> None:
        """Begin a graceful shutdown. Safe from any thread and from a signal handler."""
        self._exit_requested = True
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        """Enter the Controller, listen, serve until asked to exit, leave the Controller."""
        if self.port is not None:
            self.token = load_or_create_token(self.token_file)
        _clear_stale_socket(self.socket_path)  # refuse at once if another daemon answers
        ctl = self._ctl or Controller(self.cfg)
        shim = Shim(ctl, ready=False, heartbeat=self._heartbeat, max_streams=self._max_streams)
        _clip_access_paths()
        config = uvicorn.Config(shim.app, http=self._protocol, interface="asgi3", ws="none",
                                lifespan="off",
                                log_config=None, timeout_graceful_shutdown=self._graceful_timeout)
        server = self._server = _Server(config, shim)
        with self._signals():
            async with ctl, self._cri(ctl):
                n = len(await ctl.list_sandboxes())
                log.info("controller ready: %d sandbox(es) recovered%s", n,
                         f", problems: {ctl.recovery_problems}" if ctl.recovery_problems else "")
                server.should_exit = self._exit_requested
                try:
                    await self._listen_and_serve(shim, server)
                finally:
                    shim.ready = False
                    log.info("leaving the controller; sandboxes keep running")

    async def _listen_and_serve(self, shim: Shim, server: _Server) -> None:
        listeners = [bind_unix_socket(self.socket_path)]
        inode = os.lstat(self.socket_path).st_ino
        try:
            if self.port is not None:
                listeners.append(bind_tcp_socket(self.host, self.port))
                self.tcp_address = listeners[-1].getsockname()[:2]
                assert self.token is not None
                shim.guard = TcpGuard(self.token, listening_names(self.host, self.tcp_address[1]),
                                      self.tcp_address[1])
            shim.ready = True
            self._log_listeners()
            self.listening.set()
            await server.serve(sockets=listeners)
        finally:
            unlink_if_ours(self.socket_path, inode)
            for sock in listeners:
                sock.close()
            self.listening.clear()

    @contextlib.asynccontextmanager
    async def _cri(self, ctl: Controller) -> AsyncIterator[None]:
        """The CRI socket, there only while the recovered controller is."""
        if self.cri_socket is None:
            yield
            return
        from podfsm.drivers.netnsdial import NetnsDialer
        from podfsm.faces.cri import CriServer
        from podfsm.faces.stream import StreamServer
        from podfsm.faces.stream.pods import SandboxDial

        async with contextlib.AsyncExitStack() as stack:
            stream = None
            if self.stream_port is not None:
                dialer = NetnsDialer()
                stack.push_async_callback(dialer.close)
                stream = StreamServer(self.stream_address, self.stream_port, containers=ctl,
                                      dial=SandboxDial(ctl, dialer))
                try:
                    await stream.start()
                except OSError as exc:
                    raise DaemonError(f"cannot listen for streaming on {self.stream_address}:"
                                      f"{self.stream_port}: {exc.strerror or exc}") from None
                stack.push_async_callback(stream.stop)
                self.stream = stream
            server = CriServer(ctl, self.cri_socket, stream)
            await server.start()
            try:
                yield
            finally:
                await server.stop()
                self.stream = None

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s: shutting down gracefully", signal.Signals(sig).name)
        if self._server is not None and self._server.should_exit and sig == signal.SIGINT:
            self._server.force_exit = True
        self.request_exit()

    def _log_listeners(self) -> None:
        log.info("podfsm %s listening on unix socket %s (mode %o)", __version__,
                 self.socket_path, SOCKET_MODE)
        if self.tcp_address is not None:
            host, port = self.tcp_address
            shown = f"[{host}]" if ":" in host else host
            log.info("and on http://%s:%d/ (the web page is there; token in %s): open "
                     "http://%s:%d/?token=%s", shown, port, self.token_file, shown, port,
                     self.token)


async def serve(cfg: ControllerConfig, socket_path: str | None, host: str | None,
                port: int | None, **options: Any) -> None:
    """Run `podfsm serve` until SIGTERM/SIGINT: see Daemon (`options` are its keywords)."""
    await Daemon(cfg, socket_path, host, port, **options).run()


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0660 from the moment it exists. A stale socket
    file is replaced; a live one (another daemon answers) or any other file is refused."""
    if len(os.fsencode(path)) > 107:
        raise DaemonError(f"unix socket path {path!r} is over 107 bytes")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() gives the file the socket inode's mode less the umask: narrow it first.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on unix socket {path}: {exc.strerror}") from None
    return sock


def _clear_stale_socket(path: str) -> None:
    problem = stale_socket_problem(path)
    if problem is not None:
        raise DaemonError(problem)




def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        return socket.create_server(addr[:2], family=family)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

