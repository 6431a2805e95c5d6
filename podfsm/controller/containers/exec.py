"""exec_sync, container_logs, reopen_container_log, update_container_resources."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from podfsm.controller.containers.query import QueryContainers
from podfsm.core.containerrecords import ContainerRecord
from podfsm.core.containerstates import ContainerState
from podfsm.core.errors import ContainerPrecondition, StepFailed
from podfsm.core.spec import LinuxContainerResources
from podfsm.drivers.base import ProcessStreams


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class ExecContainers(QueryContainers):

    def _running(self, container_id: str, what: str) -> ContainerRecord:
        rec = self._ctr(container_id).record
        if rec.state is not ContainerState.RUNNING:
            raise ContainerPrecondition(f"container {rec.id} is {rec.state.value}, not "
                                        f"Running: cannot {what}")
        return rec

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float = 0
                        ) -> ExecResult:
        """Run `cmd` in the running container as its own process runs (user, env, cwd,
        capabilities) and return its exit code and output. With `timeout` > 0 the command
        is killed at the timeout and ExecTimeout is raised."""
        if not cmd:
            raise ContainerPrecondition("exec needs a command")
        rec = self._running(container_id, "exec")
        process = self._exec_process(rec, cmd, tty=False)
        rc, out, err = await self._cd.exec_sync(rec.runtime, rec.id, process, timeout)
        return ExecResult(rc, out, err)

    def _exec_process(self, rec: ContainerRecord, cmd: Sequence[str], *, tty: bool
                      ) -> dict[str, Any]:
        """The OCI process of an exec: the container's own (user, env, cwd, capabilities,
        noNewPrivileges, rlimits, AppArmor and SELinux labels) running `cmd`."""
        spec = self._cd.read_spec(rec.id)
        if spec is None or not isinstance(spec.get("process"), dict):
            raise StepFailed("exec", f"container {rec.id} has no readable OCI spec")
        process = dict(spec["process"])
        process.update(args=list(cmd), terminal=tty)
        process.pop("oomScoreAdj", None)
        process.pop("consoleSize", None)
        return process

    def check_exec(self, container_id: str, cmd: Sequence[str] | None = None) -> str:
        """The id of the container an exec (`cmd`) or attach (None) may reach now: it
        exists (ContainerNotFound) and runs (ContainerPrecondition); an exec names a
        command."""
        if cmd is not None and not cmd:
            raise ContainerPrecondition("exec needs a command")
        return self._running(container_id, "exec" if cmd is not None else "attach").id

    async def exec_stream(self, container_id: str, cmd: Sequence[str], *, tty: bool,
                          stdin: bool, stdout: bool, stderr: bool) -> ProcessStreams:
        """Start `cmd` in the running container for a streaming session (the streaming
        face's ContainerStreams): on a tty or pipes; the session's close() kills and reaps
        whatever of it still runs."""
        rec = self._ctr(self.check_exec(container_id, cmd)).record
        process = self._exec_process(rec, cmd, tty=tty)
        return await self._cd.exec_stream(rec.runtime, rec.id, process, tty=tty, stdin=stdin)

    async def attach_stream(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                            stderr: bool) -> ProcessStreams:
        """Attach to the running container's stdio through its conmon (the first client to
        end its stdin closes the container's when it was created with stdin_once)."""
        rec = self._ctr(self.check_exec(container_id)).record
        try:
            return await self._cd.attach_stream(rec.id)
        except OSError as exc:
            raise StepFailed("attach", f"container {rec.id}: {exc}") from exc

    async def reopen_container_log(self, container_id: str) -> None:
        """Reopen the log at its path (after the kubelet rotated it); the container must be
        running, as containerd requires."""
        rec = self._running(container_id, "reopen its log")
        try:
            await self._cd.reopen_log(rec.id, rec.log_path or os.path.join(rec.dir,
                                                                          "container.log"))
        except OSError as exc:
            raise StepFailed("reopen log", f"container {rec.id}: {exc}") from exc

    async def container_logs(self, container_id: str, *, follow: bool = False
                             ) -> AsyncIterator[str]:
        """The lines of the container's CRI log file (`<time> <stream> <P|F> <text>`); with
        `follow`, new lines as they come until the container has exited."""
        rec = self._ctr(container_id).record
        path = rec.log_path
        if not path:
            raise ContainerPrecondition(f"container {rec.id} has no log_path")
        offset = 0
        while True:
            lines, offset = await self._host_read_lines(path, offset)
            for line in lines:
                yield line
            if not follow:
                return
            st = await self.container_status(rec.id)
            if st.state is ContainerState.EXITED and not lines:
                return
            await anyio.sleep(0.2)

    async def _host_read_lines(self, path: str, offset: int) -> tuple[list[str], int]:
        return await self._cd.read_lines(path, offset)

    async def update_container_resources(self, container_id: str,
                                         resources: LinuxContainerResources) -> None:
        """Change the container's cpu and memory limits in place (runtime update)."""
        rec = self._ctr(container_id).record
        if rec.state not in (ContainerState.CREATED, ContainerState.RUNNING):
            raise ContainerPrecondition(f"container {rec.id} is {rec.state.value}: only a "
                                        "Created or Running container can be updated")
        res: dict[str, Any] = {}
        cpu = {k: v for k, v in (("shares", resources.cpu_shares),
                                 ("quota", resources.cpu_quota),
                                 ("period", resources.cpu_period),
                                 ("cpus", resources.cpuset_cpus),
                                 ("mems", resources.cpuset_mems)) if v}
        if cpu:
            res["cpu"] = cpu
        if resources.memory_limit_in_bytes:
            res["memory"] = {"limit": resources.memory_limit_in_bytes}
        if res:
            await self._cd.update(rec.runtime, rec.id, res)
        self._ctr(container_id).record = rec.evolve(config=rec.config.model_copy(update={
            "linux": rec.config.linux.model_copy(update={"resources": resources})}))
