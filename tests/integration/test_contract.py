"""The contract between the orchestrator and its drivers, run against the fakes of the unit
tests (tests/fakes.py) AND the real drivers, so a fake cannot drift from what it stands for.

Each test body is written once and knows nothing of which side it runs on: the same calls, the
same assertions. What a fake cannot do for real (a fake "pin" is a symlink to this process's own
namespace, a fake "pause" is a `sleep` child) is outside the contract; what the orchestrator
relies on (paths, inodes, refusals, idempotent teardown, reservations, task states and exit
statuses) is inside it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from podfsm.core.errors import StepFailed
from podfsm.core.records import SandboxRecord
from podfsm.core.requests import NamespaceRequest, NetworkRequest, PauseRequest
from podfsm.core.spec import IDMapping, parse_pod_config
from podfsm.core.states import State
from podfsm.drivers import linux
from podfsm.drivers.base import NamespaceDriver, NetworkDriver, RuntimeDriver, Store
from podfsm.drivers.cni import CniNetwork
from podfsm.drivers.namespaces import WorkerPoolNamespaces
from podfsm.drivers.runtime import OciRuntime
from podfsm.drivers.store import FileStore
from tests.fakes import FakeNamespaces, FakeNetwork, FakeRuntime, Faults, MemoryStore
from tests.integration.conftest import destroy_env, make_env

pytestmark = pytest.mark.integration

MAPPING = IDMapping(container_id=0, host_id=(1 << 22) + 65536 * 7, length=65536)


@dataclass
class Side:
    """One side of the contract: the fakes, or the real drivers on a private world."""

    name: str
    ns: NamespaceDriver
    net: NetworkDriver
    rt: RuntimeDriver
    netns_dir: str
    run_dir: str

    def ns_request(self, sid: str, userns: bool = True) -> NamespaceRequest:
        userns_path = os.path.join(self.run_dir, "sandboxes", sid, "userns") if userns else None
        if userns_path:
            os.makedirs(os.path.dirname(userns_path), mode=0o700, exist_ok=True)
        return NamespaceRequest(sandbox_id=sid,
                                netns_path=os.path.join(self.netns_dir, f"c-{sid[:12]}"),
                                userns_path=userns_path,
                                uid_mapping=MAPPING if userns else None,
                                gid_mapping=MAPPING if userns else None)


@contextlib.asynccontextmanager
async def open_side(kind: str) -> AsyncIterator[Side]:
    """kind: "fake", or a real runtime's name ("runc", "crun")."""
    if kind == "fake":
        tmp = tempfile.mkdtemp(prefix="pfsm-fake-")
        faults = Faults()
        rt = FakeRuntime(faults)
        try:
            yield Side("fake", FakeNamespaces(faults), FakeNetwork(faults), rt,
                       os.path.join(tmp, "netns"), os.path.join(tmp, "run"))
        finally:
            await rt.kill_all()
            shutil.rmtree(tmp, ignore_errors=True)
        return
    env = make_env(kind)
    cfg = env.cfg
    os.makedirs(cfg.netns_dir)
    ns = WorkerPoolNamespaces(workers=1)
    net = CniNetwork(cfg.cni_conf_dir, cfg.cni_bin_dirs, cfg.default_network_name,
                     cfg.default_bridge, cfg.default_subnet, reaper_run_dir=cfg.run_dir)
    rt_real = OciRuntime(cfg.runtime, cfg.run_dir, pause_binary=cfg.pause_binary)
    try:
        await ns.start()
        await rt_real.start()
        await net.start()
        yield Side(kind, ns, net, rt_real, cfg.netns_dir, cfg.run_dir)
    finally:
        await net.close()
        await rt_real.close()
        await ns.close()
        destroy_env(env)


def new_id() -> str:
    return secrets.token_hex(32)


@pytest.mark.parametrize("kind", ["fake", "runc"])
async def test_namespaces_contract(kind: str) -> None:
    async with open_side(kind) as s:
        sid = new_id()
        req = s.ns_request(sid)
        pinned = await s.ns.create(req)
        assert (pinned.netns_path, pinned.userns_path) == (req.netns_path, req.userns_path)
        assert pinned.netns_path and pinned.userns_path
        # the pins hold what the result says, and the netns is owned by that user namespace
        assert linux.ns_inode(pinned.netns_path) == pinned.netns_inode
        assert linux.ns_inode(pinned.userns_path) == pinned.userns_inode
        assert linux.netns_owner_inode(pinned.netns_path) == pinned.netns_owner_inode
        assert pinned.netns_owner_inode == pinned.userns_inode
        assert s.ns.owner_problem(pinned) is None
        wrong = pinned.model_copy(update={"userns_inode": pinned.userns_inode + 1})
        assert "is not the pod's" in (s.ns.owner_problem(wrong) or "")
        # the pins hold what was recorded; they exist; the netns pin is listed by its prefix
        assert s.ns.pin_problem(pinned) is None
        moved = pinned.model_copy(update={"netns_inode": pinned.netns_inode + 1})
        assert "netns pin" in (s.ns.pin_problem(moved) or "")
        assert s.ns.pins_exist(None, pinned.netns_path)
        assert s.ns.pins_exist(pinned.userns_path)
        assert not s.ns.pins_exist(None, pinned.netns_path + "-never")
        name = os.path.basename(pinned.netns_path)
        assert s.ns.pins_in(s.netns_dir, name[:8]) == [name]
        assert s.ns.pins_in(s.netns_dir, "none-") == []
        assert s.ns.pins_in(os.path.join(s.netns_dir, "missing"), "") == []
        # a pin path that exists is refused, and the pins there are left alone
        with pytest.raises(StepFailed, match="already exists"):
            await s.ns.create(req)
        assert linux.ns_inode(pinned.netns_path) == pinned.netns_inode
        # a user namespace goes with a mapping, and a mapping with a user namespace
        other = s.ns_request(new_id())
        for bad in (replace(other, uid_mapping=None, gid_mapping=None),
                    replace(other, userns_path=None)):
            with pytest.raises(StepFailed):
                await s.ns.create(bad)
            for p in (bad.netns_path, bad.userns_path):
                assert p is None or not os.path.lexists(p)
        # a node-userns netns: no user namespace pin, owned by the host's user namespace
        host = await s.ns.create(s.ns_request(new_id(), userns=False))
        assert host.userns_path is None and host.netns_path
        assert linux.netns_owner_inode(host.netns_path) == linux.ns_inode("/proc/self/ns/user")
        assert s.ns.owner_problem(host) is None  # no user namespace of its own: nothing to check
        if kind != "fake":  # a fake netns pin names the host's own netns, owned by the host
            swapped = pinned.model_copy(update={"netns_path": host.netns_path})
            assert "is not owned by the pod's user namespace" in (
                s.ns.owner_problem(swapped) or "")
        # teardown: gone, and idempotent (twice, nothing, never made)
        for made in (pinned, host):
            await s.ns.destroy(made.netns_path, made.userns_path)
            assert not any(x and os.path.lexists(x) for x in (made.netns_path, made.userns_path))
            assert not s.ns.pins_exist(made.netns_path, made.userns_path)
            assert "no longer holds" in (s.ns.pin_problem(made) or "")
            await s.ns.destroy(made.netns_path, made.userns_path)
        await s.ns.destroy(None, None)
        assert s.ns.pins_in(s.netns_dir, name[:8]) == []
        never = s.ns_request(new_id())
        await s.ns.destroy(never.netns_path, never.userns_path)


@pytest.mark.parametrize("kind", ["fake", "runc"])
async def test_network_contract(kind: str) -> None:
    async with open_side(kind) as s:
        pins = [await s.ns.create(s.ns_request(new_id(), userns=False)) for _ in range(2)]
        reqs = [NetworkRequest(sandbox_id=new_id(), netns_path=p.netns_path, pod_name=f"c{i}",
                               pod_namespace="contract", pod_uid=f"u{i}")
                for i, p in enumerate(pins)]
        results = [await s.net.attach(r) for r in reqs]
        ips = [ipaddress.ip_address(r.ip) for r in results]  # an address, not just a string
        assert ips[0] != ips[1]
        assert {r.sandbox_id for r in reqs} <= await s.net.reserved_container_ids()
        # DEL releases the address; twice is fine
        await s.net.detach(reqs[0], results[0])
        assert reqs[0].sandbox_id not in await s.net.reserved_container_ids()
        await s.net.detach(reqs[0], results[0])
        assert reqs[0].sandbox_id not in await s.net.reserved_container_ids()
        # DEL without the netns (its pin already gone) and without the result still releases
        await s.ns.destroy(pins[1].netns_path, None)
        await s.net.detach(replace(reqs[1], netns_path=None), None)
        assert reqs[1].sandbox_id not in await s.net.reserved_container_ids()
        await s.ns.destroy(pins[0].netns_path, None)


@pytest.mark.parametrize("kind", ["fake", "runc", "crun"])
async def test_runtime_contract(kind: str) -> None:
    async with open_side(kind) as s:
        sid = new_id()
        pinned = await s.ns.create(s.ns_request(sid))
        req = PauseRequest(container_id=sid, hostname="contract",
                           netns_path=pinned.netns_path, userns_path=pinned.userns_path,
                           uid_mapping=MAPPING, gid_mapping=MAPPING)
        task = await s.rt.create(req)
        assert linux.proc_start_time(task.pid) == task.start_time  # that very process
        assert (await s.rt.states()).get(sid) == "created"
        assert sid in await s.rt.list_containers()
        assert sid in s.rt.bundle_ids()
        # an id that exists is refused, and the container is left alone
        with pytest.raises(StepFailed, match="already exists"):
            await s.rt.create(req)
        assert (await s.rt.states()).get(sid) == "created"
        assert linux.proc_start_time(task.pid) == task.start_time
        await s.rt.start_task(sid)
        assert (await s.rt.states()).get(sid) == "running"
        assert await s.rt.wait_exit_status(task, 0.2) is None  # alive: the wait times out
        assert s.rt.task_problem(task, pinned) is None  # in the pinned namespaces
        if kind != "fake":  # the fake pause runs in the host's namespaces
            assert "expected" in (s.rt.task_problem(task, None) or "")  # not in the host's
        # exit supervision: the wait goes on while the task lives (and can be cancelled), a
        # kill -9 from outside ends it at once, and a reuse of the pid is never waited on
        assert s.rt.task_alive(task)
        with anyio.move_on_after(0.2) as waiting:
            await s.rt.wait_task_exit(task)
        assert waiting.cancelled_caught
        reused = task.model_copy(update={"start_time": task.start_time + 1})
        assert not s.rt.task_alive(reused)
        with anyio.fail_after(0.5):
            await s.rt.wait_task_exit(reused)
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.rt.wait_task_exit, task)
            await anyio.sleep(0.05)
            t0 = time.perf_counter()
            os.kill(task.pid, signal.SIGKILL)
        assert time.perf_counter() - t0 < 0.2  # noticed, not polled for
        assert await s.rt.wait_exit_status(task, 5.0) == 128 + signal.SIGKILL
        assert not s.rt.task_alive(task)
        with anyio.fail_after(0.5):
            await s.rt.wait_task_exit(task)  # gone: returns at once
        assert (await s.rt.states()).get(sid) == "stopped"
        assert "is gone" in (s.rt.task_problem(task, pinned) or "")
        await s.rt.delete(sid)
        assert (await s.rt.states()).get(sid) is None
        assert sid not in await s.rt.list_containers()
        assert sid not in await s.rt.states()
        assert sid not in s.rt.bundle_ids()
        await s.rt.delete(sid)  # idempotent
        await s.rt.delete(new_id())  # never existed
        assert (await s.rt.states()).get(new_id()) is None
        # kill_task: the teardown's way, through a pidfd, with the exit status
        sid2 = new_id()
        task2 = await s.rt.create(replace(req, container_id=sid2))
        await s.rt.start_task(sid2)
        assert await s.rt.kill_task(task2, 0) == 128 + signal.SIGKILL
        assert linux.proc_start_time(task2.pid) is None
        assert await s.rt.kill_task(task2, 0) in (128 + signal.SIGKILL, None)  # gone: no error
        await s.rt.delete(sid2)
        await s.ns.destroy(pinned.netns_path, pinned.userns_path)


@pytest.mark.parametrize("kind", ["fake", "real"])
async def test_store_contract(kind: str, tmp_path: Path) -> None:
    store: Store
    if kind == "fake":
        store = MemoryStore()
    else:
        fs = FileStore(str(tmp_path / "state"))
        fs.open()
        store = fs
    try:
        recs = [SandboxRecord(id=new_id(), runtime="runc", created_at=datetime.now(UTC),
                              config=parse_pod_config({"metadata": {"name": f"p{i}"}}))
                for i in range(2)]
        await store.save(recs[0], durable=True)
        await store.save(recs[1])
        ready = recs[0].evolve(state=State.READY)
        await store.save(ready)  # replaces
        loaded, problems = await store.load_all()
        assert problems == []
        assert sorted(loaded, key=lambda r: r.id) == sorted([ready, recs[1]], key=lambda r: r.id)
        await store.delete(recs[0].id)
        await store.delete(recs[0].id)  # idempotent
        await store.delete(new_id())
        assert await store.load_all() == ([recs[1]], [])
    finally:
        if isinstance(store, FileStore):
            store.close()
