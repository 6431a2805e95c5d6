"""Streaming exec and attach on real containers: `RuntimeExec`, a ProcessStreams over
`<runtime> exec --process SPEC --pid-file PID ID` run by podfsm (runc or crun), and
`attach`, conmon's attach socket and control FIFO (podfsm.drivers.conmonattach).

The exec'd process gets a spec built as the container's own process (the controller copies
config.json's `process`: user, env, cwd, capabilities, noNewPrivileges, rlimits, AppArmor and
SELinux labels) with the command and `terminal` changed. Its stdio:

- without a tty, pipes (stdin /dev/null unless asked for). The process is not in the
  runtime command's process group (measured: runc makes it a session leader, crun puts it in
  the session and group of a helper process of its own), so closing the session looks for
  its session and group itself (below);
- with a tty, as CRI-O does: podfsm opens a pty, makes its slave the controlling terminal of
  the runtime command (`setsid -c`) and runs `exec --tty` in the foreground; the runtime
  makes the container's own pty (on the container's /dev/pts), puts the host one in raw mode
  and copies between them, and passes a SIGWINCH from a resize of the host pty on to the
  container's. The exec'd process leads a session of its own there.

The runtime waits for the process and exits with its exit code (128+N after signal N).

A client that goes (or a daemon that stops) closes the session: every process of the exec'd
process's session and process group is SIGKILLed (found by the pid the runtime wrote to the
pid file, and only while that process is still the runtime command's child: never a reused
pid), then the runtime command's process group; the runtime command is reaped, the spec and
pid files removed and every descriptor closed (SubprocessStreams.close).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Sequence
from typing import Any

from podfsm.drivers import linux
from podfsm.drivers.conmonattach import ConmonAttach
from podfsm.drivers.procstreams import SubprocessStreams

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RuntimeExec(SubprocessStreams):
    """One `<runtime> exec` session (see the module's docstring); `run()` starts it."""

    spec_path = ""
    pid_path = ""

    @classmethod
    async def run(cls, runtime_argv: Sequence[str], container_id: str,
                  process: dict[str, Any], workdir: str, *, tty: bool,
                  stdin: bool) -> RuntimeExec:
        """Start `process` (an OCI process object) in the container. `runtime_argv` is the
        runtime with its global options (`runc --root ROOT`); the spec and pid files go in
        `workdir` (the container's bundle) and are removed when the session ends."""
        fd, spec_path = tempfile.mkstemp(prefix="exec-", suffix=".json", dir=workdir)
        pid_path = spec_path[:-len(".json")] + ".pid"
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**process, "terminal": tty}, f)
            argv = [*runtime_argv, "exec", "--process", spec_path, "--pid-file", pid_path]
            if tty:
                argv.append("--tty")
            s = await cls.start([*argv, container_id], tty=tty, stdin=stdin,
                                env={"PATH": _PATH})
        except BaseException:
            _unlink(spec_path, pid_path)
            raise
        assert isinstance(s, RuntimeExec)
        s.spec_path, s.pid_path = spec_path, pid_path
        return s

    def exec_pid(self) -> int | None:
        """The exec'd process's pid, while it is the runtime command's child."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0 or linux.parent_pid(pid) != self.proc.pid:
            return None
        return pid

    def _kill_exec(self) -> None:
        """SIGKILL the exec'd process and every process of its session or process group."""
        pid = self.exec_pid()
        if pid is None:
            return
        fields = linux.proc_stat(pid)
        if fields is None:
            return
        groups = {pid, int(fields[2])} - {self.proc.pid}
        victims = {pid}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            st = linux.proc_stat(int(name))
            if st is not None and (int(st[3]) == pid or int(st[2]) in groups):
                victims.add(int(name))
        victims.discard(os.getpid())
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    async def wait(self) -> int:
        rc = await super().wait()
        _unlink(self.spec_path, self.pid_path)
        return rc

    async def close(self) -> None:
        if self.proc.returncode is None:
            self._kill_exec()
        await super().close()
        _unlink(self.spec_path, self.pid_path)


async def attach(bundle: str) -> ConmonAttach:
    """Attach to the container's stdio through its conmon (`<bundle>/attach`, resize through
    `<bundle>/ctl`). OSError when nothing answers there."""
    return await ConmonAttach.open(os.path.join(bundle, "attach"), os.path.join(bundle, "ctl"))


def _unlink(*paths: str) -> None:
    for path in paths:
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
