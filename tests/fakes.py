"""Fake drivers for fast unit tests of the orchestrator. No root needed.

They keep the real drivers' observable contract (checked by tests/integration/test_contract.py):
create/attach/create refuse to leave anything on failure, teardown is idempotent, DEL works
without a netns. The "pause task" is a real `sleep` child, so the real drivers' own code kills it,
supervises its exit through a pidfd and checks it in /proc (runtime.PauseTasks); the namespaces
are the test process's own (their inodes are what /proc/<pid>/ns of the sleep shows), so the
real checks of pins apply too (namespaces.PinChecks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core.errors import StepFailed
from podfsm.core.records import NetworkResult, PinnedNamespaces, SandboxRecord, TaskInfo
from podfsm.core.requests import (
    InterfaceInfo,
    NamespaceRequest,
    NetworkRequest,
    PauseRequest,
    SetAside,
)
from podfsm.drivers import linux
from podfsm.drivers.namespaces import PinChecks
from podfsm.drivers.runtime import PauseTasks
from tests.fakeimages import FakeImages


@dataclass
class Faults:
    """Which fake step fails next (by name), shared by the fakes of one test."""

    fail: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    def check(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise StepFailed(name, f"fake {name} failure")


class FakeNamespaces(PinChecks):
    """Its pins name real namespaces (this process's), so the real checks of pins apply
    (PinChecks)."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.pinned: set[str] = set()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create(self, req: NamespaceRequest) -> PinnedNamespaces:
        if (req.userns_path is None) != (req.uid_mapping is None):
            raise StepFailed("namespaces", "a uid/gid mapping goes with a user namespace")
        for p in (req.netns_path, req.userns_path):
            if p in self.pinned:
                raise StepFailed("namespaces", f"pin path {p} already exists")
        self.faults.check("ns.create")
        user = linux.ns_inode("/proc/self/ns/user")
        net = linux.ns_inode("/proc/self/ns/net")
        # A "pin" is a symlink to this process's own namespace, so the orchestrator's
        # inode and owner checks run for real against it.
        for path, kind in ((req.netns_path, "net"), (req.userns_path, "user")):
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.symlink(f"/proc/{os.getpid()}/ns/{kind}", path)
                self.pinned.add(path)
        return PinnedNamespaces(
            netns_path=req.netns_path, userns_path=req.userns_path,
            netns_inode=net if req.netns_path else None,
            userns_inode=user if req.userns_path else None,
            netns_owner_inode=user if req.netns_path else None,
        )

    async def destroy(self, netns_path: str | None, userns_path: str | None) -> None:
        self.faults.check("ns.destroy")
        for path in (netns_path, userns_path):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.pinned.discard(path)


class FakeNetwork:
    network_name = "fake"

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.reserved: dict[str, str] = {}  # sandbox id -> ip
        self._next = 2

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def attach(self, req: NetworkRequest) -> NetworkResult:
        self.faults.check("cni.add")
        ip = f"10.99.0.{self._next}"
        self._next += 1
        self.reserved[req.sandbox_id] = ip
        return NetworkResult(network_name=self.network_name, ip=ip)

    async def detach(self, req: NetworkRequest, result: NetworkResult | None) -> None:
        self.faults.check("cni.del")
        self.reserved.pop(req.sandbox_id, None)

    async def interfaces(self, netns_path: str) -> list[InterfaceInfo]:
        return []

    def problem(self) -> str | None:
        return None

    def address_families(self) -> frozenset[int] | None:
        return frozenset({4})

    async def reserved_container_ids(self) -> set[str]:
        return set(self.reserved)


class FakeRuntime(PauseTasks):
    """The pause is a `sleep` child; killing, waiting for and checking it is the real
    driver's own code (PauseTasks)."""

    name = "fake"

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.containers: dict[str, asyncio.subprocess.Process] = {}
        self.started: set[str] = set()
        self.exits: dict[int, int] = {}
        #: every create request, in order (what the spec would be generated from)
        self.requests: list[PauseRequest] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def bundle_path(self, container_id: str) -> str:
        return f"/nonexistent/bundles/{container_id}"

    def bundle_ids(self) -> list[str]:
        return list(self.containers)  # a fake bundle lives as long as its container

    async def create(self, req: PauseRequest) -> TaskInfo:
        if req.container_id in self.containers:
            raise StepFailed("runtime", f"container {req.container_id} already exists")
        self.faults.check("runtime.create")
        self.requests.append(req)
        proc = await asyncio.create_subprocess_exec("sleep", "1000")
        self.containers[req.container_id] = proc
        start = linux.proc_start_time(proc.pid)
        assert start is not None
        return TaskInfo(pid=proc.pid, start_time=start)

    async def start_task(self, container_id: str) -> None:
        self.faults.check("runtime.start")
        if "runtime.start.dies" in self.faults.fail:
            self.containers[container_id].send_signal(signal.SIGKILL)
            await self.containers[container_id].wait()
        self.started.add(container_id)

    async def delete(self, container_id: str) -> None:
        self.faults.check("runtime.delete")
        proc = self.containers.pop(container_id, None)
        self.started.discard(container_id)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def list_containers(self) -> list[str]:
        return list(self.containers)

    async def states(self) -> dict[str, str]:
        return {cid: "stopped" if proc.returncode is not None
                else "running" if cid in self.started else "created"
                for cid, proc in self.containers.items()}

    async def kill_all(self) -> None:
        """Kill and reap every fake pause process still running (a test's clean-up)."""
        for proc in self.containers.values():
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()

    async def wait_exit_status(self, task: TaskInfo, timeout: float) -> int | None:
        for proc in self.containers.values():
            if proc.pid == task.pid:
                try:
                    rc = await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    return None
                return 128 - rc if rc < 0 else rc
        return None


class MemoryStore:
    def __init__(self) -> None:
        self.records: dict[str, SandboxRecord] = {}
        self.writes = 0
        self.durable_writes = 0

    async def load_all(
        self, check: Callable[[SandboxRecord], str | None] | None = None
    ) -> tuple[list[SandboxRecord], list[SetAside]]:
        usable, set_aside = [], []
        for rec in list(self.records.values()):
            problem = check(rec) if check is not None else None
            if problem is None:
                usable.append(rec)
            else:
                del self.records[rec.id]
                set_aside.append(SetAside(rec.id, f"record {rec.id} set aside: {problem}"))
        return usable, set_aside

    async def save(self, rec: SandboxRecord, *, durable: bool = False) -> None:
        self.writes += 1
        self.durable_writes += durable
        self.records[rec.id] = rec

    async def delete(self, sandbox_id: str) -> None:
        self.records.pop(sandbox_id, None)


def live_children() -> list[int]:
    """Pids of this process's children that are still running (for leak checks)."""
    out = []
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            continue
    return out


class Rig:
    """Fake drivers and a config in a temporary directory: one test's world."""

    def __init__(self, tmp: Path) -> None:
        self.faults = Faults()
        self.ns = FakeNamespaces(self.faults)
        self.net = FakeNetwork(self.faults)
        self.rt = FakeRuntime(self.faults)
        self.store = MemoryStore()
        self.images = FakeImages()
        self.cfg = ControllerConfig(state_dir=str(tmp / "state"), run_dir=str(tmp / "run"),
                                    netns_dir=str(tmp / "netns"), stop_grace=0.5)

    def controller(self, failpoints: str = "") -> Controller:
        return Controller(self.cfg, namespaces=self.ns, network=self.net, runtime=self.rt,
                          store=self.store, images=self.images, failpoints=failpoints)

    def nothing_left(self) -> None:
        assert self.ns.pinned == set()
        assert self.net.reserved == {}
        assert self.rt.containers == {}
        assert self.store.records == {}
        deadline = time.monotonic() + 5
        while live_children() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live_children() == []
