"""Durability on the real system: crash anywhere, restart, recover, leak nothing.

Mirrors containerd's sandbox rollback tests (integration/sandbox_run_rollback_test.go),
TestSandboxRemoveWithoutIPLeakage and CRI-O's restore tests. A "crash" is a controller in a
child process that SIGKILLs itself at a failpoint (PODFSM_FAILPOINTS=name=crash); the next
controller starts in this process on the same directories.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from podfsm import Controller, SandboxRunError, SandboxStatus, State
from podfsm.core import failpoints as fp
from podfsm.core.errors import ControllerLocked, StateDirError, StepFailed
from podfsm.core.idmap import find_overlap
from podfsm.core.states import TRANSITIONS
from podfsm.drivers import linux
from podfsm.drivers.store import FileStore
from tests.integration.conftest import (
    Env,
    destroy_env,
    make_env,
    pod,
    running,
    wait_for_state,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN_POINTS = [n for n in fp.NAMES if n.split(".")[0] in fp.RUN_STEPS]
STOP_POINTS = [n for n in fp.NAMES if n.split(".")[0] in fp.STOP_STEPS]
SETTLED = (State.READY, State.NOT_READY)
EDGES = {(t.source.value, t.trigger.value, t.dest.value) for t in TRANSITIONS}


@contextlib.contextmanager
def fresh_env(runtime: str = "runc", **overrides: Any) -> Iterator[Env]:
    env = make_env(runtime, **overrides)
    try:
        yield env
    finally:
        destroy_env(env)


@contextlib.asynccontextmanager
async def with_failpoints(env: Env, failpoints: str) -> AsyncIterator[Controller]:
    """A controller with failpoints (per controller: the environment is not read)."""
    async with Controller(env.cfg, failpoints=failpoints) as ctl:
        yield ctl


def exit_files(env: Env) -> list[str]:
    d = os.path.join(env.cfg.run_dir, "exits")
    return os.listdir(d) if os.path.isdir(d) else []


def assert_history_is_a_path(st: SandboxStatus) -> None:
    """Every entry is an edge of the table and each starts where the previous one ended."""
    state = State.UNKNOWN.value
    for h in st.history:
        assert (h.source, h.trigger, h.dest) in EDGES, h
        assert h.source == state, st.history
        state = h.dest
    assert state == st.state.value


# ---------------------------------------------------------------- a controller in a child


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: the child and what it started (the
    namespace workers; the reaper starts its own session and outlives crashes by design)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        rest = linux.proc_stat(int(pid))
        if rest is None:
            continue
        if rest[0] != "Z" and int(rest[3]) == sid:
            out.append(int(pid))
    return out


@dataclass
class Child:
    proc: subprocess.Popen[str]
    stdout: str = ""
    stderr: str = ""

    @property
    def ready_ids(self) -> list[str]:
        return [ln.split()[1] for ln in self.stdout.splitlines() if ln.startswith("ready ")]

    def kill(self) -> None:
        for pid in _session_members(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def wait(self, timeout: float = 60.0) -> int:
        """Wait for the child's end, then for its session (its namespace workers) to end."""
        try:
            out, err = await anyio.to_thread.run_sync(
                lambda: self.proc.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = await anyio.to_thread.run_sync(self.proc.communicate)
        self.stdout, self.stderr = out, err
        deadline = time.monotonic() + 10
        while _session_members(self.proc.pid):
            assert time.monotonic() < deadline, "the crashed controller's workers linger"
            await anyio.sleep(0.02)
        return self.proc.returncode


def start_child(env: Env, failpoints: str, *, before: list[dict[str, Any]] | None = None,
                pods: list[dict[str, Any]] | None = None, then: str | None = None) -> Child:
    spec = {"cfg": env.cfg.model_dump(mode="json"), "before": before or [],
            "pods": pods or [], "then": then}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.crashchild", json.dumps(spec)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
        env={**os.environ, "PODFSM_FAILPOINTS": failpoints},
    )
    return Child(proc)


@contextlib.asynccontextmanager
async def child(env: Env, failpoints: str, **kw: Any) -> AsyncIterator[Child]:
    c = start_child(env, failpoints, **kw)
    try:
        yield c
    finally:
        c.kill()
        if c.proc.returncode is None:
            await c.wait()


# ---------------------------------------------------------------- the crash matrix

CRUN_SUBSET = [("pin_namespaces.after", None), ("cni_add.after", None),
               ("runtime_create.after", None), ("runtime_start.after", None),
               ("runtime_kill.before", "stop"), ("runtime_delete.after", "remove")]
CRASH_CASES = (
    [pytest.param("runc", p, None, id=f"runc-{p}") for p in RUN_POINTS]
    + [pytest.param("runc", p, then, id=f"runc-{then}-{p}")
       for p in STOP_POINTS for then in ("stop", "remove")]
    + [pytest.param("crun", p, then, id=f"crun-{then or 'run'}-{p}") for p, then in CRUN_SUBSET]
)


@pytest.mark.parametrize(("runtime", "point", "then"), CRASH_CASES)
async def test_crash_at_every_failpoint_recovers_and_leaks_nothing(
    runtime: str, point: str, then: str | None
) -> None:
    with fresh_env(runtime) as env:
        # A sandbox run to Ready by an earlier controller, then the crashing one's victim.
        async with child(env, f"{point}=crash", before=[pod("survivor")], pods=[pod("victim")],
                         then=then) as c:
            rc = await c.wait()
        assert rc == -signal.SIGKILL, f"the failpoint was not met: {c.stdout}{c.stderr}"
        assert "failpoint " + point in c.stderr
        survivor_id = c.ready_ids[0]

        async with running(env) as ctl:
            sts = {s.name: s for s in await ctl.list_sandboxes()}
            assert ctl.recovery_problems == []
            for st in sts.values():
                assert st.state in SETTLED, st  # never stuck in between
                assert_history_is_a_path(st)
            survivor = sts.pop("survivor")
            assert survivor.id == survivor_id and survivor.state is State.READY
            assert survivor.pid is not None and os.path.exists(f"/proc/{survivor.pid}")
            victim = sts.pop("victim", None)
            assert sts == {}
            if point == "save_record.before" or then == "remove":
                # nothing was recorded yet / the remove was finished by the recovery
                assert victim is None
                assert len(env.reservations()) == 1  # the survivor's only
            elif then == "stop":
                # the stop was finished by the recovery
                assert victim is not None and victim.state is State.NOT_READY
                assert victim.history[-1].trigger == "stop" and not victim.leftovers
                assert victim.netns_path and not os.path.lexists(victim.netns_path)
                assert len(env.reservations()) == 1
            else:
                # an interrupted run: NotReady, what it made kept until stop/remove
                assert victim is not None and victim.state is State.NOT_READY
                assert victim.last_error and "interrupted" in victim.last_error
                assert victim.history[-1].trigger == "fail"
            for st in await ctl.list_sandboxes():
                await ctl.stop_sandbox(st.id)
                await ctl.remove_sandbox(st.id)
            assert await ctl.list_sandboxes() == []
            assert env.leftovers() == {}
        assert env.leftovers() == {}
        assert exit_files(env) == []  # the reaper forgot every status it kept


async def test_killed_at_a_random_moment_recovers_and_leaks_nothing(runtime: str) -> None:
    """Not at a failpoint: SIGKILL lands wherever a controller running pod after pod is."""
    rnd = random.Random(f"{runtime}-kill")
    for _ in range(4):
        with fresh_env(runtime) as env:
            async with child(env, "", pods=[pod(f"p{i}") for i in range(30)]) as c:
                await anyio.sleep(0.25 + rnd.random() * 0.4)  # it starts in about 0.2 s
                c.kill()
                assert await c.wait() == -signal.SIGKILL
            async with running(env) as ctl:
                sts = await ctl.list_sandboxes()
                ready = {s.id for s in sts if s.state is State.READY}
                assert ready >= set(c.ready_ids)  # every run that had finished survives
                for st in sts:
                    assert st.state in SETTLED, st
                    assert_history_is_a_path(st)
                for st in sts:
                    await ctl.remove_sandbox(st.id)
                assert env.leftovers() == {}
            assert exit_files(env) == []


def _pinned(netns_dir: str) -> bool:
    names = os.listdir(netns_dir) if os.path.isdir(netns_dir) else []
    return any(linux.is_mountpoint_pin(os.path.join(netns_dir, n)) for n in names)


async def test_slow_cni_add_killed_then_not_ready_with_netns_kept() -> None:
    """containerd's TestRunPodSandboxAndTeardownCNISlow."""
    with fresh_env() as env:
        async with child(env, "cni_add.before=delay(2000)", pods=[pod("slow")]) as c:
            with anyio.fail_after(10):  # the netns is pinned just before the slow ADD
                while not _pinned(env.cfg.netns_dir):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)
            os.kill(c.proc.pid, signal.SIGKILL)
            assert await c.wait() == -signal.SIGKILL
        assert c.ready_ids == []
        async with running(env) as ctl:
            (st,) = await ctl.list_sandboxes()
            assert st.state is State.NOT_READY
            assert st.netns_path and linux.is_mountpoint_pin(st.netns_path)  # kept, not closed
            assert st.netns_path.startswith(env.cfg.netns_dir)
            await ctl.stop_sandbox(st.id)
            assert not os.path.lexists(st.netns_path)
            await ctl.remove_sandbox(st.id)
            assert env.leftovers() == {}


# ---------------------------------------------------------------- the same with `error`


ERROR_CASES = ([pytest.param("runc", p, id=f"runc-{p}") for p in RUN_POINTS]
               + [pytest.param("crun", p, id=f"crun-{p}")
                  for p in ("pin_namespaces.after", "runtime_create.after",
                            "runtime_start.after")])


@pytest.mark.parametrize(("runtime", "point"), ERROR_CASES)
async def test_error_at_every_run_failpoint_unwinds_to_nothing(runtime: str, point: str) -> None:
    with fresh_env(runtime) as env:
        async with with_failpoints(env, f"{point}=error") as ctl:
            with pytest.raises(SandboxRunError) as info:
                await ctl.run_sandbox(pod())
            assert point in str(info.value) and info.value.leftovers == []
            assert await ctl.list_sandboxes() == []
            assert env.leftovers() == {}


@pytest.mark.parametrize("point", STOP_POINTS)
async def test_error_at_every_stop_failpoint_leaves_not_ready_then_remove_cleans(
    point: str,
) -> None:
    with fresh_env() as env:
        async with with_failpoints(env, f"{point}=1*error") as ctl:
            st = await ctl.run_sandbox(pod())
            with pytest.raises(StepFailed) as info:
                await ctl.stop_sandbox(st.id)
            assert point in str(info.value)
            after = await ctl.sandbox_status(st.id)
            assert after.state is State.NOT_READY and after.leftovers
            assert_history_is_a_path(after)
        async with running(env) as ctl:  # the restart finishes the stop that was asked for
            (again,) = await ctl.list_sandboxes()
            assert again.state is State.NOT_READY and not again.leftovers
            assert again.history[-1].trigger == "stop" and again.history[-1].error is None
            assert_history_is_a_path(again)
            assert env.reservations() == [] and env.containers() == []
            await ctl.remove_sandbox(st.id)
            assert env.leftovers() == {}


async def test_start_fails_and_unwinding_fails_too_then_remove_succeeds(runtime: str) -> None:
    with fresh_env(runtime) as env:
        async with with_failpoints(
            env, "runtime_start.before=error;runtime_delete.before=error"
        ) as ctl:
            with pytest.raises(SandboxRunError) as info:
                await ctl.run_sandbox(pod())
            assert any("runtime delete" in x for x in info.value.leftovers)
            assert "unwinding failed too" in str(info.value)
            (st,) = await ctl.list_sandboxes()
            assert st.state is State.NOT_READY and st.leftovers
            assert_history_is_a_path(st)
            assert env.containers() == [st.id]  # what is left, is left
        async with running(env) as ctl:
            (again,) = await ctl.list_sandboxes()
            assert again.id == st.id and again.state is State.NOT_READY
            await ctl.remove_sandbox(st.id)
            assert await ctl.list_sandboxes() == []
            assert env.leftovers() == {}


# ---------------------------------------------------------------- restarts


async def test_ready_sandbox_survives_a_restart_and_its_exit_is_still_noticed(
    runtime: str,
) -> None:
    with fresh_env(runtime) as env:
        async with env.controller() as ctl:
            st = await ctl.run_sandbox(pod())
        # the first controller is gone; the sandbox runs on
        assert st.pid is not None and os.path.exists(f"/proc/{st.pid}")
        async with running(env) as ctl:
            again = await ctl.sandbox_status(st.id)
            assert again.state is State.READY
            assert (again.ip, again.additional_ips, again.created_at, again.pid) == (
                st.ip, st.additional_ips, st.created_at, st.pid)
            assert (again.uid_mappings, again.gid_mappings) == (st.uid_mappings,
                                                                st.gid_mappings)
            assert again.netns_path == st.netns_path and again.userns_path == st.userns_path
            os.kill(st.pid, signal.SIGKILL)
            took = await wait_for_state(ctl, st.id, State.NOT_READY, within=1.0)
            assert took < 1.0
            dead = await ctl.sandbox_status(st.id)
            assert dead.exit_status == 137 and dead.ip == st.ip
            await ctl.remove_sandbox(st.id)
            assert env.leftovers() == {}


async def test_pause_dies_while_controller_is_down(runtime: str) -> None:
    with fresh_env(runtime) as env:
        async with env.controller() as ctl:
            st = await ctl.run_sandbox(pod())
        assert st.pid is not None
        os.kill(st.pid, signal.SIGKILL)
        with anyio.fail_after(5):
            while os.path.exists(f"/proc/{st.pid}"):  # noqa: ASYNC110  (reaped meanwhile)
                await anyio.sleep(0.01)
        async with running(env) as ctl:
            after = await ctl.sandbox_status(st.id)
            assert after.state is State.NOT_READY
            assert after.exit_status == 137  # the reaper kept it
            assert after.history[-1].trigger == "task_exit"
            assert after.ip == st.ip and len(env.reservations()) == 1  # still reserved
            await ctl.stop_sandbox(st.id)
            assert env.reservations() == []
            await ctl.remove_sandbox(st.id)
            assert env.leftovers() == {}


# ---------------------------------------------------------------- cancellation


CANCEL_AT = ["save_record.after", "pin_namespaces.before", "pin_namespaces.after",
             "cni_add.before", "cni_add.after", "runtime_create.before",
             "runtime_create.after", "runtime_start.before", "runtime_start.after"]


@pytest.mark.parametrize("point", CANCEL_AT)
async def test_cancelled_run_is_ready_or_fully_unwound(point: str) -> None:
    with fresh_env() as env:
        async with with_failpoints(env, f"{point}=delay(300)") as ctl:
            with anyio.move_on_after(0.1) as scope:
                await ctl.run_sandbox(pod())
            assert scope.cancelled_caught
            assert await ctl.list_sandboxes() == []
            assert env.leftovers() == {}


async def test_cancelled_at_any_moment_is_ready_or_fully_unwound() -> None:
    """No delay: the cancellation lands wherever the run happens to be (in CNI ADD, in
    runtime create or start, in a record write)."""
    outcomes = []
    with fresh_env() as env:
        async with running(env) as ctl:
            # a whole run takes about 17 ms here: sweep it in 1 ms steps, then on until a run
            # beats its deadline (a loaded machine is slower; a cancellation before the last
            # step always unwinds)
            sweep = [*range(0, 25), *range(30, 2000, 30)]
            for ms in sweep:
                if ms >= 25 and False in outcomes:
                    break
                with anyio.move_on_after(ms / 1000) as scope:
                    await ctl.run_sandbox(pod(f"c{ms}"))
                sts = await ctl.list_sandboxes()
                if scope.cancelled_caught:
                    assert sts == [], ms
                    assert env.leftovers() == {}, ms
                else:
                    (st,) = sts
                    assert st.state is State.READY
                    await ctl.remove_sandbox(st.id)
                outcomes.append(scope.cancelled_caught)
            assert env.leftovers() == {}
    assert True in outcomes and False in outcomes  # cancelled at some moments, not all


# ---------------------------------------------------------------- concurrency


async def test_concurrent_operations_on_one_sandbox_are_serialized() -> None:
    with fresh_env() as env:
        async with running(env) as ctl:
            seen: list[tuple[str, str, str]] = []
            started = anyio.Event()

            async def watch() -> None:
                started.set()
                async for ev in ctl.events():
                    seen.append((ev.source, ev.trigger, ev.dest))
                    if ev.trigger == "remove":
                        return

            statuses: list[State] = []

            async def poke(i: int, sid: str) -> None:
                for _ in range(3):
                    with contextlib.suppress(KeyError):
                        statuses.append((await ctl.sandbox_status(sid)).state)
                    if i % 3 == 0:
                        await ctl.stop_sandbox(sid)
                    elif i % 3 == 1 and i > 10:
                        await ctl.remove_sandbox(sid)
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await started.wait()
                await anyio.sleep(0.01)
                result: list[SandboxStatus] = []

                async def runner() -> None:
                    result.append(await ctl.run_sandbox(pod("one")))

                tg.start_soon(runner)
                with anyio.fail_after(5):
                    while not await ctl.list_sandboxes():
                        await anyio.lowlevel.checkpoint()
                (early,) = await ctl.list_sandboxes()
                # many tasks at once, while the run is still going on
                for i in range(24):
                    tg.start_soon(poke, i, early.id)
            assert result and result[0].state is State.READY  # the run was not disturbed
            state = State.UNKNOWN.value
            for source, trigger, dest in seen:
                assert (source, trigger, dest) in EDGES
                assert source == state, seen
                state = dest
            assert [t for _, t, _ in seen][:4] == ["setup_namespaces", "create_container",
                                                  "start_task", "mark_ready"]
            assert seen[-1][1] == "remove"
            # what the status calls saw, in the order they saw it, never went back: it is a
            # walk along the visited states
            visited = [State.UNKNOWN.value] + [dest for _, _, dest in seen]
            at = 0
            for observed in statuses:
                while visited[at] != observed.value:
                    at += 1
                    assert at < len(visited), (statuses, visited)
            assert len(statuses) > 24
            assert await ctl.list_sandboxes() == []
            assert env.leftovers() == {}


# ---------------------------------------------------------------- refusals


async def test_second_controller_on_the_same_state_dir_is_refused() -> None:
    with fresh_env() as env:
        async with env.controller():
            with pytest.raises(ControllerLocked, match="another podfsm controller"):
                async with env.controller():
                    pass
            # the same run_dir with another state_dir would collect our sandboxes as orphans
            other = os.path.join(env.tmp, "state2")
            with pytest.raises(ControllerLocked, match="run dir"):
                async with env.controller(state_dir=other):
                    pass
        async with env.controller():  # released on exit
            pass


def _mount_tmpfs(path: str, options: str) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "podfsm-test", path], check=True)


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], check=False, capture_output=True)


def record_files(env: Env, sid: str, in_dir: str = "sandboxes") -> list[str]:
    """The slot files that hold a sandbox's record (see podfsm.drivers.store)."""
    d = os.path.join(env.cfg.state_dir, in_dir)
    found = [os.path.join(d, f"{sid}{slot}") for slot in FileStore.SLOTS]
    found = [p for p in found if os.path.exists(p)]
    assert found, f"no record of {sid} in {d}"
    return found


def _records(env: Env) -> list[str]:
    return sorted(os.listdir(os.path.join(env.cfg.state_dir, "sandboxes")))


def _leftovers_but(env: Env, own_mount: str) -> dict[str, list[Any]]:
    """env.leftovers() without the test's own tmpfs and what the test put in it."""
    found = env.leftovers()
    found["mounts"] = [m for m in found.get("mounts", []) if m != own_mount]
    found["records"] = [r for r in found.get("records", []) if r != "filler"]
    return {k: v for k, v in found.items() if v}


async def test_read_only_state_dir_is_refused_cleanly() -> None:
    with fresh_env() as env:
        _mount_tmpfs(env.cfg.state_dir, "ro,size=1m,mode=0700")
        try:
            with pytest.raises(StateDirError, match="read-only"):
                async with env.controller():
                    pass
        finally:
            _umount(env.cfg.state_dir)
        # read-only while running: the run is refused before anything is made
        records = os.path.join(env.cfg.state_dir, "sandboxes")
        _mount_tmpfs(records, "size=1m,mode=0700")
        try:
            async with running(env) as ctl:
                await anyio.run_process(["mount", "-o", "remount,ro", records])
                with pytest.raises(StateDirError, match="read-only"):
                    await ctl.run_sandbox(pod())
                assert _records(env) == []  # no half-written record, no temporary file
                assert await ctl.list_sandboxes() == []
                assert _leftovers_but(env, records) == {}
                await anyio.run_process(["mount", "-o", "remount,rw", records])
                st = await ctl.run_sandbox(pod())
                await ctl.remove_sandbox(st.id)
        finally:
            _umount(records)
        assert env.leftovers() == {}


def _fill(directory: str) -> str:
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


async def test_full_state_dir_is_refused_cleanly() -> None:
    with fresh_env() as env:
        records = os.path.join(env.cfg.state_dir, "sandboxes")
        _mount_tmpfs(records, "size=256k,mode=0700")
        try:
            async with with_failpoints(env, "cni_add.after=1*delay(300)") as ctl:
                filler = _fill(records)
                with pytest.raises(StateDirError, match="full"):
                    await ctl.run_sandbox(pod())
                assert _records(env) == ["filler"]  # no record, no .tmp file
                assert await ctl.list_sandboxes() == []
                os.unlink(filler)
                # the disk fills in the middle of a run, before the write that needs the
                # record's second slot file: it unwinds all the same

                async def fill_soon() -> None:
                    await anyio.sleep(0.15)
                    _fill(records)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(fill_soon)
                    with pytest.raises(SandboxRunError) as info:
                        await ctl.run_sandbox(pod())
                assert isinstance(info.value.cause, StateDirError)
                assert "full" in str(info.value) and info.value.leftovers == []
                assert _records(env) == ["filler"]
                assert await ctl.list_sandboxes() == []
                assert _leftovers_but(env, records) == {}
                os.unlink(filler)
                st = await ctl.run_sandbox(pod())  # with room again, all is well
                await ctl.remove_sandbox(st.id)
        finally:
            _umount(records)


async def test_corrupt_record_is_set_aside_its_sandbox_kept_and_the_others_recover(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with fresh_env() as env:
        async with env.controller() as ctl:
            sts = [await ctl.run_sandbox(pod(f"p{i}")) for i in range(3)]
        bad = sts[1]
        for path in record_files(env, bad.id):
            os.truncate(path, 100)  # both slots torn: nothing of the record can be read
        caplog.set_level(logging.ERROR)
        async with running(env) as ctl:
            assert any("corrupt record" in r.getMessage() and bad.id in r.getMessage()
                       for r in caplog.records)
            assert any(bad.id in p for p in ctl.recovery_problems)
            assert sorted(os.listdir(os.path.join(env.cfg.state_dir, "corrupt"))) == sorted(
                os.path.basename(p) for p in record_files(env, bad.id, in_dir="corrupt"))
            listed = {s.id: s for s in await ctl.list_sandboxes()}
            assert set(listed) == {s.id for s in sts}
            assert all(listed[s.id].state is State.READY for s in (sts[0], sts[2]))
            # the unreadable record's sandbox is kept as found, listed NotReady, until removed
            kept = listed[bad.id]
            assert kept.state is State.NOT_READY and kept.name == f"set-aside-{bad.id[:12]}"
            assert kept.last_error is not None and "torn record" in kept.last_error
            assert bad.id in env.containers()
            assert len(env.reservations()) == 3
            assert bad.pid is not None and os.path.exists(f"/proc/{bad.pid}")
            for sid in listed:
                await ctl.remove_sandbox(sid)
            assert not os.path.exists(f"/proc/{bad.pid}")
            assert env.leftovers() == {}


# ---------------------------------------------------------------- id ranges


async def test_id_ranges_persist_across_restarts_and_are_freed_on_remove() -> None:
    with fresh_env() as env:
        async with env.controller() as ctl:
            a = await ctl.run_sandbox(pod("a"))
        async with running(env) as ctl:
            b = await ctl.run_sandbox(pod("b"))
            ra, rb = a.uid_mappings[0], b.uid_mappings[0]
            assert find_overlap(rb, [ra]) is None  # in use across the restart: not handed out
            assert a.gid_mappings == a.uid_mappings and b.gid_mappings == b.uid_mappings
            await ctl.remove_sandbox(a.id)
            c = await ctl.run_sandbox(pod("c"))
            assert c.uid_mappings[0] == ra  # freed by the remove: the lowest free range again
            for st in (b, c):
                await ctl.remove_sandbox(st.id)
            assert env.leftovers() == {}


# ---------------------------------------------------------------- orphans


async def test_what_has_no_record_is_collected_on_start(runtime: str) -> None:
    with fresh_env(runtime) as env:
        async with env.controller() as ctl:
            kept = await ctl.run_sandbox(pod("kept"))
            lost = await ctl.run_sandbox(pod("lost"))
            host_net = await ctl.run_sandbox(pod("hostnet", network="NODE"))
        for st in (lost, host_net):
            for path in record_files(env, st.id):
                os.unlink(path)
        assert len(env.containers()) == 3 and len(env.reservations()) == 2
        async with running(env) as ctl:
            (only,) = await ctl.list_sandboxes()
            assert only.id == kept.id and only.state is State.READY
            assert env.containers() == [kept.id]
            assert len(env.reservations()) == 1
            assert lost.netns_path and not os.path.lexists(lost.netns_path)
            for st in (lost, host_net):
                assert st.pid is not None and not os.path.exists(f"/proc/{st.pid}")
            await ctl.remove_sandbox(kept.id)
            assert env.leftovers() == {}


async def test_another_controllers_pins_are_never_touched() -> None:
    with fresh_env() as mine, fresh_env() as theirs_env:
        theirs = Env(theirs_env.tmp, theirs_env.cfg.model_copy(
            update={"netns_dir": mine.cfg.netns_dir}), theirs_env.network, theirs_env.bridge,
            theirs_env.subnet)
        async with theirs.controller() as other:
            st = await other.run_sandbox(pod("theirs"))
        assert st.netns_path and os.path.dirname(st.netns_path) == mine.cfg.netns_dir
        # an orphan pin of ours beside it, as a crash before the first record could leave
        async with mine.controller() as ctl:
            ours = await ctl.run_sandbox(pod("ours"))
        for path in record_files(mine, ours.id):
            os.unlink(path)
        async with running(mine) as ctl:
            assert await ctl.list_sandboxes() == []
            assert ours.netns_path and not os.path.lexists(ours.netns_path)
            assert linux.is_mountpoint_pin(st.netns_path)  # theirs: untouched
            assert st.pid is not None and os.path.exists(f"/proc/{st.pid}")
        async with running(theirs) as other:
            again = await other.sandbox_status(st.id)
            assert again.state is State.READY
            await other.remove_sandbox(st.id)
        assert mine.leftovers() == {}
        assert theirs.leftovers() == {}
