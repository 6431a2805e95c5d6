"""Containers under a monitor that outlives podfsm: Debian's conmon (CRI-O's), one per
container, started through the reaper (so it is reparented to the reaper, never to podfsm).

conmon runs the runtime's `create` with the container's stdio on pipes it holds, writes the CRI
log (`<RFC3339Nano> stdout|stderr P|F text`) at the container's log path, reopens it when told
through its control FIFO (`ctl`: "2 0 0\n"), and when the container exits writes the exit code
to `<exit dir>/<id>` (and `oom` in its persist directory after an OOM kill), then exits. So no
output and no exit code depends on podfsm being alive.

It reports the container's pid through a sync pipe (`_OCI_SYNCPIPE`): here a FIFO in the
container's directory, which a `sh` opens as fd 3 before it execs conmon (the reaper passes no
descriptor to its commands). For crun, conmon itself runs in the reaper's private mount
namespace without the hybrid cgroup2 mount, so the `crun create` it runs works there.

Every container of a controller lives under its own runtime root,
`<run_dir>/containers/<runtime>`, apart from the pauses' (whose orphan collection must never
see a container).

ExecSync runs `<runtime> exec` through the reaper with the call's timeout: at the timeout the
reaper kills the command's process group, which holds the exec'd process too (runc and crun
start it without a session of its own when there is no terminal).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import time
from datetime import UTC, datetime
from typing import Any

import anyio

from podfsm.core.containerrecords import Exit
from podfsm.core.errors import ExecTimeout, PrerequisiteMissing, StepFailed
from podfsm.core.records import TaskInfo
from podfsm.drivers import linux
from podfsm.drivers.execstreams import RuntimeExec
from podfsm.drivers.reaper import ReaperError
from podfsm.drivers.reaperclient import ReaperClient
from podfsm.drivers.runtime import wait_process_exit

STEP = "monitor"
CONMON = "/usr/bin/conmon"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SH_WRAPPER = 'exec 3>"$0" && exec "$@"'
#: message types of conmon's control FIFO
_REOPEN_LOGS = 2


class ContainerRuntime:
    """One runtime handler (runc or crun) for containers, each under a conmon."""

    def __init__(self, name: str, run_dir: str, reaper: ReaperClient, binary: str,
                 conmon: str = CONMON, command_timeout: float = 60.0) -> None:
        self.name = name
        self.binary = binary
        self.reaper = reaper
        self.root = os.path.join(run_dir, "containers", name)
        self.conmon = conmon
        self.command_timeout = command_timeout

    def check(self) -> None:
        if not os.access(self.conmon, os.X_OK):
            raise PrerequisiteMissing(f"conmon not found at {self.conmon}: install the Debian "
                                      "package 'conmon'")
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", self.root, *args]

    def exists(self, container_id: str) -> bool:
        return os.path.isdir(os.path.join(self.root, container_id))

    def list(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []

    # -- create ------------------------------------------------------------------------------

    async def create(self, container_id: str, name: str, bundle: str, log_path: str, *,
                     tty: bool, stdin: bool, stdin_once: bool = False
                     ) -> tuple[TaskInfo, TaskInfo]:
        """Start conmon, which runs `create`; the container's init and conmon's TaskInfo.
        StepFailed with the runtime's message when create fails (conmon then exits).

        With `stdin`, conmon holds a pipe to the container's stdin for attached clients; as
        CRI-O does, `--leave-stdin-open` keeps it open when a client ends its stdin unless
        `stdin_once` (then the first attached client's end of stdin is the container's)."""
        exit_dir = os.path.join(bundle, "exit")
        os.makedirs(exit_dir, mode=0o700, exist_ok=True)
        sync = os.path.join(bundle, "sync")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sync)
        os.mkfifo(sync, 0o600)
        rfd = os.open(sync, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            argv = [
                "/bin/sh", "-c", _SH_WRAPPER, sync, self.conmon, "--api-version", "1",
                "-c", container_id, "-u", container_id, "-n", name, "-r", self.binary,
                "--runtime-arg", "--root", "--runtime-arg", self.root,
                "-b", bundle, "-p", os.path.join(bundle, "pid"),
                "-P", os.path.join(bundle, "conmon.pid"),
                "--exit-dir", exit_dir, "--persist-dir", exit_dir,
                "-l", f"k8s-file:{log_path}", "--socket-dir-path", bundle, "--full-attach",
                "--log-level", "error",
            ]
            if tty:
                argv.append("-t")
            if stdin:
                argv.append("-i")
                if not stdin_once:
                    argv.append("--leave-stdin-open")
            try:
                res = await self.reaper.run(
                    argv, env={"PATH": _PATH, "_OCI_SYNCPIPE": "3"},
                    mount_workaround=self.name == "crun", timeout=self.command_timeout,
                    output_file=os.path.join(bundle, "conmon.log"))
            except ReaperError as exc:
                raise StepFailed(STEP, f"conmon could not be started: {exc}") from exc
            if res.rc != 0:
                raise StepFailed(STEP, f"conmon failed: {res.stderr.strip()[-600:]}")
            line = await _read_line(rfd, self.command_timeout)
        finally:
            os.close(rfd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sync)
        try:
            msg = json.loads(line) if line else {}
        except ValueError:
            msg = {}
        pid = int(msg.get("data", -1)) if isinstance(msg, dict) else -1
        if pid <= 0:
            text = (msg.get("message") if isinstance(msg, dict) else "") or _tail(
                os.path.join(bundle, "conmon.log"))
            raise StepFailed("runtime", f"{self.name} create failed: {str(text).strip()}")
        monitor = _task_of_pidfile(os.path.join(bundle, "conmon.pid"))
        start = linux.proc_start_time(pid)
        if start is None or monitor is None:
            raise StepFailed(STEP, f"the container's process {pid} or its monitor is gone "
                                   "right after create")
        return TaskInfo(pid=pid, start_time=start), monitor

    # -- runtime verbs -----------------------------------------------------------------------

    async def _run(self, *args: str, timeout: float | None = None) -> tuple[int, str, str]:
        try:
            res = await self.reaper.run(self._argv(*args), env={"PATH": _PATH},
                                        timeout=timeout or self.command_timeout)
        except ReaperError as exc:
            raise StepFailed("runtime", f"{self.name} {args[0]} failed: {exc}") from exc
        return res.rc, res.stdout, res.stderr

    async def start(self, container_id: str) -> None:
        rc, _, err = await self._run("start", container_id)
        if rc != 0:
            raise StepFailed("runtime", f"{self.name} start failed: {err.strip()[-600:]}")

    async def kill(self, container_id: str, sig: int) -> None:
        """Signal the container's init (all its processes with SIGKILL). A container that is
        gone or stopped is not an error."""
        args = ["kill"]
        if sig == signal.SIGKILL:
            args.append("--all")
        rc, _, err = await self._run(*args, container_id, str(sig))
        if rc != 0 and self.exists(container_id) and "not running" not in err \
                and "container not running" not in err and "stopped" not in err:
            raise StepFailed("runtime", f"{self.name} kill failed: {err.strip()[-600:]}")

    async def delete(self, container_id: str) -> None:
        """`delete --force`: the container's processes are killed, its state and cgroup
        removed. Idempotent."""
        if not self.exists(container_id):
            return
        rc, _, err = await self._run("delete", "--force", container_id)
        if rc != 0 and self.exists(container_id):
            raise StepFailed("runtime", f"{self.name} delete failed: {err.strip()[-600:]}")

    async def state(self, container_id: str) -> str | None:
        """The runtime's status of the container (created, running, stopped), None if it
        has no such container."""
        if not self.exists(container_id):
            return None
        rc, out, _ = await self._run("state", container_id)
        if rc != 0:
            return None
        try:
            status = json.loads(out).get("status")
        except (ValueError, AttributeError):
            return None
        return str(status) if status else None

    async def exec_sync(self, container_id: str, process: dict[str, Any],
                        bundle: str, timeout: float) -> tuple[int, str, str]:
        """Run `process` in the container; (exit code, stdout, stderr). ExecTimeout when it
        outlives `timeout` seconds (0: the default command timeout): it is killed then."""
        fd, path = _tempfile(bundle, "exec-", ".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(process, f)
            try:
                res = await self.reaper.run(
                    self._argv("exec", "--process", path, container_id), env={"PATH": _PATH},
                    timeout=timeout if timeout > 0 else self.command_timeout)
            except ReaperError as exc:
                if "timeout" in str(exc) or "timed out" in str(exc):
                    raise ExecTimeout(f"command timed out after {timeout:g} s and was "
                                      "killed") from None
                raise StepFailed("exec", f"{self.name} exec failed: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return res.rc, res.stdout, res.stderr

    async def exec_stream(self, container_id: str, process: dict[str, Any], bundle: str, *,
                          tty: bool, stdin: bool) -> RuntimeExec:
        """Start `process` in the container for a streaming session (podfsm.drivers.
        execstreams): the caller pumps its stdio and closes it."""
        return await RuntimeExec.run(self._argv(), container_id, process, bundle, tty=tty,
                                     stdin=stdin)

    async def update(self, container_id: str, resources: dict[str, Any], bundle: str) -> None:
        """`update --resources`: the container's cgroup limits, changed in place."""
        fd, path = _tempfile(bundle, "resources-", ".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(resources, f)
            rc, _, err = await self._run("update", "--resources", path, container_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if rc != 0:
            raise StepFailed("runtime", f"{self.name} update failed: {err.strip()[-600:]}")

    # -- the monitor's reports ---------------------------------------------------------------

    @staticmethod
    def exit_of(bundle: str, container_id: str) -> Exit | None:
        """What conmon recorded of the container's exit, or None when it has not exited."""
        path = os.path.join(bundle, "exit", container_id)
        try:
            st = os.stat(path)
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            return None
        if not text.lstrip("-").isdigit():
            return None
        oom = os.path.exists(os.path.join(bundle, "exit", "oom")) or os.path.exists(
            os.path.join(bundle, "oom"))
        return Exit(code=int(text), at=datetime.fromtimestamp(st.st_mtime, UTC), oom=oom)

    @staticmethod
    async def wait_exit(task: TaskInfo) -> None:
        """Return once the process `task` (the container's monitor) has exited."""
        await wait_process_exit(task)

    @staticmethod
    def alive(task: TaskInfo) -> bool:
        return linux.proc_start_time(task.pid) == task.start_time

    @staticmethod
    async def reopen_log(bundle: str, log_path: str, within: float = 5.0) -> None:
        """Tell conmon to reopen the log file at its path (after a rotation), and return once
        the file is there again (conmon reads its control FIFO in its own time; CRI-O waits
        the same way)."""
        path = os.path.join(bundle, "ctl")
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise StepFailed(STEP, f"{path} is not conmon's control FIFO")
            os.write(fd, f"{_REOPEN_LOGS} 0 0\n".encode())
        finally:
            os.close(fd)
        deadline = time.monotonic() + within
        while not os.path.exists(log_path):
            if time.monotonic() > deadline:
                raise StepFailed(STEP, f"conmon did not reopen {log_path} within {within:g} s")
            await anyio.sleep(0.005)


async def _read_line(fd: int, timeout: float) -> str:
    """The first line written to the non-blocking FIFO `fd` ("" at EOF or timeout)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        with anyio.move_on_after(left):
            await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                continue
            raise
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace").split("\n", 1)[0]


def _task_of_pidfile(path: str) -> TaskInfo | None:
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    start = linux.proc_start_time(pid)
    return None if start is None else TaskInfo(pid=pid, start_time=start)


def _tail(path: str, limit: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _tempfile(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)


