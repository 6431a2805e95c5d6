"""The orchestrator against fake drivers: forward steps, unwinding, supervision, stop/remove,
serialization and admission. No root needed; the pause task is a real `sleep` child."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from podfsm import (
    InvalidPodConfig,
    NameReserved,
    SandboxRunError,
    State,
)
from podfsm.core.idmap import find_overlap
from tests.fakes import Rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    await r.rt.kill_all()


def pod(name: str = "web", userns: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"metadata": {"name": name, "namespace": "default"}}
    d["linux"] = {"security_context": {"namespace_options": {
        "userns_options": userns if userns is not None else {"mode": "POD"}}}}
    return d


async def test_run_reaches_ready_through_every_forward_state(rig: Rig) -> None:
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod())
        assert st.state is State.READY
        assert [(h.source, h.dest) for h in st.history] == [
            ("Unknown", "NamespacesReady"), ("NamespacesReady", "ContainerCreated"),
            ("ContainerCreated", "TaskRunning"), ("TaskRunning", "Ready")]
        assert st.ip == "10.99.0.2"
        assert len(st.id) == 64 and all(c in "0123456789abcdef" for c in st.id)
        assert st.uid_mappings[0].host_id >= 65536
        assert st.pid is not None and os.path.exists(f"/proc/{st.pid}")
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()


@pytest.mark.parametrize("step", ["ns.create", "cni.add", "runtime.create", "runtime.start",
                                  "runtime.start.dies"])
async def test_a_failure_at_each_step_unwinds_to_nothing(rig: Rig, step: str) -> None:
    rig.faults.fail.add(step)
    async with rig.controller() as ctl:
        with pytest.raises(SandboxRunError) as info:
            await ctl.run_sandbox(pod())
        assert info.value.leftovers == []
        assert "everything done was unwound" in str(info.value)
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


@pytest.mark.parametrize("point", ["pin_namespaces.after", "cni_add.before", "cni_add.after",
                                   "runtime_create.after", "runtime_start.before",
                                   "runtime_start.after"])
async def test_error_failpoints_unwind_and_name_the_step(rig: Rig, point: str) -> None:
    async with rig.controller(failpoints=f"{point}=error") as ctl:
        with pytest.raises(SandboxRunError) as info:
            await ctl.run_sandbox(pod())
        assert point in str(info.value)
    rig.nothing_left()


async def test_unwinding_that_fails_leaves_the_sandbox_listed_not_ready(rig: Rig) -> None:
    rig.faults.fail.update({"runtime.start", "runtime.delete"})
    async with rig.controller() as ctl:
        with pytest.raises(SandboxRunError) as info:
            await ctl.run_sandbox(pod())
        assert any("runtime delete" in x for x in info.value.leftovers)
        (st,) = await ctl.list_sandboxes()
        assert st.state is State.NOT_READY
        assert st.leftovers
        rig.faults.fail.clear()
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()


async def test_task_exit_is_noticed_and_the_ip_stays_reserved(rig: Rig) -> None:
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod())
        assert st.pid is not None
        t0 = anyio.current_time()
        os.kill(st.pid, signal.SIGKILL)
        while (await ctl.sandbox_status(st.id)).state is not State.NOT_READY:
            assert anyio.current_time() - t0 < 1.0
            await anyio.sleep(0.005)
        after = await ctl.sandbox_status(st.id)
        assert after.exit_status == 137
        assert rig.net.reserved[st.id] == st.ip
        await ctl.stop_sandbox(st.id)
        assert st.id not in rig.net.reserved
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()


async def test_stop_and_remove_of_unknown_ids_succeed(rig: Rig) -> None:
    async with rig.controller() as ctl:
        await ctl.stop_sandbox("nope")
        await ctl.remove_sandbox("nope")


async def test_same_name_namespace_attempt_is_reserved(rig: Rig) -> None:
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
        with pytest.raises(NameReserved):
            await ctl.run_sandbox(pod("a"))
        await ctl.remove_sandbox(st.id)
        st2 = await ctl.run_sandbox(pod("a"))  # the name is free again
        await ctl.remove_sandbox(st2.id)
    rig.nothing_left()


async def test_names_joined_alike_do_not_collide(rig: Rig) -> None:
    # containerd's key joins the parts with '_': {x_y, z} and {x, y_z} would be one name
    a = dict(pod("x_y"), metadata={"name": "x_y", "namespace": "z"})
    b = dict(pod("x"), metadata={"name": "x", "namespace": "y_z"})
    async with rig.controller() as ctl:
        first = await ctl.run_sandbox(a)
        second = await ctl.run_sandbox(b)
        with pytest.raises(NameReserved) as refused:
            await ctl.run_sandbox(b)
        assert str(refused.value) == (
            "pod sandbox name 'x' in namespace 'y_z' (uid '', attempt 0) is reserved for "
            f"sandbox {second.id}")
        for st in (first, second):
            await ctl.remove_sandbox(st.id)
    rig.nothing_left()


async def test_overlapping_explicit_mapping_is_refused_before_anything_is_made(rig: Rig) -> None:
    m = [{"host_id": 2000000, "container_id": 0, "length": 65536}]
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod("a", {"mode": "POD", "uids": m, "gids": m}))
        calls = len(rig.faults.calls)
        m2 = [{"host_id": 2000000 + 100, "container_id": 0, "length": 10}]
        with pytest.raises(InvalidPodConfig, match="overlap"):
            await ctl.run_sandbox(pod("b", {"mode": "POD", "uids": m2, "gids": m2}))
        assert len(rig.faults.calls) == calls
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()


async def test_ten_concurrent_sandboxes_get_distinct_ips_and_disjoint_ranges(rig: Rig) -> None:
    async with rig.controller() as ctl:
        results = []

        async def one(i: int) -> None:
            results.append(await ctl.run_sandbox(pod(f"p{i}")))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert all(s.state is State.READY for s in results)
        assert len({s.ip for s in results}) == 10
        maps = [s.uid_mappings[0] for s in results]
        for i, m in enumerate(maps):
            assert find_overlap(m, maps[:i] + maps[i + 1:]) is None
        async with anyio.create_task_group() as tg:
            for s in results:
                tg.start_soon(ctl.remove_sandbox, s.id)
    rig.nothing_left()


async def test_events_stream_every_transition(rig: Rig) -> None:
    async with rig.controller() as ctl:
        seen: list[tuple[str, str]] = []

        async def watch() -> None:
            async for ev in ctl.events():
                seen.append((ev.trigger, ev.dest))
                if ev.trigger == "remove":
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(0.01)
            st = await ctl.run_sandbox(pod())
            await ctl.remove_sandbox(st.id)
        assert seen == [("setup_namespaces", "NamespacesReady"),
                        ("create_container", "ContainerCreated"),
                        ("start_task", "TaskRunning"), ("mark_ready", "Ready"),
                        ("stop", "NotReady"), ("remove", "Unknown")]


async def test_cancelled_run_is_fully_unwound(rig: Rig) -> None:
    async with rig.controller(failpoints="runtime_start.before=delay(300)") as ctl:
        with anyio.move_on_after(0.1):
            await ctl.run_sandbox(pod())
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


async def test_concurrent_operations_on_one_sandbox_are_serialized(rig: Rig) -> None:
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod())
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(ctl.stop_sandbox, st.id)
                tg.start_soon(ctl.remove_sandbox, st.id)
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


async def test_a_sysctl_this_host_lacks_is_refused_before_anything_is_made(rig: Rig) -> None:
    data = pod()
    data["linux"]["sysctls"] = {"net.ipv4.no_such_knob": "1"}
    async with rig.controller() as ctl:
        with pytest.raises(InvalidPodConfig, match="does not exist on this host"):
            await ctl.run_sandbox(data)
        assert rig.faults.calls == []
    rig.nothing_left()


async def test_the_record_is_made_durable_once_before_the_first_system_step(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync is paid where a reboot needs it: before anything (above all the CNI address
    reservation, which outlives a reboot) is made; the later writes of a lifecycle are not."""
    real_save = rig.store.save

    async def save(rec: Any, *, durable: bool = False) -> None:
        rig.faults.calls.append(f"save durable={durable} {rec.state.value}")
        await real_save(rec, durable=durable)

    monkeypatch.setattr(rig.store, "save", save)
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod("a"))
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
    saves = [c for c in rig.faults.calls if c.startswith("save")]
    assert rig.faults.calls[0] == "save durable=True Unknown"
    assert rig.faults.calls[1] == "ns.create"
    assert saves[1:] and all("durable=False" in c for c in saves[1:])
    rig.nothing_left()


@pytest.mark.parametrize("field", ["planned_netns_path", "planned_userns_path"])
async def test_a_record_whose_pin_path_lies_elsewhere_is_set_aside_untouched(
    rig: Rig, tmp_path: Path, field: str
) -> None:
    # A record (being stopped when the controller died) that names a file outside
    # netns_dir / run_dir: a restart must not unpin or unlink it as root.
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod())
        await ctl.stop_sandbox(st.id)
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    rec = rig.store.records[st.id]
    rig.store.records[st.id] = rec.evolve(pending="stop", **{field: str(precious)})
    async with rig.controller() as ctl:
        assert await ctl.list_sandboxes() == []
        (problem,) = ctl.recovery_problems
        assert st.id in problem and str(precious) in problem and "not the one" in problem
    assert precious.read_text() == "keep me"
    rig.nothing_left()


async def test_a_running_sandbox_whose_record_is_set_aside_is_kept_until_removed(
        rig: Rig) -> None:
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod())
    pause = rig.rt.containers[st.id]
    rec = rig.store.records[st.id]
    rig.store.records[st.id] = rec.evolve(planned_netns_path="/elsewhere")  # refused at load
    for _restart in range(2):  # the stand-in is written: a second start keeps it too
        async with rig.controller() as ctl:
            (kept,) = await ctl.list_sandboxes()
            assert (kept.id, kept.state, kept.name, kept.namespace) == (
                st.id, State.NOT_READY, f"set-aside-{st.id[:12]}", "podfsm")
            assert kept.labels == {"podfsm.io/set-aside": "true"}
            assert kept.last_error is not None and "set aside at start-up" in kept.last_error
            assert "/elsewhere" in kept.last_error and "remove the sandbox" in kept.last_error
            assert any(st.id in p and "kept as found" in p for p in ctl.recovery_problems)
            # nothing of it was torn down: its pause runs, its namespaces and address stay
            assert rig.rt.containers.get(st.id) is pause and pause.returncode is None
            assert rig.ns.pinned and rig.net.reserved
    async with rig.controller() as ctl:
        await ctl.remove_sandbox(st.id)
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()
