"""A fake container driver (drivers.base.ContainerDriver) for the faces' unit tests: records,
specs and exits in memory, a real CRI log file per container and exec as a real host process
(so output, exit codes and timeouts are real). The container's "process" prints its args to
the log when started and exits when killed (128 + the signal) or when a test says so
(`exit(cid, code)`). The real driver is tested in tests/integration/test_containers_*.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from podfsm.core.containerrecords import ContainerRecord, Exit
from podfsm.core.errors import ExecTimeout
from podfsm.core.records import TaskInfo
from podfsm.drivers.procstreams import ProcessStreams, SubprocessStreams


def log_line(stream: str, text: str, *, full: bool = True) -> str:
    """A line of a CRI log."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    return f"{at} {stream} {'F' if full else 'P'} {text}\n"


class FakeContainers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, ContainerRecord] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.runtime: dict[str, str] = {}  # id -> created | running | stopped
        self.logs: dict[str, str] = {}
        self.exits: dict[str, Exit] = {}
        self._exited: dict[int, anyio.Event] = {}  # monitor pid -> set once exited
        self._monitor_of: dict[str, int] = {}
        self._next_pid = 900_000

    # -- records and directories ------------------------------------------------------------

    def open(self, runtimes: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def load_all(self) -> tuple[list[ContainerRecord], list[str]]:
        return list(self.records.values()), []

    async def save(self, rec: ContainerRecord) -> None:
        self.records[rec.id] = rec

    def dir(self, container_id: str) -> str:
        return str(self.root / container_id)

    def layer_path(self, chain_id: str) -> str:
        return f"/nonexistent/layers/{chain_id}"

    async def mount_rootfs(self, container_id: str, lowers: list[str],
                           userns_path: str | None = None) -> str:
        rootfs = self.root / container_id / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        return str(rootfs)

    async def mount_volume(self, container_id: str, index: int, src: str, userns_path: str,
                           readonly: bool) -> str:
        return src  # no idmapping in the fake: the spec binds the source itself

    def idmap_problem(self) -> str | None:
        return "the fake container driver mounts nothing"

    def held_capabilities(self) -> list[str]:
        return ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"]

    def host_devices(self) -> dict[str, tuple[str, int, int, int, int, int]]:
        return {}

    def platform(self) -> tuple[str, tuple[int, int]]:
        return "x86_64", (6, 1)

    async def unmount_rootfs(self, container_id: str) -> None:
        pass

    async def remove_dir(self, container_id: str) -> None:
        shutil.rmtree(self.root / container_id, ignore_errors=True)
        self.records.pop(container_id, None)

    async def read_etc(self, rootfs: str, name: str) -> str:
        return ""

    def real_host_path(self, path: str) -> str:
        real = os.path.realpath(path)
        os.stat(real)
        return real

    def host_device(self, path: str) -> tuple[str, int, int, int, int, int]:
        raise ValueError(f"{path} is not a device (fake driver)")

    async def write_spec(self, container_id: str, spec: dict[str, Any]) -> None:
        self.specs[container_id] = spec

    def remove_spec(self, container_id: str) -> None:
        self.specs.pop(container_id, None)

    def read_spec(self, container_id: str) -> dict[str, Any] | None:
        return self.specs.get(container_id)

    def usage(self, container_id: str) -> tuple[int, int]:
        return 8192, 3

    # -- the runtime under a monitor ---------------------------------------------------------

    async def create(self, runtime: str, container_id: str, name: str, log_path: str, *,
                     tty: bool, stdin: bool, stdin_once: bool = False
                     ) -> tuple[TaskInfo, TaskInfo]:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).touch()
        self.logs[container_id] = log_path
        self.runtime[container_id] = "created"
        self._next_pid += 2
        monitor = TaskInfo(pid=self._next_pid + 1, start_time=1)
        self._exited[monitor.pid] = anyio.Event()
        self._monitor_of[container_id] = monitor.pid
        return TaskInfo(pid=self._next_pid, start_time=1), monitor

    async def start(self, runtime: str, container_id: str) -> None:
        self.runtime[container_id] = "running"
        args = (self.specs.get(container_id) or {}).get("process", {}).get("args", [])
        self.write_log(container_id, "stdout", " ".join(args))

    def write_log(self, container_id: str, stream: str, text: str, *, full: bool = True
                  ) -> None:
        with open(self.logs[container_id], "a", encoding="utf-8") as f:
            f.write(log_line(stream, text, full=full))

    def exit(self, container_id: str, code: int) -> None:
        """The container's process exits with `code` (its monitor records it and exits)."""
        if self.runtime.get(container_id) in ("created", "running"):
            self.runtime[container_id] = "stopped"
            self.exits[container_id] = Exit(code=code, at=datetime.now(UTC), oom=False)
            self._exited[self._monitor_of[container_id]].set()

    async def kill(self, runtime: str, container_id: str, sig: int) -> None:
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.exit(container_id, 128 + sig)

    async def delete(self, runtime: str, container_id: str) -> None:
        self.exit(container_id, 128 + signal.SIGKILL)
        self.runtime.pop(container_id, None)

    def exists(self, runtime: str, container_id: str) -> bool:
        return container_id in self.runtime

    async def state(self, runtime: str, container_id: str) -> str | None:
        return self.runtime.get(container_id)

    def runtime_ids(self) -> dict[str, list[str]]:
        return {"runc": list(self.runtime)}

    def dir_ids(self) -> list[str]:
        return os.listdir(self.root) if self.root.exists() else []

    def exit_of(self, container_id: str) -> Exit | None:
        return self.exits.get(container_id)

    async def wait_exit(self, monitor: TaskInfo) -> None:
        ev = self._exited.get(monitor.pid)
        if ev is None:
            return
        await ev.wait()

    def alive(self, task: TaskInfo) -> bool:
        ev = self._exited.get(task.pid)
        return ev is not None and not ev.is_set()

    async def reopen_log(self, container_id: str, log_path: str) -> None:
        pass

    async def exec_sync(self, runtime: str, container_id: str, process: dict[str, Any],
                        timeout: float) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *process["args"], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout or None)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ExecTimeout(f"command timed out after {timeout:g}s") from None
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def exec_stream(self, runtime: str, container_id: str, process: dict[str, Any], *,
                          tty: bool, stdin: bool) -> ProcessStreams:
        # as exec_sync: the command runs on the host, on pipes or a pty
        return await SubprocessStreams.start(process["args"], tty=tty, stdin=stdin)

    async def attach_stream(self, container_id: str) -> ProcessStreams:
        raise OSError(f"container {container_id} has no monitor to attach to (fake driver)")

    async def update(self, runtime: str, container_id: str, resources: dict[str, Any]
                     ) -> None:
        pass

    async def read_lines(self, path: str, offset: int) -> tuple[list[str], int]:
        data = (await anyio.Path(path).read_bytes())[offset:]
        end = data.rfind(b"\n") + 1
        return data[:end].decode().splitlines(), offset + end
