"""`podfsm serve`: uvicorn running the app on a unix socket (and TCP when asked), signals, and
the Controller held for the daemon's life."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import uvicorn

from podfsm import __version__
from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.faces.http.app import DEFAULT_HEARTBEAT, Shim
from podfsm.faces.http.errors import DaemonError
from podfsm.faces.wire import DEFAULT_SOCKET

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
DEFAULT_GRACEFUL_TIMEOUT = 30


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


class Daemon:
    """`podfsm serve`: a Controller and the HTTP shim on a unix socket, and on TCP if a port is
    given. `run()` returns after a graceful shutdown (SIGTERM/SIGINT in the main thread, or
    `request_exit()` from anywhere); the sandboxes keep running.

    `controller` replaces the Controller built from `cfg` (tests pass one with fake drivers).
    """

    def __init__(self, cfg: ControllerConfig, socket_path: str | None = None,
                 host: str | None = None, port: int | None = None, *,
                 controller: Controller | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
                 cri_socket: str | None = None) -> None:
        if host is not None and port is None:
            raise DaemonError("a host to listen on needs a port (--port)")
        self.cfg = cfg
        self.socket_path = socket_path or DEFAULT_SOCKET
        self.host = host or "127.0.0.1"
        self.port = port
        self._ctl = controller
        #: where the CRI face (podfsm.faces.cri) listens, from recovery done until shutdown;
        #: None: no CRI socket
        self.cri_socket = cri_socket
        self._heartbeat = heartbeat
        self._graceful_timeout = graceful_timeout
        #: set once the listeners accept connections (they answer 503 until the
        #: Controller has recovered)
        self.listening = threading.Event()
        #: the TCP address bound, when a port was given (port 0 picks one)
        self.tcp_address: tuple[str, int] | None = None
        self._server: _Server | None = None
        self._exit_requested = False

    def request_exit(self) -> None:
        """Begin a graceful shutdown. Safe from any thread and from a signal handler."""
        self._exit_requested = True
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        """Listen, enter the Controller, serve until asked to exit, leave the Controller."""
        ctl = self._ctl or Controller(self.cfg)
        shim = Shim(ctl, ready=False, heartbeat=self._heartbeat)
        config = uvicorn.Config(shim.app, http="h11", ws="none", lifespan="off",
                                log_config=None, timeout_graceful_shutdown=self._graceful_timeout)
        server = self._server = _Server(config, shim)
        server.should_exit = self._exit_requested
        listeners = [bind_unix_socket(self.socket_path)]
        inode = os.lstat(self.socket_path).st_ino
        failure: list[BaseException] = []
        try:
            if self.port is not None:
                listeners.append(bind_tcp_socket(self.host, self.port))
                self.tcp_address = listeners[-1].getsockname()[:2]
            self._log_listeners()
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hold_controller, ctl, shim, done, failure)
                try:
                    with self._signals():
                        self.listening.set()
                        await server.serve(sockets=listeners)
                finally:
                    done.set()
        finally:
            _unlink_socket(self.socket_path, inode)
            for sock in listeners:
                sock.close()
            self.listening.clear()
        if failure:
            raise failure[0]

    async def _hold_controller(self, ctl: Controller, shim: Shim, done: anyio.Event,
                               failure: list[BaseException]) -> None:
        try:
            async with ctl, self._cri(ctl):
                shim.ready = True
                n = len(await ctl.list_sandboxes())
                log.info("controller ready: %d sandbox(es) recovered%s", n,
                         f", problems: {ctl.recovery_problems}" if ctl.recovery_problems else "")
                await done.wait()
                shim.ready = False
                log.info("leaving the controller; sandboxes keep running")
        except Exception as exc:
            failure.append(exc)
            self.request_exit()

    @contextlib.asynccontextmanager
    async def _cri(self, ctl: Controller) -> AsyncIterator[None]:
        """The CRI socket, there only while the recovered controller is."""
        if self.cri_socket is None:
            yield
            return
        from podfsm.faces.cri import CriServer

        server = CriServer(ctl, self.cri_socket)
        await server.start()
        try:
            yield
        finally:
            await server.stop()

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
            log.info("and on http://%s:%d/ (the web page is there)", shown, port)


async def serve(cfg: ControllerConfig, socket_path: str | None, host: str | None,
                port: int | None, cri_socket: str | None = None) -> None:
    """Run `podfsm serve` until SIGTERM/SIGINT: see Daemon."""
    await Daemon(cfg, socket_path, host, port, cri_socket=cri_socket).run()


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
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a daemon that died left it
        return
    finally:
        probe.close()
    raise DaemonError(f"another podfsm daemon already answers on {path}")


def _unlink_socket(path: str, inode: int) -> None:
    """Remove the socket file if it is still the one we bound."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        return socket.create_server(addr[:2], family=family)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

