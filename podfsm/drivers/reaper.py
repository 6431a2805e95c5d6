"""The reaper: a small helper process, one per run_dir, that runs the OCI runtime's commands and
reaps the pause processes they leave behind.

Why a separate process: the exit STATUS of a pause process can only be learned by its parent's
waitpid. `runc create` exits while the container's init lives on, so the init is reparented to the
nearest child subreaper. The embedding program must not become a subreaper (that would change how
its own orphans are reaped), must not install signal handlers and must not fork without exec. This
process may: it is single-threaded, sets PR_SET_CHILD_SUBREAPER on itself, runs every runtime
command as its own child and reaps every child on SIGCHLD.

Protocol: JSON lines over the unix socket `<run_dir>/reaper.sock`. Each request is an object with
`op` and an optional `id`; each reply carries the same `id` plus either the result fields or
`error` (a message). Requests on one connection may be answered out of order.

- `ping` -> {pid, runs, watched}: the reaper's pid, commands in flight, processes watched
- `run` {argv, env?, env_add?, input?, cwd?, mount_workaround?, timeout?, output_file?, then?}
  -> {rc, stdout, stderr}: `env` is the command's environment (default: the reaper's own,
  which it inherited from the client that started it), `env_add` variables set over it (the
  CNI_* ones: a plugin run then carries a few variables, not the caller's whole environment);
  `input` is the command's stdin. `output_file`: stdout and stderr go
  to that file (for `create`, whose container inherits the runtime's stdio); its tail is
  returned as `stderr`. Each command is its own process group; at `timeout` the whole group is
  killed and the reply is {error: "timeout after N s ..."}. A command whose client disconnects
  (the controller died) is killed the same way at once: nobody will act on its result, and the
  next controller's recovery deals with what it left.
  `then`, done only when the command succeeded (rc 0), so that one step is one request:
  {watch_pid_file, task_file?} (after `create`) reads the pid file, writes the task file
  {pid, start_time} and watches that process, adding `watched` {pid, start_time, child} to the
  reply; {forget: {pid, start_time}} (after `delete`) forgets that process's exit status. If
  that part fails the reply has `then_error` beside the command's result.
- `chain` {steps: [run request + prev_result?], stop_on_failure?} -> {results: [...]}: the
  steps one after another (a CNI ADD, CHECK or DEL chain in one request); a step with
  `prev_result` gets the previous step's output as the `prevResult` of its JSON input. With
  `stop_on_failure` (the default) it stops at the first failed step.
- `watch` {pid, start_time?} -> {pid, start_time, child}: persist this process's exit status
  to `<run_dir>/exits/<pid>-<start_time>` when it is reaped (also if it already was).
- `wait_exit` {pid, start_time, timeout} -> {status, exited}: `status` is the shell-style exit
  status (code, or 128+signal) as soon as it is reaped; null with exited=true when the process is
  gone but its status cannot be known (it was never our child); null with exited=false at timeout.
- `kill` {pid, start_time, grace?} -> {ended, status}: end that process through a pidfd
  (SIGTERM, SIGKILL after `grace` s) and wait for it: `ended` is "exited", "gone" (before) or
  "reused" (the pid names another process); `status` as `wait_exit` gives it.
- `forget` {pid, start_time} -> {}: drop the recorded status and its file.
- `shutdown` -> {}: exit as soon as no child is alive (pause processes are never abandoned).

The process exits by itself when it has no child, no client and nothing happened for
IDLE_EXIT_SECONDS, so nothing outlives the pods and clients that needed it.

This module is the helper process's request handlers and its entry point; its names, limits,
errors and spawn machinery are in :mod:`podfsm.drivers.reaperspawn` (importable from here); its
client, `ReaperClient`, lives in :mod:`podfsm.drivers.reaperclient`, as the namespace workers
(nsworker) and their pool (namespaces) do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from podfsm.drivers import linux

# isort: off
from podfsm.drivers.reaperspawn import (  # moved there; importable from here as before
    SOCKET_NAME as SOCKET_NAME, LOCK_NAME as LOCK_NAME, LOG_NAME as LOG_NAME,
    EXITS_DIR as EXITS_DIR, PROCESS_NAME as PROCESS_NAME, IDLE_EXIT_SECONDS as IDLE_EXIT_SECONDS,
    MAX_OUTPUT as MAX_OUTPUT, MAX_OUTPUT_HELD as MAX_OUTPUT_HELD, LINE_LIMIT as LINE_LIMIT,
    MAX_UNWATCHED_EXITS as MAX_UNWATCHED_EXITS, _SUN_PATH_MAX as _SUN_PATH_MAX,
    _PR_SET_NAME as _PR_SET_NAME, _CGROUP2_HYBRID_MOUNT as _CGROUP2_HYBRID_MOUNT, log as log,
    ReaperError as ReaperError, ReaperConnectionLost as ReaperConnectionLost,
    CommandTimedOut as CommandTimedOut, shell_status as shell_status, socket_path as socket_path,
    exit_file as exit_file, _is_mountpoint as _is_mountpoint,
    _mount_workaround as _mount_workaround, _NOFOLLOW as _NOFOLLOW, _descendants as _descendants,
    _atomic_write as _atomic_write, _tail_of_file as _tail_of_file, _Run as _Run,
    _read_memfd as _read_memfd, _which as _which, _DEFAULT_SIGNALS as _DEFAULT_SIGNALS,
    _set_process_name as _set_process_name, _acquire_lock as _acquire_lock, _answers as _answers,
    _bind as _bind, _Spawner as _Spawner,
)
# isort: on


class ReaperServer(_Spawner):
    """The reaper's event-loop side: create it, then `await serve(listening_socket)`."""

    def __init__(self, run_dir: str, idle_exit: float = IDLE_EXIT_SECONDS) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.idle_exit = idle_exit
        self._runs: dict[int, _Run] = {}
        self._exits: dict[tuple[int, int], int] = {}
        self._watched: set[tuple[int, int]] = set()
        self._waiters: dict[tuple[int, int], list[asyncio.Future[int | None]]] = {}
        self._clients = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._no_clients = asyncio.Event()
        self._no_clients.set()
        self._last_activity = time.monotonic()
        self._shutdown = False
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the environment commands inherit: a plain copy, as os.environ decodes and encodes
        #: every variable each time it is copied
        self._environ = dict(os.environ)
        self._size_check: asyncio.TimerHandle | None = None
        os.makedirs(os.path.join(self.run_dir, EXITS_DIR), mode=0o700, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, listen_sock: socket.socket) -> None:
        """Serve on the already bound and listening unix socket until idle or shut down."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_signal_handler(signal.SIGTERM, self._request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self._request_shutdown)
        server = await asyncio.start_unix_server(
            self._client, sock=listen_sock, limit=LINE_LIMIT
        )
        self._reap()  # children that exited before the handler was installed
        ticker = loop.call_later(0.5, self._tick)
        try:
            await self._done
        finally:
            ticker.cancel()
            server.close()
            # Clients still connected (after `shutdown`) see end of file and finish by
            # themselves, rather than being cancelled mid-read when the loop ends.
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._no_clients.wait()
            log.info("reaper exiting")

    def _request_shutdown(self) -> None:
        self._shutdown = True
        self._tick_now()

    def _has_children(self) -> bool:
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return True

    def _tick_now(self) -> None:
        if self._done is None or self._done.done():
            return
        if self._runs or self._has_children():
            return
        idle = time.monotonic() - self._last_activity >= self.idle_exit
        if self._shutdown or (self._clients == 0 and idle):
            # Unlink first: a client arriving now finds no socket and starts a new reaper, which
            # waits for our lock; it never connects to a reaper that is about to vanish.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.run_dir, SOCKET_NAME))
            self._done.set_result(None)

    def _tick(self) -> None:
        self._tick_now()
        if self._done is not None and not self._done.done() and self._loop is not None:
            self._loop.call_later(0.5, self._tick)

    # -- reaping -----------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                # WNOWAIT first: the zombie's /proc/<pid>/stat still tells its start time, which
                # tells this process from a later one with the same pid.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            run = self._runs.get(pid)
            # a command we ran needs no start time: its pid is ours until reaped just below
            start_time = 0 if run is not None else (linux.proc_start_time(pid) or 0)
            try:
                _, wait_status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            status = shell_status(wait_status)
            self._last_activity = time.monotonic()
            if run is not None:
                del self._runs[pid]
                if not self._runs and self._size_check is not None:
                    # nothing left to watch: no wake-up 0.1 s from now for nothing
                    self._size_check.cancel()
                    self._size_check = None
                self._finish_run(run, status)
            else:
                log.debug("reaped pid %d (start %d): %d", pid, start_time, status)
                self._record_exit((pid, start_time), status)

    def _record_exit(self, key: tuple[int, int], status: int) -> None:
        self._exits[key] = status
        if key in self._watched:
            self._persist(key, status)
        else:
            self._trim_unwatched()
        for fut in self._waiters.pop(key, []):
            if not fut.done():
                fut.set_result(status)

    def _trim_unwatched(self) -> None:
        unwatched = [k for k in self._exits if k not in self._watched]
        for key in unwatched[: max(0, len(unwatched) - MAX_UNWATCHED_EXITS)]:
            del self._exits[key]

    def _persist(self, key: tuple[int, int], status: int) -> None:
        try:
            _atomic_write(exit_file(self.run_dir, *key), f"{status}\n".encode())
        except OSError as exc:
            log.error("cannot persist exit status of pid %d: %s", key[0], exc)

    def _read_exit_file(self, key: tuple[int, int]) -> int | None:
        try:
            fd = os.open(exit_file(self.run_dir, *key), os.O_RDONLY | _NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                return int(f.read(64).strip())
        except (OSError, ValueError):  # missing, or not a file we wrote (ELOOP: a symlink)
            return None

    # -- watch / wait_exit -------------------------------------------------------------------

    def _watch(self, pid: int, start_time: int | None) -> dict[str, Any]:
        if start_time is None:
            start_time = linux.proc_start_time(pid)
            if start_time is None:
                # Already reaped: the most recent status recorded for that pid tells its start.
                known = [k for k in self._exits if k[0] == pid]
                if not known:
                    raise ValueError(f"no process {pid} and no recorded exit for it")
                start_time = known[-1][1]
        key = (pid, start_time)
        self._watched.add(key)
        if key in self._exits:
            self._persist(key, self._exits[key])
        child = key in self._exits or linux.parent_pid(pid) == os.getpid()
        return {"pid": pid, "start_time": start_time, "child": child}

    async def _wait_exit(self, pid: int, start_time: int, timeout: float) -> dict[str, Any]:
        assert self._loop is not None
        key = (pid, start_time)
        status = self._exits.get(key)
        if status is None:
            status = self._read_exit_file(key)
        if status is not None:
            return {"status": status, "exited": True}
        if linux.proc_start_time(pid) != start_time:
            # Gone (or the pid now names another process) and never reaped here: a previous
            # reaper was its parent, or pid 1 after that reaper died.
            return {"status": None, "exited": True}
        if linux.parent_pid(pid) == os.getpid():
            self._watched.add(key)
            fut: asyncio.Future[int | None] = self._loop.create_future()
            self._waiters.setdefault(key, []).append(fut)
            try:
                async with asyncio.timeout(timeout):
                    got = await fut
                return {"status": got, "exited": True}
            except TimeoutError:
                return {"status": None, "exited": False}
            finally:
                waiters = self._waiters.get(key)
                if waiters is not None and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[key]
        return await self._wait_foreign(pid, start_time, timeout)

    async def _wait_foreign(self, pid: int, start_time: int, timeout: float) -> dict[str, Any]:
        """A live process that is not our child: its pidfd tells when it exits, not how."""
        assert self._loop is not None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return {"status": None, "exited": True}
        try:
            if linux.proc_start_time(pid) != start_time:
                return {"status": None, "exited": True}
            with self._exit_of(pidfd) as exited:
                try:
                    async with asyncio.timeout(timeout):
                        await exited
                    return {"status": None, "exited": True}
                except TimeoutError:
                    return {"status": None, "exited": False}
        finally:
            os.close(pidfd)

    @contextlib.contextmanager
    def _exit_of(self, pidfd: int) -> Iterator[asyncio.Future[None]]:
        """A future done once the process of `pidfd` exits (the pidfd becomes readable)."""
        assert self._loop is not None
        exited: asyncio.Future[None] = self._loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        self._loop.add_reader(pidfd, on_exit)
        try:
            yield exited
        finally:
            self._loop.remove_reader(pidfd)

    async def _kill(self, pid: int, start_time: int, grace: float) -> dict[str, Any]:
        """End (pid, start_time) through a pidfd, so a reuse of its pid is never signalled:
        SIGTERM, then SIGKILL after `grace` seconds (at once when 0); then its status.

        {ended: "exited" | "gone" | "reused", status}: "exited" when it was running and has
        exited now (status its exit status when this process reaped it, else null), "gone"
        when it had exited already (status as `wait_exit` tells it), "reused" when the pid
        names another process now (status null). Raises if it survives SIGKILL.
        """
        assert self._loop is not None
        key = (pid, start_time)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return {"ended": "gone", **await self._wait_exit(pid, start_time, 0.0)}
        try:
            if linux.proc_start_time(pid) != start_time:
                if key in self._exits or self._read_exit_file(key) is not None:
                    return {"ended": "gone", **await self._wait_exit(pid, start_time, 0.0)}
                return {"ended": "reused", "status": None}
            with self._exit_of(pidfd) as ended:
                term = ((signal.SIGTERM, grace),) if grace > 0 else ()
                for sig, wait in (*term, (signal.SIGKILL, 10.0)):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, sig)
                    try:
                        async with asyncio.timeout(wait):
                            await asyncio.shield(ended)
                        break
                    except TimeoutError:
                        continue
                else:
                    raise RuntimeError(f"pid {pid} survived SIGKILL")
        finally:
            os.close(pidfd)
        # Exited: as our child, its status comes with the SIGCHLD that is on its way.
        return {"ended": "exited", **await self._wait_exit(pid, start_time, 1.0)}

    def _forget(self, pid: int, start_time: int) -> None:
        key = (pid, start_time)
        self._exits.pop(key, None)
        self._watched.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(exit_file(self.run_dir, pid, start_time))

    # -- clients -----------------------------------------------------------------------------

    async def _handle(self, req: Mapping[str, Any], owner: object = None) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "runs": len(self._runs), "watched": len(self._watched)}
        if op == "run":
            return await self._start_run(req, owner)
        if op == "chain":
            return await self._chain(req, owner)
        if op == "watch":
            st = req.get("start_time")
            return self._watch(int(req["pid"]), None if st is None else int(st))
        if op == "wait_exit":
            return await self._wait_exit(
                int(req["pid"]), int(req["start_time"]), float(req.get("timeout") or 0.0)
            )
        if op == "kill":
            return await self._kill(int(req["pid"]), int(req["start_time"]),
                                    float(req.get("grace") or 0.0))
        if op == "forget":
            self._forget(int(req["pid"]), int(req["start_time"]))
            return {}
        if op == "shutdown":
            self._request_shutdown()
            return {}
        raise ValueError(f"unknown op {op!r}")

    async def _answer(self, writer: asyncio.StreamWriter, req: dict[str, Any]) -> None:
        reply: dict[str, Any]
        try:
            reply = await self._handle(req, writer)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply["id"] = req.get("id")
        self._last_activity = time.monotonic()
        if not writer.is_closing():
            writer.write(json.dumps(reply).encode() + b"\n")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        self._no_clients.clear()
        self._writers.add(writer)
        self._last_activity = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request must be a JSON object")
                except ValueError as exc:
                    writer.write(json.dumps({"id": None, "error": f"bad request: {exc}"}).encode()
                                 + b"\n")
                    continue
                task = asyncio.create_task(self._answer(writer, req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            # A wait_exit of a departed client is pointless, and so is a `run`: its command is
            # killed (with its group) rather than left to act on a world nobody watches.
            self._abandon_runs(writer)
            for task in tasks:
                task.cancel()
            self._clients -= 1
            if not self._clients:
                self._no_clients.set()
            self._writers.discard(writer)
            self._last_activity = time.monotonic()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


# -- the process ------------------------------------------------------------------------------


def _daemon(run_dir: str, ready_fd: int | None, idle_exit: float) -> int:
    """The reaper proper. Reports "ok" or an error on `ready_fd`, then serves."""

    def report(msg: str) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, msg.encode() + b"\n")
                os.close(ready_fd)

    try:
        os.makedirs(run_dir, exist_ok=True)
        lock_fd = _acquire_lock(run_dir, wait=3.0)
        if lock_fd is None:
            report("running")
            return 0
        linux.set_child_subreaper()
        _set_process_name()
        sock = _bind(socket_path(run_dir))
        server = ReaperServer(run_dir, idle_exit=idle_exit)
        # Nothing here depends on the cwd (every path is absolute), and commands that ask for
        # "/" (CNI plugins) then need no step between fork and exec.
        os.chdir("/")
    except Exception as exc:
        report(f"error: {exc}")
        return 1
    log.info("reaper %d serving %s", os.getpid(), run_dir)
    report("ok")
    asyncio.run(server.serve(sock))
    os.close(lock_fd)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m podfsm.drivers.reaper --run-dir DIR`: start the reaper of DIR in the
    background and exit once it answers (0), or when another one already serves DIR (0)."""
    parser = argparse.ArgumentParser(prog="python -m podfsm.drivers.reaper")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--foreground", action="store_true", help="do not fork; log to stderr")
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT_SECONDS,
                        help="seconds without children, clients or requests before exiting")
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every reaped process")
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    run_dir = os.path.abspath(args.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if args.foreground:
        logging.basicConfig(level=level, format="%(asctime)s %(message)s")
        return _daemon(run_dir, None, args.idle_exit)

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        # The launcher: wait for the daemon's word, then leave it to be adopted; the caller
        # never has a long-lived child to reap.
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            word = r.read().decode().strip()
        if word in ("ok", "running"):
            return 0
        print(f"podfsm reaper failed to start: {word or 'no answer'}", file=sys.stderr)
        return 1
    os.close(read_fd)
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        log_fd = os.open(os.path.join(run_dir, LOG_NAME),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        logging.basicConfig(
            level=level, format="%(asctime)s reaper[%(process)d] %(levelname)s %(message)s"
        )
        rc = _daemon(run_dir, write_fd, args.idle_exit)
    except BaseException:
        logging.exception("reaper crashed")
        rc = 1
    # Never run the launcher's cleanup (atexit, buffered stdio) twice.
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
