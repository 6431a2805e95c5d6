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

This module is the helper process and its protocol (names, limits, errors); its client,
`ReaperClient`, lives in :mod:`podfsm.drivers.reaperclient`, as the namespace workers
(nsworker) and their pool (namespaces) do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from podfsm.drivers import linux

SOCKET_NAME = "reaper.sock"
LOCK_NAME = "reaper.lock"
LOG_NAME = "reaper.log"
EXITS_DIR = "exits"
PROCESS_NAME = b"podfsm-reaper"
IDLE_EXIT_SECONDS = 5.0
#: Most of a command's output kept for the reply; runtime errors are in the last lines.
MAX_OUTPUT = 64 * 1024
#: A command whose output (held in memory, in memfds) grows past this is killed: the runtime
#: and the plugins write a few kilobytes; one that floods must not fill the host's memory.
MAX_OUTPUT_HELD = 16 * 1024 * 1024
#: StreamReader line limit: replies carry up to two MAX_OUTPUT blobs, JSON-escaped.
LINE_LIMIT = 4 * 1024 * 1024
#: Exit statuses of processes nobody asked about (the runtime's helpers), kept in case a
#: `watch` or `wait_exit` for them arrives late.
MAX_UNWATCHED_EXITS = 1024
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL
_PR_SET_NAME = 15
_CGROUP2_HYBRID_MOUNT = "/sys/fs/cgroup/unified"

log = logging.getLogger("podfsm.reaper")


class ReaperError(Exception):
    """The reaper refused or failed a request, or could not be reached."""


class ReaperConnectionLost(ReaperError):
    """The connection to the reaper ended before the reply arrived."""


class CommandTimedOut(ReaperError):
    """A command ran past its timeout and was killed with its process group."""

    def __init__(self, message: str, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


def shell_status(wait_status: int) -> int:
    """A waitpid status as a shell reports it: the exit code, or 128 + the signal number."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


def socket_path(run_dir: str) -> str:
    """The reaper's socket for `run_dir`; ValueError if the path is too long for a unix socket."""
    path = os.path.join(os.path.abspath(run_dir), SOCKET_NAME)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"reaper socket path {path!r} is longer than {_SUN_PATH_MAX} bytes: "
            "use a shorter run_dir"
        )
    return path


def exit_file(run_dir: str, pid: int, start_time: int) -> str:
    """Where the exit status of process (pid, start_time) is persisted."""
    return os.path.join(run_dir, EXITS_DIR, f"{pid}-{start_time}")


def _is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def _mount_workaround() -> None:
    """preexec_fn for crun: a private mount namespace without the hybrid cgroup2 mount.

    crun 1.8.1 refuses to run at all when /sys/fs/cgroup is v1 plus a cgroup2 mount whose
    cgroup.controllers is not empty ("cgroups in hybrid mode not supported"). Hiding that mount
    in a namespace of the command's own changes nothing for anybody else. Runs between fork and
    exec, which is safe only because this process is single-threaded.
    """
    linux.unshare(linux.CLONE_NEWNS)
    cgroup_root = os.path.dirname(_CGROUP2_HYBRID_MOUNT)
    if _is_mountpoint(cgroup_root):
        # Only the cgroup tree is cut off from the host (so the unmount below cannot propagate
        # back through a shared parent); the rest keeps the host's propagation, as runc's
        # does: a container's bidirectional (rshared) and host-to-container (rslave) mounts
        # work on crun too.
        linux.mount(None, cgroup_root, None, linux.MS_REC | linux.MS_PRIVATE)
    else:
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    if _is_mountpoint(_CGROUP2_HYBRID_MOUNT):
        linux.umount2(_CGROUP2_HYBRID_MOUNT, linux.MNT_DETACH)


#: Every file the reaper opens in run_dir: a symlink planted there is never followed.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _descendants(pid: int) -> set[int]:
    """`pid` and every live descendant, through /proc/<pid>/task/<tid>/children."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in found:
            continue
        found.add(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError), \
                    open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                todo.extend(int(c) for c in f.read().split())
    return found


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crash (unlink never follows a symlink)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _tail_of_file(path: str) -> str:
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | _NOFOLLOW), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - MAX_OUTPUT))
            return f.read().decode("utf-8", "replace")
    except OSError:  # missing, or a symlink (ELOOP)
        return ""


@dataclass
class _Run:
    """One `run` command in flight."""

    pid: int
    argv: list[str]
    future: asyncio.Future[dict[str, Any]]
    output_file: str | None
    #: memfds holding the command's stdout and stderr (None with output_file)
    out_fd: int | None = None
    err_fd: int | None = None
    timer: asyncio.TimerHandle | None = None
    timed_out: float | None = None  # the timeout, once it killed the command
    flooded: bool = False  # killed because its output outgrew MAX_OUTPUT_HELD
    #: the connection that asked for it (its departure kills the command)
    owner: object = None
    #: set once reaped: its pid may then name another process
    returncode: int | None = None
    #: the Popen object of a command started with a preexec step (it must never reap it)
    popen: subprocess.Popen[bytes] | None = None
    #: what to do once it exited with rc 0: read the pid file and watch that process (create),
    #: or forget a process's exit status (delete)
    then: Mapping[str, Any] = field(default_factory=dict)


def _read_memfd(fd: int | None, limit: int = MAX_OUTPUT) -> bytes:
    """The last `limit` bytes a command wrote to its memfd; closes it."""
    if fd is None:
        return b""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit))
    finally:
        os.close(fd)


def _which(name: str, env: Mapping[str, str] | None) -> str:
    """`name` as the child's PATH finds it (what Popen and execvpe do); itself when it holds a
    slash or is found nowhere (then the spawn fails with the usual ENOENT)."""
    if "/" in name:
        return name
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    return shutil.which(name, path=path) or name


#: Signals Python ignores (SIGPIPE) or may have set to be ignored: a spawned command starts
#: with their default action, as Popen's restore_signals gives.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class ReaperServer:
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

    # -- run ---------------------------------------------------------------------------------

    def _start_run(self, req: Mapping[str, Any],
                   owner: object = None) -> asyncio.Future[dict[str, Any]]:
        """Start the command; its future gets {rc, stdout, stderr} once it is reaped.

        The command is spawned with posix_spawn (vfork + exec: the cheapest way to start a
        process from Python; Popen costs this process about twice the CPU per command), in its
        own process group, with stdin from a memfd or /dev/null and stdout and stderr into
        memfds or `output_file`. Nothing is read while it runs: no pipe, so no wake-up per
        chunk of output and nothing a grandchild holding the output open can block; the
        output is read once, when SIGCHLD says the command exited (the tick kills a command
        whose output outgrows MAX_OUTPUT_HELD). Only a command that needs a step between fork
        and exec (crun's private mount namespace) goes through Popen.
        """
        assert self._loop is not None
        argv = [str(a) for a in req["argv"]]
        if not argv:
            raise ValueError("argv is empty")
        raw_env = req.get("env")
        env = None if raw_env is None else {str(k): str(v) for k, v in raw_env.items()}
        env_add = req.get("env_add")
        if env_add:
            env = {**(self._environ if env is None else env),
                   **{str(k): str(v) for k, v in env_add.items()}}
        output_file = req.get("output_file")
        stdin_data = req.get("input")
        cwd = req.get("cwd")
        timeout = float(req.get("timeout") or 30.0)
        fds: list[int] = []  # ours to close once the child has them
        try:
            if stdin_data is not None:
                # a memfd, not a pipe: the whole input is there at once and nothing can block
                stdin = os.memfd_create("podfsm-stdin", os.MFD_CLOEXEC)
                fds.append(stdin)
                os.write(stdin, str(stdin_data).encode())
                os.lseek(stdin, 0, os.SEEK_SET)
            else:
                stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(stdin)
            out_fd = err_fd = None
            if output_file is not None:
                stdout = stderr = os.open(
                    output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o640
                )
                fds.append(stdout)
            else:
                stdout = out_fd = os.memfd_create("podfsm-stdout", os.MFD_CLOEXEC)
                stderr = err_fd = os.memfd_create("podfsm-stderr", os.MFD_CLOEXEC)
            popen: subprocess.Popen[bytes] | None = None
            try:
                if req.get("mount_workaround") or (cwd is not None and cwd != os.getcwd()):
                    popen = subprocess.Popen(
                        argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                        preexec_fn=_mount_workaround if req.get("mount_workaround") else None,
                        close_fds=True, process_group=0,
                    )
                    pid = popen.pid
                else:
                    # the cwd asked for is this process's own (the reaper works in "/")
                    pid = os.posix_spawn(
                        _which(argv[0], env), argv, self._environ if env is None else env,
                        file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0),
                                      (os.POSIX_SPAWN_DUP2, stdout, 1),
                                      (os.POSIX_SPAWN_DUP2, stderr, 2)],
                        # its own group, so a timeout kills what it started too
                        setpgroup=0, setsigdef=_DEFAULT_SIGNALS,
                    )
            except BaseException:
                for fd in (out_fd, err_fd):
                    if fd is not None:
                        os.close(fd)
                raise
        finally:
            for fd in fds:
                os.close(fd)
        run = _Run(pid=pid, argv=argv, future=self._loop.create_future(),
                   output_file=output_file, out_fd=out_fd, err_fd=err_fd, owner=owner,
                   popen=popen, then=req.get("then") or {})
        run.timer = self._loop.call_later(timeout, self._run_timed_out, run, timeout)
        self._runs[pid] = run
        if self._size_check is None:
            self._size_check = self._loop.call_later(0.1, self._check_output_sizes)
        return run.future

    def _check_output_sizes(self) -> None:
        """Every 0.1 s while commands run (most end sooner, so this rarely wakes anybody): kill,
        with its group, a command whose output outgrew MAX_OUTPUT_HELD."""
        self._size_check = None
        if not self._runs or self._loop is None:
            return
        self._size_check = self._loop.call_later(0.1, self._check_output_sizes)
        for run in list(self._runs.values()):
            if run.returncode is not None or run.flooded:
                continue
            size = 0
            for fd in (run.out_fd, run.err_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        size += os.fstat(fd).st_size
            if size > MAX_OUTPUT_HELD:
                run.flooded = True
                log.warning("command %s wrote over %d bytes: killed", run.argv, MAX_OUTPUT_HELD)
                self._kill_group(run)

    def _run_timed_out(self, run: _Run, timeout: float) -> None:
        run.timed_out = timeout
        self._kill_group(run)
        log.warning("command %s timed out after %.1fs", run.argv, timeout)

    @staticmethod
    def _kill_group(run: _Run) -> None:
        """SIGKILL the command's process group and every process it started, also those that
        left the group (`crun create`'s child calls setsid: killed halfway, it would wait
        forever for a parent that is gone). Only while the command is not reaped yet: its pid
        (the group's id) cannot have been reused. The tree is frozen first, so nothing forks
        out of it between the listing and the kill."""
        if run.returncode is not None:
            return
        tree = _descendants(run.pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        for pid in _descendants(run.pid) | tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)

    def _abandon_runs(self, owner: object) -> None:
        """The client that asked for these commands is gone: kill them."""
        for run in list(self._runs.values()):
            if run.owner is owner and run.returncode is None:
                log.warning("client left: killing command %s", run.argv)
                self._kill_group(run)

    def _finish_run(self, run: _Run, status: int) -> None:
        run.returncode = status
        if run.popen is not None:
            # Popen must not try to reap this pid again (it would steal another child's status
            # if the pid were reused).
            run.popen.returncode = status
        if run.timer is not None:
            run.timer.cancel()
        stdout = _read_memfd(run.out_fd)
        stderr_text = _read_memfd(run.err_fd).decode("utf-8", "replace")
        if run.output_file is not None:
            stderr_text = _tail_of_file(run.output_file)
        if run.future.done():
            return
        if run.flooded:
            run.future.set_exception(ReaperError(
                f"{run.argv!r} wrote more than {MAX_OUTPUT_HELD} bytes of output and was "
                f"killed with its process group; its last output: {stderr_text[-600:]}"))
            return
        if run.timed_out is not None:
            run.future.set_exception(CommandTimedOut(
                f"timeout after {run.timed_out:g} s: {run.argv!r} was killed with its "
                f"process group; output: {stderr_text}", run.timed_out))
            return
        reply: dict[str, Any] = {
            "rc": status, "stdout": stdout.decode("utf-8", "replace"), "stderr": stderr_text}
        if status == 0 and run.then:
            try:
                reply.update(self._then(run.then))
            except Exception as exc:
                reply["then_error"] = f"{type(exc).__name__}: {exc}"
        run.future.set_result(reply)

    def _then(self, then: Mapping[str, Any]) -> dict[str, Any]:
        """The step a client asked to follow a successful command in the same request.

        `watch_pid_file` (after `create`): read the pid the runtime wrote, write the task file
        {pid, start_time} (before anything is persisted for it: a crash in between leaves a
        task file by which the process is forgotten later), then watch it.
        `forget` {pid, start_time} (after `delete`): drop that process's exit status.
        """
        out: dict[str, Any] = {}
        pid_file = then.get("watch_pid_file")
        if pid_file is not None:
            with os.fdopen(os.open(str(pid_file), os.O_RDONLY | _NOFOLLOW), "rb") as f:
                pid = int(f.read(64).strip())
            # None when the pause already died: the reaped status then tells its start time
            start_time = linux.proc_start_time(pid)
            task_file = then.get("task_file")
            if task_file is not None and start_time is not None:
                _atomic_write(str(task_file), json.dumps(
                    {"pid": pid, "start_time": start_time}).encode())
            watched = self._watch(pid, start_time)
            if task_file is not None and start_time is None:
                _atomic_write(str(task_file), json.dumps(
                    {"pid": pid, "start_time": watched["start_time"]}).encode())
            out["watched"] = watched
        forget = then.get("forget")
        if forget is not None:
            self._forget(int(forget["pid"]), int(forget["start_time"]))
            out["forgot"] = True
        return out

    async def _chain(self, req: Mapping[str, Any], owner: object) -> dict[str, Any]:
        """Run `steps` one after another (a CNI chain: one request instead of one per plugin).

        A step with `prev_result` gets the previous step's output (a JSON object) as the
        `prevResult` of its input. With `stop_on_failure` the chain ends at the first command
        that fails, or whose output the next step cannot take; without it (CNI DEL) every
        step runs. Replies {results: [{rc, stdout, stderr} | {error}]}, one per step run.
        """
        stop = bool(req.get("stop_on_failure", True))
        results: list[dict[str, Any]] = []
        prev: Any = None
        steps = list(req["steps"])
        for k, step in enumerate(steps):
            sreq = dict(step)
            if step.get("prev_result") and prev is not None:
                cfg = json.loads(str(step["input"]))
                cfg["prevResult"] = prev
                sreq["input"] = json.dumps(cfg)
            try:
                res = await self._start_run(sreq, owner)
            except Exception as exc:
                failed: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"}
                if isinstance(exc, CommandTimedOut):
                    failed["timed_out"] = exc.timeout
                results.append(failed)
                if stop:
                    break
                continue
            results.append(res)
            if res["rc"] != 0:
                if stop:
                    break
                continue
            if k + 1 < len(steps) and steps[k + 1].get("prev_result"):
                try:
                    prev = json.loads(res["stdout"])
                except ValueError:
                    prev = None
                if not isinstance(prev, dict):
                    break  # the client names what was wrong with this output
        return {"results": results}

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


def _set_process_name() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)


def _acquire_lock(run_dir: str, wait: float) -> int | None:
    """flock the run_dir's reaper lock, held for the reaper's lifetime; None when another
    reaper holds it and serves."""
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            # The holder either serves (then use it) or is starting or exiting (then wait for
            # its socket or its lock).
            if _answers(socket_path(run_dir)) or time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _bind(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: we hold the lock, so no live reaper owns it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


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
