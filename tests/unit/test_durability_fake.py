"""A stateful property test against the fake drivers: random run / stop / remove / status /
task-kill operations on a few names, from several tasks at once, with faults switched on and
off, a cancellation in the middle, and a controller restart (recovery) between phases.

What must hold throughout: every sandbox's history is a path through the table (each entry an
edge of TRANSITIONS, each starting where the previous one ended: nothing goes backwards or
skips), a history only ever grows, and at every quiet point the invariants below hold. At the
end nothing is left. Seeded, so a failure names the seed that reproduces it.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from podfsm import (
    Controller,
    ControllerConfig,
    NameReserved,
    SandboxNotFound,
    SandboxRunError,
    SandboxStatus,
    State,
)
from podfsm.core.errors import StepFailed
from podfsm.core.idmap import find_overlap
from podfsm.core.states import TRANSITIONS
from tests.fakes import FakeNamespaces, FakeNetwork, FakeRuntime, Faults, MemoryStore

NAMES = ("a", "b", "c")
FAULTS = ("ns.create", "cni.add", "runtime.create", "runtime.start", "runtime.start.dies",
          "ns.destroy", "cni.del", "runtime.delete")
EDGES = {(t.source.value, t.trigger.value, t.dest.value) for t in TRANSITIONS}
Edge = tuple[str, str, str]


def pod(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "prop"},
            "linux": {"security_context": {"namespace_options": {
                "userns_options": {"mode": "POD"}}}}}


def assert_path(edges: list[Edge], what: object) -> str:
    """The edges form a path from Unknown through the table; returns where it ends."""
    state = State.UNKNOWN.value
    for source, trigger, dest in edges:
        assert (source, trigger, dest) in EDGES, (what, edges)
        assert source == state, (what, edges)
        state = dest
    return state


def edges_of(st: SandboxStatus) -> list[Edge]:
    return [(h.source, h.trigger, h.dest) for h in st.history]


@dataclass
class World:
    tmp: Path
    faults: Faults = field(default_factory=Faults)
    store: MemoryStore = field(default_factory=MemoryStore)
    #: every transition seen on the event streams, per sandbox, across controllers
    events: dict[str, list[Edge]] = field(default_factory=lambda: defaultdict(list))
    #: the longest history seen by a status call, per sandbox
    seen: dict[str, list[Edge]] = field(default_factory=dict)
    #: seq of the last event collected from the current controller
    last_seq: int = 0

    def __post_init__(self) -> None:
        self.ns = FakeNamespaces(self.faults)
        self.net = FakeNetwork(self.faults)
        self.rt = FakeRuntime(self.faults)
        self.cfg = ControllerConfig(state_dir=str(self.tmp / "state"),
                                    run_dir=str(self.tmp / "run"),
                                    netns_dir=str(self.tmp / "netns"), stop_grace=0.2)

    def controller(self) -> Controller:
        return Controller(self.cfg, namespaces=self.ns, network=self.net, runtime=self.rt,
                          store=self.store, failpoints="")

    def saw(self, st: SandboxStatus) -> None:
        """A history only grows: what an earlier status showed is a prefix of this one."""
        now = edges_of(st)
        before = self.seen.get(st.id, [])
        assert now[:len(before)] == before, (st.id, before, now)
        self.seen[st.id] = now
        assert assert_path(now, st.id) == st.state.value


async def find(ctl: Controller, name: str) -> str | None:
    for st in await ctl.list_sandboxes():
        if st.name == name:
            return st.id
    return None


async def actor(ctl: Controller, world: World, rnd: random.Random, ops: int) -> None:
    for _ in range(ops):
        op = rnd.choice(("run", "run", "stop", "remove", "status", "status", "kill", "fault",
                         "nap"))
        name = rnd.choice(NAMES)
        sid = await find(ctl, name)
        try:
            if op == "run":
                st = await ctl.run_sandbox(pod(name))
                assert st.state is State.READY
            elif op == "stop" and sid:
                await ctl.stop_sandbox(sid)
            elif op == "remove" and sid:
                await ctl.remove_sandbox(sid)
            elif op == "status" and sid:
                world.saw(await ctl.sandbox_status(sid))
            elif op == "kill" and sid:
                proc = world.rt.containers.get(sid)
                if proc is not None and proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)  # the pause task dies by itself
            elif op == "fault":
                fault = rnd.choice(FAULTS)
                if fault in world.faults.fail:
                    world.faults.fail.discard(fault)
                elif len(world.faults.fail) < 2:
                    world.faults.fail.add(fault)
            elif op == "nap":
                await anyio.sleep(rnd.random() * 0.003)
        except (NameReserved, SandboxRunError, SandboxNotFound, StepFailed):
            pass  # refusals and failures the faults cause are fine; the invariants decide
        await anyio.lowlevel.checkpoint()


async def collect(ctl: Controller, world: World, ready: anyio.Event) -> None:
    world.last_seq = 0
    stream = ctl.events(since=0)  # with what recovery did before we subscribed
    ready.set()
    async for ev in stream:
        world.events[ev.sandbox_id].append((ev.source, ev.trigger, ev.dest))
        world.last_seq = ev.seq


async def drained(ctl: Controller, world: World) -> None:
    """Wait until the collector has every event published so far."""
    with anyio.fail_after(5):
        while world.last_seq < ctl.last_event_seq:  # noqa: ASYNC110
            await anyio.sleep(0.001)


async def check_invariants(ctl: Controller, world: World) -> None:
    """At a quiet point (no operation in flight)."""
    sts = await ctl.list_sandboxes()
    ids = {s.id for s in sts}
    # one sandbox per name; every one settled (Ready or NotReady, never in between)
    assert len({s.name for s in sts}) == len(sts)
    for st in sts:
        assert st.state in (State.READY, State.NOT_READY), st
        world.saw(st)
    # memory and the store agree
    assert set(world.store.records) == ids
    for st in sts:
        assert world.store.records[st.id].state is st.state
        assert world.store.records[st.id].pending is None or st.leftovers
    # id ranges disjoint
    maps = [s.uid_mappings[0] for s in sts if s.uid_mappings]
    for i, m in enumerate(maps):
        assert find_overlap(m, maps[:i] + maps[i + 1:]) is None
    # everything on the "system" belongs to a listed sandbox
    assert set(world.net.reserved) <= ids
    assert set(world.rt.containers) <= ids
    planned = {p for s in sts for p in (s.netns_path, s.userns_path) if p}
    assert world.ns.pinned <= planned
    # a Ready sandbox has its task alive, its address and its pins
    for st in sts:
        if st.state is State.READY:
            proc = world.rt.containers[st.id]
            assert proc.returncode is None and proc.pid == st.pid
            assert world.net.reserved[st.id] == st.ip
            assert st.netns_path in world.ns.pinned and st.userns_path in world.ns.pinned


async def phase(world: World, seed: int, actors: int, ops: int,
                cancel_after: float | None = None) -> None:
    async with world.controller() as ctl:
        await check_invariants(ctl, world)  # what recovery made of the previous phase
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            tg.start_soon(collect, ctl, world, ready)
            await ready.wait()
            with anyio.CancelScope() as scope:
                if cancel_after is not None:
                    scope.deadline = anyio.current_time() + cancel_after
                async with anyio.create_task_group() as work:
                    for i in range(actors):
                        work.start_soon(actor, ctl, world, random.Random(seed * 100 + i), ops)
            # let supervision notice the killed tasks, then look
            await anyio.sleep(0.05)
            await check_invariants(ctl, world)
            await drained(ctl, world)
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(10))
async def test_random_concurrent_operations_keep_every_invariant(
    tmp_path: Path, seed: int
) -> None:
    world = World(tmp_path)
    try:
        await phase(world, seed, actors=4, ops=25)
        # the caller gives up in the middle of everything: runs are unwound, stops finished
        await phase(world, seed + 1000, actors=4, ops=25, cancel_after=0.02)
        # a restart: recovery re-attaches what runs and keeps what does not
        world.faults.fail.clear()
        await phase(world, seed + 2000, actors=3, ops=20)
        # the end: remove everything; nothing may be left
        world.faults.fail.clear()
        async with world.controller() as ctl, anyio.create_task_group() as tg:
            ready = anyio.Event()
            tg.start_soon(collect, ctl, world, ready)
            await ready.wait()
            for st in await ctl.list_sandboxes():
                await ctl.remove_sandbox(st.id)
            assert await ctl.list_sandboxes() == []
            await drained(ctl, world)
            tg.cancel_scope.cancel()
        assert world.ns.pinned == set()
        assert world.net.reserved == {}
        assert world.rt.containers == {}
        assert world.store.records == {}
        # every sandbox ever made went along the table, and each one that is gone was either
        # removed or fully unwound (back to Unknown)
        for sid, edges in world.events.items():
            assert assert_path(edges, sid) == State.UNKNOWN.value, (sid, edges)
    finally:
        await world.rt.kill_all()


# ---------------------------------------------------------------- recovery, one case at a time


async def restart_with(world: World, sid: str, **changes: Any) -> Controller:
    """Edit the persisted record as a crash would have left it; return a fresh controller."""
    world.store.records[sid] = world.store.records[sid].evolve(**changes)
    return world.controller()


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    await w.rt.kill_all()


async def test_recovery_finishes_an_interrupted_remove(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    async with await restart_with(world, st.id, pending="remove") as ctl:
        assert await ctl.list_sandboxes() == []
    assert world.rt.containers == {} and world.net.reserved == {} and world.ns.pinned == set()
    assert world.store.records == {}


async def test_recovery_finishes_an_interrupted_stop(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    async with await restart_with(world, st.id, pending="stop") as ctl:
        after = await ctl.sandbox_status(st.id)
        assert after.state is State.NOT_READY and after.history[-1].trigger == "stop"
        assert world.rt.containers == {} and world.net.reserved == {}
        await ctl.remove_sandbox(st.id)


@pytest.mark.parametrize(("state", "pending"), [
    (State.UNKNOWN, "setup_namespaces"), (State.NAMESPACES_READY, "create_container"),
    (State.CONTAINER_CREATED, "start_task"), (State.TASK_RUNNING, "mark_ready")])
async def test_recovery_turns_an_interrupted_run_not_ready_and_keeps_it_for_stop(
    world: World, state: State, pending: str
) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    forward = [State.UNKNOWN, State.NAMESPACES_READY, State.CONTAINER_CREATED,
               State.TASK_RUNNING]
    # the history as it was when the crash came: the forward steps up to `state`
    history = world.store.records[st.id].history[:forward.index(state)]
    async with await restart_with(world, st.id, state=state, pending=pending,
                                  history=history) as ctl:
        after = await ctl.sandbox_status(st.id)
        assert after.state is State.NOT_READY
        assert after.last_error and f"during {pending}" in after.last_error
        assert assert_path(edges_of(after), st.id) == "NotReady"
        assert world.net.reserved[st.id] == st.ip  # kept until stop/remove
        await ctl.remove_sandbox(st.id)
    assert world.rt.containers == {} and world.net.reserved == {} and world.ns.pinned == set()


async def test_recovery_of_a_ready_sandbox_whose_task_died_meanwhile(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    proc = world.rt.containers[st.id]
    proc.kill()
    await proc.wait()
    async with world.controller() as ctl:
        after = await ctl.sandbox_status(st.id)
        assert after.state is State.NOT_READY and after.history[-1].trigger == "task_exit"
        assert after.exit_status == 137 and after.ip == st.ip
        await ctl.remove_sandbox(st.id)


async def test_recovery_of_a_ready_sandbox_whose_network_is_gone(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    del world.net.reserved[st.id]  # its address was lost while podfsm was down
    async with world.controller() as ctl:
        after = await ctl.sandbox_status(st.id)
        assert after.state is State.NOT_READY and after.history[-1].trigger == "fail"
        assert after.last_error and "network check failed" in after.last_error
        await ctl.remove_sandbox(st.id)
    assert world.rt.containers == {}


async def test_recovery_reattaches_a_live_ready_sandbox(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    async with world.controller() as ctl:
        again = await ctl.sandbox_status(st.id)
        assert again == st
        assert st.pid is not None
        world.rt.containers[st.id].send_signal(signal.SIGKILL)
        with anyio.fail_after(1):
            while (await ctl.sandbox_status(st.id)).state is not State.NOT_READY:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        await ctl.remove_sandbox(st.id)


async def test_what_has_no_record_is_collected(world: World) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
    del world.store.records[st.id]  # lost while podfsm was down
    async with world.controller() as ctl:
        assert await ctl.list_sandboxes() == []
        assert ctl.recovery_problems == []
    assert world.rt.containers == {} and world.net.reserved == {} and world.ns.pinned == set()
    assert not (world.tmp / "run" / "sandboxes" / st.id).exists()


async def test_a_sandbox_has_its_run_directory_exactly_while_it_has_a_record(
    world: World,
) -> None:
    async with world.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
        marker = world.tmp / "run" / "sandboxes" / st.id
        assert marker.is_dir()
        await ctl.stop_sandbox(st.id)
        assert marker.is_dir()  # still recorded (NotReady)
        await ctl.remove_sandbox(st.id)
        assert not marker.exists()


async def test_recovery_of_a_ready_sandbox_whose_pin_or_container_is_gone(world: World) -> None:
    async with world.controller() as ctl:
        a = await ctl.run_sandbox(pod("a"))
        b = await ctl.run_sandbox(pod("b"))
    assert a.netns_path is not None
    Path(a.netns_path).unlink()  # someone unmounted the pin while podfsm was down
    world.rt.started.discard(b.id)  # the runtime no longer reports it running
    async with world.controller() as ctl:
        for st, why in ((a, "no longer holds"), (b, "the runtime says")):
            after = await ctl.sandbox_status(st.id)
            assert after.state is State.NOT_READY and after.history[-1].trigger == "fail"
            assert after.last_error and why in after.last_error
            await ctl.remove_sandbox(st.id)
    assert world.rt.containers == {} and world.net.reserved == {} and world.ns.pinned == set()


async def test_a_sandboxs_last_event_comes_after_it_is_gone(tmp_path: Path) -> None:
    """Whoever asks for the status on the `remove` event (or on the last step of an unwound
    run) finds the sandbox gone, also with a store whose writes take time (a real FileStore)."""
    from podfsm.drivers.store import FileStore

    world = World(tmp_path)
    fs = FileStore(str(tmp_path / "state"))
    fs.open()
    ctl = Controller(world.cfg, namespaces=world.ns, network=world.net, runtime=world.rt,
                     store=fs, failpoints="")
    found_after_last: list[str] = []

    async def watch(ready: anyio.Event) -> None:
        stream = ctl.events()
        ready.set()
        async for ev in stream:
            if ev.dest == State.UNKNOWN.value:
                with contextlib.suppress(SandboxNotFound):
                    await ctl.sandbox_status(ev.sandbox_id)
                    found_after_last.append(ev.trigger)

    try:
        async with ctl, anyio.create_task_group() as tg:
            ready = anyio.Event()
            tg.start_soon(watch, ready)
            await ready.wait()
            for _ in range(5):
                st = await ctl.run_sandbox(pod("a"))
                await ctl.remove_sandbox(st.id)
            world.faults.fail.add("runtime.start")
            for _ in range(5):
                with pytest.raises(SandboxRunError):
                    await ctl.run_sandbox(pod("a"))
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        fs.close()
    assert found_after_last == []
