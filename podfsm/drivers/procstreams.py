"""The seam between the streaming face and whatever runs a process: `ProcessStreams` (one
exec'd or attached process's stdio, terminal size and end) and `ContainerStreams` (what the
container layer provides: exec and attach by container id).

`SubprocessStreams` is a ProcessStreams over a local child process, with pipes or a pty;
`exec_in_netns` runs a command in a sandbox's network namespace with it (nsenter), which is
how the streaming protocols are proven with real processes before containers exist. A
container layer can reuse SubprocessStreams for `<runtime> exec` without a terminal.

Every read and write waits on the descriptor (non-blocking, in the event loop): a process
that does not read its stdin holds the writer, and a client that does not read holds the
process's output in the kernel's pipe, never in podfsm's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pty
import signal
import struct
import termios
from collections.abc import Sequence
from typing import Protocol

#: bytes read from a process at a time
CHUNK = 32 * 1024
NSENTER = "/usr/bin/nsenter"
SETSID = "/usr/bin/setsid"


class ProcessStreams(Protocol):
    """One process's stdio as the streaming server drives it. Unused directions read b''."""

    async def write_stdin(self, data: bytes) -> None:
        """Write to the process's stdin, waiting while it is full."""

    async def close_stdin(self) -> None:
        """End of the client's stdin (EOF to the process; for attach with stdin_once, the
        container's stdin closes)."""

    async def read_stdout(self) -> bytes:
        """Output; b'' at its end. With a tty everything comes here."""

    async def read_stderr(self) -> bytes:
        """Error output; b'' at its end (at once with a tty)."""

    async def resize(self, width: int, height: int) -> None:
        """The client's terminal size (tty only)."""

    async def wait(self) -> int | None:
        """The exit code once the process has ended; None when there is none to report
        (attach: the session ends with the container's output)."""

    async def close(self) -> None:
        """End the session, idempotent: an exec'd process still running is killed (the
        client went), an attach detaches; every descriptor is released."""


class ContainerStreams(Protocol):
    """What the container layer provides to the streaming server (see docs/streaming.md)."""

    async def exec_stream(self, container_id: str, cmd: Sequence[str], *, tty: bool,
                          stdin: bool, stdout: bool, stderr: bool) -> ProcessStreams:
        """Start `cmd` in the running container. PodfsmError (ContainerNotFound, ...) when
        it cannot."""

    async def attach_stream(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                            stderr: bool) -> ProcessStreams:
        """Attach to the container's stdio through its monitor's attach socket."""


async def _wait_fd(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = ((loop.add_writer, loop.remove_writer) if writable
                   else (loop.add_reader, loop.remove_reader))
    add(fd, ready.set_result, None)
    try:
        await ready
    finally:
        remove(fd)


async def read_fd(fd: int) -> bytes:
    """Up to CHUNK bytes from a non-blocking descriptor; b'' at EOF (EIO: a pty's other end
    is gone)."""
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            await _wait_fd(fd, writable=False)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def write_fd(fd: int, data: bytes) -> None:
    """All of `data` to a non-blocking descriptor, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _wait_fd(fd, writable=True)


class SubprocessStreams:
    """A child process started by `start()`, its stdio on pipes or on a pty."""

    def __init__(self, proc: asyncio.subprocess.Process, tty: bool, stdin: int | None,
                 stdout: int | None, stderr: int | None) -> None:
        self.proc = proc
        self.tty = tty
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self._closed = False

    @classmethod
    async def start(cls, argv: Sequence[str], *, tty: bool, stdin: bool,
                    env: dict[str, str] | None = None) -> SubprocessStreams:
        """Run `argv` in a session of its own (so close() can kill all it started). With a
        tty its stdio is a new pty's slave, made its controlling terminal by setsid -c."""
        ours: list[int] = []
        theirs: list[int] = []
        try:
            if tty:
                master, slave = pty.openpty()
                ours.append(master)
                theirs.append(slave)
                proc = await asyncio.create_subprocess_exec(
                    SETSID, "-c", *argv, stdin=slave, stdout=slave, stderr=slave, env=env)
                os.set_blocking(master, False)
                return cls(proc, True, master if stdin else None, master, None)
            fds: list[int | None] = []
            child: list[int] = []
            for direction in ("in", "out", "err"):
                if direction == "in" and not stdin:
                    fds.append(None)
                    child.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                    theirs.append(child[-1])
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                mine, other = (w, r) if direction == "in" else (r, w)
                ours.append(mine)
                theirs.append(other)
                os.set_blocking(mine, False)
                fds.append(mine)
                child.append(other)
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=child[0], stdout=child[1], stderr=child[2], env=env,
                start_new_session=True)
            return cls(proc, False, fds[0], fds[1], fds[2])
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)

    async def write_stdin(self, data: bytes) -> None:
        if self._stdin is None:
            raise BrokenPipeError("the process has no stdin")
        await write_fd(self._stdin, data)

    async def close_stdin(self) -> None:
        fd, self._stdin = self._stdin, None
        if fd is None:
            return
        if self.tty:
            # a pty has no half-close: the line discipline's EOF (^D) ends a canonical read
            with contextlib.suppress(OSError):
                await write_fd(fd, b"\x04")
        else:
            os.close(fd)

    async def read_stdout(self) -> bytes:
        return await read_fd(self._stdout) if self._stdout is not None else b""

    async def read_stderr(self) -> bytes:
        return await read_fd(self._stderr) if self._stderr is not None else b""

    async def resize(self, width: int, height: int) -> None:
        if self.tty and self._stdout is not None and 0 < width < 65536 and 0 < height < 65536:
            fcntl.ioctl(self._stdout, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def wait(self) -> int:
        rc = await self.proc.wait()
        return rc if rc >= 0 else 128 - rc  # killed by signal N: 128+N, as a shell reports

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        fds = {self._stdin, self._stdout, self._stderr} - {None}
        self._stdin = self._stdout = self._stderr = None
        for fd in fds:
            assert fd is not None
            with contextlib.suppress(OSError):
                os.close(fd)


async def exec_in_netns(netns_path: str | None, cmd: Sequence[str], *, tty: bool,
                        stdin: bool) -> SubprocessStreams:
    """Run `cmd` in the network namespace pinned at `netns_path` (the host's when None),
    through nsenter."""
    argv = [NSENTER, f"--net={netns_path}", "--", *cmd] if netns_path else list(cmd)
    return await SubprocessStreams.start(argv, tty=tty, stdin=stdin)
