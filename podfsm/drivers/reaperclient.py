"""The client of the reaper (:mod:`podfsm.drivers.reaper`): starts the helper process when
needed and speaks its JSON-lines protocol over its unix socket, for the runtime and CNI drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import anyio

from podfsm.drivers import PACKAGE_DIR
from podfsm.drivers.reaper import (
    IDLE_EXIT_SECONDS,
    LINE_LIMIT,
    CommandTimedOut,
    ReaperConnectionLost,
    ReaperError,
    socket_path,
)

#: requests that may be sent again on a new connection when the reaper was lost mid-way
_IDEMPOTENT_OPS = frozenset({"ping", "watch", "wait_exit", "kill", "forget"})


#: requests that run commands: once sent, they run to their end (or their timeout) in the reaper
_COMMAND_OPS = frozenset({"run", "chain"})


async def _wait_for_end(reply: asyncio.Future[dict[str, Any]]) -> None:
    """A cancelled caller of a command waits for its reply, whatever cancels it meanwhile: the
    command goes on in the reaper, and what the caller does next (a compensating step: a CNI
    DEL, a runtime delete) must not run beside it. Bounded by the command's own timeout."""
    with anyio.CancelScope(shield=True):
        while not reply.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([reply])
    if not reply.cancelled():
        reply.exception()  # the caller is cancelled: nobody else reads it


#: Starts `main` with `podfsm` as a bare package: podfsm/__init__.py imports the whole controller
#: (pydantic, pyroute2, ...), about 140 ms and 15 MB this long-lived process does not need. It is
#: `python -m podfsm.drivers.reaper` without that, and independent of the caller's cwd and
#: PYTHONPATH. asyncio imports ssl when it can (and with it OpenSSL, ~4.5 MB resident); the
#: reaper never speaks TLS, and asyncio works without ssl, so the import is refused.
_BOOTSTRAP = (
    "import sys, types\n"
    "sys.modules['ssl'] = None\n"
    "pkg = types.ModuleType('podfsm')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules['podfsm'] = pkg\n"
    "from podfsm.drivers.reaper import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


class WatchResult(NamedTuple):
    """A process the reaper now watches; `child` is False when it cannot learn its status."""

    pid: int
    start_time: int
    child: bool


class RunResult(NamedTuple):
    """What a command run by the reaper produced, and what it did next (`then`)."""

    rc: int
    stdout: str
    stderr: str
    #: with `watch_pid_file`: the process the pid file named, now watched
    watched: WatchResult | None = None
    #: why the `then` part failed, when it did
    then_error: str | None = None


class ChainStep(NamedTuple):
    """One command of a `chain` request."""

    argv: Sequence[str]
    #: variables set over the reaper's own environment
    env_add: Mapping[str, str] | None = None
    input: str | None = None
    #: the previous step's output (a JSON object) becomes this input's `prevResult`
    prev_result: bool = False


def _run_result(reply: Mapping[str, Any]) -> RunResult:
    w = reply.get("watched")
    watched = None if w is None else WatchResult(int(w["pid"]), int(w["start_time"]),
                                                 bool(w["child"]))
    return RunResult(int(reply["rc"]), str(reply["stdout"]), str(reply["stderr"]), watched,
                     reply.get("then_error"))


def _step_error(reply: Mapping[str, Any]) -> ReaperError:
    if "timed_out" in reply:
        return CommandTimedOut(f"reaper run: {reply['error']}", float(reply["timed_out"]))
    return ReaperError(f"reaper run: {reply['error']}")


def _step(step: ChainStep, timeout: float, cwd: str | None) -> dict[str, Any]:
    req: dict[str, Any] = {"argv": list(step.argv), "timeout": timeout}
    if step.env_add is not None:
        req["env_add"] = dict(step.env_add)
    if step.input is not None:
        req["input"] = step.input
    if step.prev_result:
        req["prev_result"] = True
    if cwd is not None:
        req["cwd"] = cwd
    return req


class ReaperClient:
    """Talks to the reaper of `run_dir`, starting it when needed.

    `idle_exit` is passed to a reaper this client starts: the seconds it lingers once it has no
    child, no client and no request.

    One connection carries concurrent requests (each with its own id, answered by one reader
    task). A lost connection fails the requests in flight with ReaperError; the next request
    reconnects, starting a new reaper if the old one is gone.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        python: str = sys.executable,
        start_timeout: float = 10.0,
        idle_exit: float = IDLE_EXIT_SECONDS,
    ) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.idle_exit = idle_exit
        self.socket_path = socket_path(self.run_dir)
        self._python = python
        self._start_timeout = start_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self.reaper_pid: int | None = None

    @property
    def connected(self) -> bool:
        """True while the connection to the reaper is open."""
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Connect, starting the reaper if its socket is missing or refuses; returns once the
        reaper has answered a ping. Raises ReaperError when it cannot be started or reached
        within the start timeout."""
        async with self._connect_lock:
            if self.connected:
                return
            await self._drop_connection()  # what is left of a lost connection
            deadline = time.monotonic() + self._start_timeout
            why: BaseException | None = None
            while time.monotonic() < deadline:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.socket_path, limit=LINE_LIMIT
                    )
                except (FileNotFoundError, ConnectionError) as exc:
                    why = exc
                    # The launcher returns once a reaper listens, or after waiting for the lock
                    # of one that is exiting: either way the next attempt can connect.
                    await self._launch()
                    continue
                self._reader, self._writer = reader, writer
                self._reader_task = asyncio.create_task(self._read_replies(reader, writer))
                try:
                    reply = await self._send({"op": "ping"})
                except ReaperError as exc:
                    # It exited (idle) between accept and ping: start over.
                    why = exc
                    await self._drop_connection()
                    continue
                self.reaper_pid = int(reply["pid"])
                return
            raise ReaperError(f"cannot reach the reaper at {self.socket_path}: {why}")

    async def _launch(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            self._python, "-I", "-c", _BOOTSTRAP, PACKAGE_DIR, "--run-dir", self.run_dir,
            "--idle-exit", str(self.idle_exit),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            why = err.decode(errors="replace").strip()
            raise ReaperError(f"cannot start the reaper for {self.run_dir}: {why}")

    async def _read_replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = json.loads(line)
                fut = self._pending.pop(reply.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(ReaperConnectionLost("lost the connection to the reaper"))
            writer.close()

    async def _drop_connection(self) -> None:
        task, writer = self._reader_task, self._writer
        self._reader_task = self._writer = self._reader = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _request(self, req: dict[str, Any], *, reconnect: bool = True) -> dict[str, Any]:
        if not self.connected:
            if not reconnect:
                raise ReaperConnectionLost("not connected to the reaper")
            await self.connect()
        try:
            return await self._send(req)
        except ReaperConnectionLost:
            # Only requests that may be repeated are: a `run` may have done its work already.
            if not reconnect or req["op"] not in _IDEMPOTENT_OPS:
                raise
        await self.connect()
        return await self._send(req)

    async def _send(self, req: dict[str, Any]) -> dict[str, Any]:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ReaperConnectionLost("not connected to the reaper")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            writer.write(json.dumps({**req, "id": rid}).encode() + b"\n")
            try:
                # shielded: a cancelled task cancels the future it awaits, and this one must
                # stay to tell when the command ended
                reply = await asyncio.shield(fut)
            except asyncio.CancelledError:
                if req["op"] in _COMMAND_OPS:
                    await _wait_for_end(fut)
                raise
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise ReaperError(f"reaper {req.get('op')}: {reply['error']}")
        return reply

    async def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        mount_workaround: bool = False,
        timeout: float = 30.0,
        *,
        output_file: str | None = None,
        input: str | None = None,
        cwd: str | None = None,
        then: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Run `argv` as the reaper's child and return (rc, stdout, stderr).

        `mount_workaround` runs it in a private mount namespace without the hybrid cgroup2
        mount (crun). With `output_file`, stdout and stderr go there and `stderr` is its tail.
        `then` is what the reaper does next if the command succeeded, in the same request (see
        the `run` request in podfsm.drivers.reaper): {"watch_pid_file": ..., "task_file": ...}
        or {"forget": {"pid": ..., "start_time": ...}}.
        Raises ReaperError if the command cannot be started or is killed at `timeout`.
        """
        req: dict[str, Any] = {
            "op": "run", "argv": list(argv), "mount_workaround": mount_workaround,
            "timeout": timeout,
        }
        if env is not None:
            req["env"] = dict(env)
        if output_file is not None:
            req["output_file"] = output_file
        if input is not None:
            req["input"] = input
        if cwd is not None:
            req["cwd"] = cwd
        if then:
            req["then"] = dict(then)
        return _run_result(await self._request(req))

    async def chain(
        self, steps: Sequence[ChainStep], *, stop_on_failure: bool = True,
        timeout: float = 30.0, cwd: str | None = None,
    ) -> list[RunResult | ReaperError]:
        """Run `steps` one after another in one request (a CNI chain); the result of each step
        run, in order: a RunResult, or the ReaperError of a step that could not be started or
        timed out. With `stop_on_failure` the list ends at the first failed step."""
        req: dict[str, Any] = {
            "op": "chain", "stop_on_failure": stop_on_failure,
            "steps": [_step(s, timeout, cwd) for s in steps],
        }
        reply = await self._request(req)
        return [_step_error(r) if "error" in r else _run_result(r) for r in reply["results"]]

    async def watch(self, pid: int, start_time: int | None = None) -> WatchResult:
        """Have the reaper persist the exit status of `pid` (started at `start_time`, or the
        process now holding that pid, or the last one reaped with it)."""
        req: dict[str, Any] = {"op": "watch", "pid": pid}
        if start_time is not None:
            req["start_time"] = start_time
        reply = await self._request(req)
        return WatchResult(int(reply["pid"]), int(reply["start_time"]), bool(reply["child"]))

    async def wait_exit(self, pid: int, start_time: int, timeout: float) -> int | None:
        """The shell-style exit status of (pid, start_time) once reaped, or None when it did
        not exit within `timeout` or its status cannot be known."""
        reply = await self._request(
            {"op": "wait_exit", "pid": pid, "start_time": start_time, "timeout": timeout}
        )
        status = reply.get("status")
        return None if status is None else int(status)

    async def kill(self, pid: int, start_time: int, grace: float = 0.0
                   ) -> tuple[str, int | None]:
        """End (pid, start_time) through a pidfd, SIGTERM then SIGKILL after `grace` seconds
        (at once when 0), and wait for it: ("exited" | "gone" | "reused", its exit status or
        None when it cannot be known)."""
        reply = await self._request(
            {"op": "kill", "pid": pid, "start_time": start_time, "grace": grace})
        status = reply.get("status")
        return str(reply["ended"]), None if status is None else int(status)

    async def forget(self, pid: int, start_time: int) -> None:
        """Drop the recorded exit status of (pid, start_time) and its file."""
        await self._request({"op": "forget", "pid": pid, "start_time": start_time})

    async def ping(self) -> dict[str, Any]:
        """The reaper's pid and counters."""
        return await self._request({"op": "ping"})

    async def shutdown(self) -> None:
        """Ask the reaper to exit as soon as none of its children is alive."""
        with contextlib.suppress(ReaperError):
            await self._request({"op": "shutdown"}, reconnect=False)
        await self.close()

    async def close(self) -> None:
        """Disconnect. The reaper keeps running while it has children."""
        await self._drop_connection()

