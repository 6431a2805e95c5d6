"""What podfsm refuses to trust on the host: directories others can change, symlinks planted
where it keeps root's files, commands that never end (issue 9, items 10 and 11)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from podfsm import SandboxRunError, State
from podfsm.core.errors import UnsafeDirectory
from podfsm.drivers import linux, reaper, reaperclient
from podfsm.drivers.runtime import OciRuntime, container_cgroup_dirs
from tests.integration.conftest import destroy_env, make_env, pod, running
from tests.integration.test_durability import child

pytestmark = pytest.mark.integration


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_directories_are_created_with_tight_modes() -> None:
    env = make_env("runc")
    try:
        async with env.controller():
            pass
        assert _mode(env.cfg.state_dir) == 0o711  # searchable: a userns container's rootfs
        assert _mode(os.path.join(env.cfg.state_dir, "sandboxes")) == 0o700
        assert _mode(env.cfg.run_dir) == 0o711
        assert _mode(env.cfg.netns_dir) == 0o755
        assert _mode(os.path.join(env.cfg.run_dir, reaper.EXITS_DIR)) == 0o700
    finally:
        destroy_env(env)


async def test_a_state_dir_made_0700_by_an_older_podfsm_is_given_the_search_bits() -> None:
    env = make_env("runc")
    try:
        os.makedirs(env.cfg.state_dir, mode=0o700, exist_ok=True)
        os.chmod(env.cfg.state_dir, 0o700)
        async with env.controller():
            pass
        assert _mode(env.cfg.state_dir) == 0o711  # a userns container's root walks through
    finally:
        destroy_env(env)


@pytest.mark.parametrize("which", ["state_dir", "run_dir", "netns_dir"])
@pytest.mark.parametrize("problem", ["group-writable", "other-writable", "foreign-owner"])
async def test_a_directory_another_user_could_change_is_refused(which: str, problem: str) -> None:
    env = make_env("runc")
    try:
        d = getattr(env.cfg, which)
        os.makedirs(d, mode=0o755)
        if problem == "foreign-owner":
            os.chown(d, 65534, 65534)
        else:
            os.chmod(d, 0o775 if problem == "group-writable" else 0o757)
        with pytest.raises(UnsafeDirectory) as info:
            async with env.controller():
                pass
        msg = str(info.value)
        assert d in msg
        assert ("uid 65534" if problem == "foreign-owner" else "writable by group or others") in msg
        # refused before anything was made in it or beside it
        assert os.listdir(d) == []
    finally:
        destroy_env(env)


async def test_an_existing_root_0755_netns_dir_is_fine(tmp_path: Path) -> None:
    # /run/netns as `ip netns` leaves it
    env = make_env("runc")
    try:
        os.makedirs(env.cfg.netns_dir, mode=0o755)
        os.chmod(env.cfg.netns_dir, 0o755)
        async with env.controller():
            pass
    finally:
        destroy_env(env)


def test_a_symlink_is_never_followed_by_unpin_or_directory_removal(tmp_path: Path) -> None:
    # A mount that a symlink points at: unpinning the link removes the link only.
    mounted = tmp_path / "mounted"
    mounted.write_text("")
    linux.mount("/proc/self/ns/net", str(mounted), None, linux.MS_BIND)
    try:
        link = tmp_path / "pin"
        link.symlink_to(mounted)
        linux.unpin(str(link))
        assert not os.path.lexists(link)
        assert linux.is_mountpoint_pin(str(mounted))
    finally:
        linux.unpin(str(mounted))
    # A directory that a symlink points at: removing the link's "directory" touches nothing.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("keep")
    bundle = tmp_path / "bundle"
    bundle.symlink_to(precious)
    with pytest.raises(OSError):
        linux.remove_flat_dir(str(bundle))
    assert (precious / "file").read_text() == "keep"
    # ... and a symlink inside a directory goes as a link
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(precious)
    linux.remove_flat_dir(str(run))
    assert not run.exists() and (precious / "file").read_text() == "keep"


def test_the_reapers_files_are_never_opened_through_a_symlink(tmp_path: Path) -> None:
    os.makedirs(tmp_path / reaper.EXITS_DIR)
    target = tmp_path / "target"
    target.write_text("7\n")
    exit_path = reaper.exit_file(str(tmp_path), 42, 4242)
    os.symlink(target, exit_path)
    os.symlink(target, exit_path + ".tmp")
    server = reaper.ReaperServer(str(tmp_path))
    assert server._read_exit_file((42, 4242)) is None  # not read through the link
    reaper._atomic_write(exit_path, b"0\n")  # replaces the links, never writes through them
    assert target.read_text() == "7\n"
    assert Path(exit_path).read_text() == "0\n" and not os.path.islink(exit_path)


# ---------------------------------------------------------------- commands that never end


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (a unique sleep duration)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        fields = linux.proc_stat(int(pid))
        if marker.encode() in cmd and fields is not None and fields[0] != "Z":
            out.append(int(pid))
    return out


async def _until(predicate: Callable[[], bool], within: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < within, what
        await anyio.sleep(0.02)
    return time.monotonic() - t0


async def test_a_runtime_command_past_its_timeout_is_killed_with_its_children(
    runtime: str, tmp_path: Path
) -> None:
    # `start` hangs in a grandchild (a plain kill of the command would leave the sleep behind,
    # holding the reaper's pipes): the step fails naming the timeout, and nothing is left.
    marker = f"6543.{os.getpid()}1"
    real = shutil.which(runtime)
    wrapper = _script(tmp_path / runtime, f"""
for a in "$@"; do
  if [ "$a" = start ]; then sleep {marker} & wait; fi
done
exec {real} "$@"
""")
    env = make_env(runtime, runtime_binary=wrapper, command_timeout=1.0)
    try:
        async with env.controller() as c:
            t0 = time.monotonic()
            with pytest.raises(SandboxRunError) as info:
                await c.run_sandbox(pod())
            assert time.monotonic() - t0 < 10
            assert "timeout after 1 s" in str(info.value)
            assert info.value.step == "start_task"
            assert info.value.leftovers == []
            assert await c.list_sandboxes() == []
        assert _processes_with(marker) == []
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


async def test_a_plugin_running_when_the_controller_is_killed_is_killed_and_recovered(
    tmp_path: Path,
) -> None:
    marker = f"6543.{os.getpid()}2"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _script(bindir / "bridge", f"""
if [ "$CNI_COMMAND" = ADD ]; then sleep {marker} & wait; fi
exec /usr/lib/cni/bridge "$@"
""")
    env = make_env("runc", cni_bin_dirs=(str(bindir), "/usr/lib/cni"))
    try:
        async with child(env, "", pods=[pod("victim")]) as c:
            await _until(lambda: bool(_processes_with(marker)), 30, "the plugin never ran")
            c.kill()
            await c.wait()
        # the reaper saw its client go and killed the plugin's whole group at once
        await _until(lambda: not _processes_with(marker), 3, "the plugin outlived the controller")
        async with running(env) as ctl:
            assert ctl.recovery_problems == []
            (st,) = await ctl.list_sandboxes()
            assert st.state is State.NOT_READY
            assert "interrupted by a controller restart" in (st.last_error or "")
            await ctl.remove_sandbox(st.id)
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


@pytest.mark.parametrize("end", ["timeout", "client gone"])
async def test_a_killed_command_takes_every_process_it_started(end: str) -> None:
    # One helper leaves the command's process group and session (as `crun create`'s child
    # does): killing the group alone would leave it waiting forever.
    marker = f"6543.{os.getpid()}3"
    run_dir = tempfile.mkdtemp(prefix="pfsm-")  # short: the reaper's socket path must fit
    client = reaperclient.ReaperClient(run_dir, idle_exit=0.3)
    try:
        argv = ["sh", "-c", f"setsid sleep {marker} & sleep {marker}"]
        if end == "timeout":
            with pytest.raises(reaper.ReaperError, match=r"timeout after 0\.5 s"):
                await client.run(argv, timeout=0.5)
        else:
            async def run_until_dropped() -> None:
                with contextlib.suppress(reaper.ReaperError):
                    await client.run(argv)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_until_dropped)
                await _until(lambda: len(_processes_with(marker)) >= 3, 10, "never ran")
                await client.close()  # as a SIGKILLed controller's connection closes
                tg.cancel_scope.cancel()
        await _until(lambda: not _processes_with(marker), 3, "a helper outlived the command")
    finally:
        await client.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def _make_container_cgroups(cid: str, made: list[str]) -> list[str]:
    """The container's cgroup dirs as a create killed halfway leaves them (the podfsm parents
    it had to make are added to `made`)."""
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")  # cgroup v2 only
    leaves = []
    for hierarchy in ("",) if unified else ("pids/", "memory/"):
        parent = f"/sys/fs/cgroup/{hierarchy}podfsm"
        if not os.path.isdir(parent):
            os.mkdir(parent)
            made.append(parent)
        os.mkdir(f"{parent}/{cid}")
        leaves.append(f"{parent}/{cid}")
    return leaves


async def test_delete_removes_the_cgroups_a_create_killed_halfway_left(runtime: str) -> None:
    # What a `create` killed halfway leaves: the container's cgroups, and no state the runtime
    # could find them by.
    env = make_env(runtime)
    cid = "c9" * 32
    made: list[str] = []
    try:
        rt = OciRuntime(runtime, env.cfg.run_dir)  # type: ignore[arg-type]
        await rt.start()
        unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")  # cgroup v2 only
        _make_container_cgroups(cid, made)
        assert len(container_cgroup_dirs("", cid)) == (1 if unified else 2)
        # cgroup paths are global: a controller on another run_dir leaves them alone
        other = OciRuntime(runtime, os.path.join(env.tmp, "other-run"))  # type: ignore[arg-type]
        await other.start()
        await other.delete(cid)
        await other.close()
        assert len(container_cgroup_dirs("", cid)) == (1 if unified else 2)
        os.makedirs(rt.bundle_path(cid))  # the create was this controller's
        await rt.delete(cid)
        assert container_cgroup_dirs("", cid) == []
        assert not os.path.exists(rt.bundle_path(cid))
        await rt.close()
    finally:
        for d in container_cgroup_dirs("", cid) + made[::-1]:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        destroy_env(env)


async def test_delete_kills_what_a_create_killed_halfway_left_in_its_cgroup(runtime: str) -> None:
    # crun's container init calls setsid: a `create` killed halfway can leave it alive in the
    # container's cgroup, waiting for a start that never comes, with no runtime state left.
    env = make_env(runtime)
    cid = "d8" * 32
    made: list[str] = []
    lingering = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 (starts at once)
    reaped = threading.Thread(target=lingering.wait, daemon=True)  # reap it as it dies
    reaped.start()
    try:
        rt = OciRuntime(runtime, env.cfg.run_dir)  # type: ignore[arg-type]
        await rt.start()
        for leaf in _make_container_cgroups(cid, made):
            Path(f"{leaf}/cgroup.procs").write_text(str(lingering.pid))
        os.makedirs(rt.bundle_path(cid))  # the create was this controller's
        await rt.delete(cid)
        reaped.join(5)
        assert lingering.poll() == -signal.SIGKILL
        assert container_cgroup_dirs("", cid) == []
        await rt.close()
    finally:
        if lingering.poll() is None:
            lingering.kill()
        for d in container_cgroup_dirs("", cid) + made[::-1]:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        destroy_env(env)
