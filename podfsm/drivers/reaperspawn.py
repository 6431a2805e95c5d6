"""The reaper's spawn machinery, apart from its request handlers (:mod:`podfsm.drivers.reaper`):
its names, limits and errors, how a command is started (own process group, output in memfds or
a file, the mount workaround), killed at its timeout or when its output floods, and finished
when it is reaped; and the pieces of the process itself (its lock, its socket, its name).

Everything here is importable from :mod:`podfsm.drivers.reaper` as before.
"""

from __future__ import annotations

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
import time
from collections.abc import Mapping
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


class _Spawner:
    """The `run` and `chain` part of :class:`podfsm.drivers.reaper.ReaperServer`, its base: the
    server's state it uses is declared here, and set by the server's __init__."""

    run_dir: str
    _runs: dict[int, _Run]
    _loop: asyncio.AbstractEventLoop | None
    _environ: dict[str, str]
    _size_check: asyncio.TimerHandle | None

    def _watch(self, pid: int, start_time: int | None) -> dict[str, Any]:
        raise NotImplementedError  # the server's

    def _forget(self, pid: int, start_time: int) -> None:
        raise NotImplementedError  # the server's

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
