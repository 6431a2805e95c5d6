"""Exec and attach sessions, as kubelet's remotecommand server runs them
(pkg/kubelet/cri/streaming/remotecommand), over any transport that gives `Channels`: SPDY
streams (`spdy_channels`) or WebSocket channel bytes (websocket.py).

Subprotocols: `v4.channel.k8s.io` (error channel carries a metav1 Status JSON with the exit
code), `v3.channel.k8s.io` (resize channel, plain-text errors), `v2.channel.k8s.io` and
`channel.k8s.io` (no resize; v1 closes stdin at once). A session pumps stdin to the process,
stdout and stderr to the client and resize events to the terminal; when the process has ended
and its output is drained, it writes the status and ends. A client that goes ends the process
(`ProcessStreams.close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from podfsm.drivers.procstreams import ProcessStreams
from podfsm.faces.stream.session import SpdySession, SpdyStream, StreamReset

log = logging.getLogger(__name__)

V4, V3, V2, V1 = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                  "channel.k8s.io")
#: what this server speaks over SPDY, preferred first (kubelet's order)
SPDY_PROTOCOLS = (V4, V3, V2, V1)
#: seconds a client has to open the streams it asked for (kubelet: 30)
STREAM_CREATION_TIMEOUT = 30.0


class Channels(Protocol):
    """The client's side of a session, whatever carries it."""

    stdin: bool
    resize: bool

    async def read_stdin(self) -> bytes:
        """b'' at the end of the client's stdin."""

    async def read_resize(self) -> tuple[int, int] | None:
        """The next (width, height); None when no more come."""

    async def write_stdout(self, data: bytes) -> None: ...

    async def write_stderr(self, data: bytes) -> None: ...

    async def end_output(self) -> None:
        """stdout and stderr are done."""

    async def write_status(self, status: dict[str, Any]) -> None:
        """The session's outcome (a metav1 Status), in the subprotocol's form."""

    async def gone(self) -> None:
        """Return once the client's connection has ended."""


def success() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exit_status(cmd: tuple[str, ...], code: int) -> dict[str, Any]:
    """kubelet's status for a non-zero exit: client-go turns it into the exit code."""
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"{list(cmd)}, exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def internal_error(message: str) -> dict[str, Any]:
    return {"metadata": {}, "status": "Failure",
            "message": f"Internal error occurred: {message}", "reason": "InternalError",
            "details": {"causes": [{"message": message}]}, "code": 500}


def status_bytes(status: dict[str, Any], protocol: str) -> bytes:
    """v4 writes the Status as JSON; older protocols write an error's text and nothing on
    success."""
    if protocol.startswith(("v4.", "v5.")):
        return json.dumps(status, separators=(",", ":")).encode()
    return b"" if status["status"] == "Success" else str(status["message"]).encode()


class ResizeDecoder:
    """TerminalSize JSON objects ({"Width": w, "Height": h}) back to back, split anywhere."""

    MAX_PENDING = 4096

    def __init__(self) -> None:
        self._text = ""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._text += data.decode("utf-8", "replace")
        out: list[tuple[int, int]] = []
        decoder = json.JSONDecoder()
        while True:
            text = self._text.lstrip()
            if not text:
                self._text = ""
                return out
            try:
                obj, end = decoder.raw_decode(text)
            except ValueError:
                if len(text) > self.MAX_PENDING:
                    raise ValueError("resize channel: not TerminalSize JSON") from None
                self._text = text
                return out
            self._text = text[end:]
            if isinstance(obj, dict):
                w, h = obj.get("Width", obj.get("width")), obj.get("Height", obj.get("height"))
                if isinstance(w, int) and isinstance(h, int):
                    out.append((w, h))


@dataclass
class SpdyChannels:
    """Channels on the SPDY streams a remotecommand client opened."""

    protocol: str
    error: SpdyStream
    stdin_stream: SpdyStream | None = None
    stdout_stream: SpdyStream | None = None
    stderr_stream: SpdyStream | None = None
    resize_stream: SpdyStream | None = None

    def __post_init__(self) -> None:
        self.stdin = self.stdin_stream is not None
        self.resize = self.resize_stream is not None
        self._resizes = ResizeDecoder()
        self._pending: list[tuple[int, int]] = []

    async def read_stdin(self) -> bytes:
        return await self.stdin_stream.read() if self.stdin_stream is not None else b""

    async def read_resize(self) -> tuple[int, int] | None:
        while not self._pending:
            data = await self.resize_stream.read() if self.resize_stream is not None else b""
            if not data:
                return None
            self._pending = self._resizes.feed(data)
        return self._pending.pop(0)

    async def write_stdout(self, data: bytes) -> None:
        if self.stdout_stream is not None:
            await self.stdout_stream.write(data)

    async def write_stderr(self, data: bytes) -> None:
        if self.stderr_stream is not None:
            await self.stderr_stream.write(data)

    async def end_output(self) -> None:
        for stream in (self.stdout_stream, self.stderr_stream):
            if stream is not None:
                await stream.close()

    async def write_status(self, status: dict[str, Any]) -> None:
        data = status_bytes(status, self.protocol)
        if data:
            await self.error.write(data)
        await self.error.close()

    async def gone(self) -> None:
        await self.error.session.closed.wait()


async def spdy_channels(session: SpdySession, protocol: str, *, stdin: bool, stdout: bool,
                        stderr: bool, tty: bool,
                        timeout: float = STREAM_CREATION_TIMEOUT) -> SpdyChannels:
    """Wait for the streams the client must open (error, and each of stdin, stdout, stderr
    and resize it asked for), answering each. TimeoutError if they do not all come."""
    expected = 1 + stdin + stdout + stderr + (tty and protocol in (V4, V3))
    found: dict[str, SpdyStream] = {}

    async def collect() -> None:
        while len(found) < expected:
            stream = await session.accept()
            if stream is None:
                raise ConnectionError("the client went before opening its streams")
            kind = stream.header("streamtype")
            if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in found:
                log.info("exec/attach: refusing a stream of type %r", kind)
                await stream.reset()
                continue
            await stream.reply()
            found[kind] = stream

    await asyncio.wait_for(collect(), timeout)
    if "error" not in found:
        raise ConnectionError("the client opened no error stream")
    channels = SpdyChannels(protocol, found["error"], found.get("stdin"), found.get("stdout"),
                            found.get("stderr"), found.get("resize"))
    if protocol == V1 and channels.stdin_stream is not None:
        await channels.stdin_stream.close()  # as 1.0 kubelets did
    return channels


async def run_session(channels: Channels, start: Callable[[], Awaitable[ProcessStreams]],
                      cmd: tuple[str, ...] | None) -> None:
    """Start the process, pump until it has ended and its output is drained, write the
    status. `cmd` None: an attach (no exit code to report). The process is closed on every
    way out, the client's departure included."""
    try:
        proc = await start()
    except Exception as exc:  # the container layer's refusal, told to the client
        log.info("exec/attach could not start: %s", exc)
        with contextlib.suppress(ConnectionError):
            await channels.write_status(internal_error(f"error executing command in "
                                                       f"container: {exc}"))
        return
    try:
        async with asyncio.TaskGroup() as tg:
            feeders = [tg.create_task(_stdin(channels, proc)), tg.create_task(_watch(channels))]
            if channels.resize:
                feeders.append(tg.create_task(_resize(channels, proc)))
            outputs = [tg.create_task(_copy(proc.read_stdout, channels.write_stdout)),
                       tg.create_task(_copy(proc.read_stderr, channels.write_stderr))]
            code = await proc.wait()
            await asyncio.gather(*outputs)
            for task in feeders:
                task.cancel()
        await channels.end_output()
        if cmd is None or code in (0, None):
            await channels.write_status(success())
        else:
            await channels.write_status(exit_status(cmd, code))
    except* (ConnectionError, StreamReset) as group:
        log.info("exec/attach: the client went: %s", group.exceptions[0])
    finally:
        await proc.close()


async def _watch(channels: Channels) -> None:
    await channels.gone()
    raise ConnectionError("the client's connection ended")


async def _copy(read: Callable[[], Awaitable[bytes]],
                write: Callable[[bytes], Awaitable[None]]) -> None:
    while data := await read():
        await write(data)


async def _stdin(channels: Channels, proc: ProcessStreams) -> None:
    if not channels.stdin:
        return
    try:
        while data := await channels.read_stdin():
            await proc.write_stdin(data)
    except BrokenPipeError:
        return  # the process closed its stdin; the rest of the client's is dropped
    await proc.close_stdin()


async def _resize(channels: Channels, proc: ProcessStreams) -> None:
    try:
        while size := await channels.read_resize():
            await proc.resize(*size)
    except ValueError as exc:
        log.info("exec/attach: %s", exc)
