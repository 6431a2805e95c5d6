"""A real pod sandbox with a pod-level user namespace, end to end, for runc AND crun.

Mirrors critest's user-namespace tests and containerd's netns/userns and IP-leak tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from podfsm import (
    InvalidPodConfig,
    PrerequisiteMissing,
    SandboxRunError,
    State,
)
from podfsm.core import cniconf
from podfsm.core.idmap import find_overlap
from podfsm.drivers import linux
from tests.integration.conftest import (
    Env,
    destroy_env,
    exiting_static_binary,
    make_env,
    pod,
    running,
    wait_for_state,
)

pytestmark = pytest.mark.integration

# critest maps 0 -> 1000 (100000 ids); podfsm keeps a pod inside its id pool (never host ids
# 0-65535) and at most 65536 ids long, so the same check runs on a range of the pool.
CRITEST_MAP = [{"host_id": 2000000, "container_id": 0, "length": 65536}]


def inside(userns: str, *argv: str) -> str:
    """Run a host binary inside the pod's user namespace only."""
    return subprocess.run(["nsenter", f"--user={userns}", *argv], capture_output=True,
                          text=True, check=True).stdout


async def test_mapping_ownership_and_sysfs_are_the_pods(env: Env) -> None:
    async with running(env) as ctl:
        st = await ctl.run_sandbox(pod(userns={"mode": "POD", "uids": CRITEST_MAP,
                                               "gids": CRITEST_MAP}))
        assert st.state is State.READY
        assert st.pid is not None and st.userns_path and st.netns_path
        # critest: /proc/self/uid_map inside matches \s+0\s+1000\s+100000 (here, in the pool)
        for f in ("uid_map", "gid_map"):
            seen = inside(st.userns_path, "cat", f"/proc/self/{f}")
            assert re.search(r"\s*0\s+2000000\s+65536", seen)
        assert " ".join(Path(f"/proc/{st.pid}/uid_map").read_text().split()) == "0 2000000 65536"
        assert Path(f"/proc/{st.pid}/setgroups").read_text().strip() == "allow"
        # containerd: the netns is owned by the pod's user namespace, which is the pause pid's
        pause_user = linux.ns_inode(f"/proc/{st.pid}/ns/user")
        assert linux.netns_owner_inode(st.netns_path) == pause_user
        host_user = linux.ns_inode("/proc/self/ns/user")
        assert pause_user == linux.ns_inode(st.userns_path) != host_user
        assert linux.ns_inode(f"/proc/{st.pid}/ns/net") == linux.ns_inode(st.netns_path)
        # a real sysfs of the pod's netns, not the host's
        in_pod = sorted(os.listdir(f"/proc/{st.pid}/root/sys/class/net"))
        assert in_pod == ["eth0", "lo"]
        assert env.bridge not in in_pod and env.bridge in os.listdir("/sys/class/net")
        # the pins are bind mounts of nsfs inodes
        assert linux.is_mountpoint_pin(st.netns_path) and linux.is_mountpoint_pin(st.userns_path)


async def test_cni_address_is_on_eth0_and_answers_ping(env: Env) -> None:
    async with running(env) as ctl:
        st = await ctl.run_sandbox(pod())
        assert st.ip.startswith(env.subnet.rsplit(".", 2)[0])
        ifaces = {i.name: i for i in await ctl.sandbox_interfaces(st.id)}
        assert any(a.split("/")[0] == st.ip for a in ifaces["eth0"].addresses)
        assert ifaces["lo"].up
        ping = await anyio.run_process(["ping", "-c", "1", "-W", "2", st.ip], check=False)
        assert ping.returncode == 0, ping.stdout


async def test_kill_9_of_pause_gives_not_ready_and_keeps_the_ip_until_stop(env: Env) -> None:
    async with running(env) as ctl:
        st = await ctl.run_sandbox(pod())
        assert st.pid is not None
        os.kill(st.pid, signal.SIGKILL)
        await wait_for_state(ctl, st.id, State.NOT_READY, within=1.0)
        after = await ctl.sandbox_status(st.id)
        assert after.exit_status == 137
        assert after.ip == st.ip
        assert len(env.reservations()) == 1  # containerd TestSandboxRemoveWithoutIPLeakage
        await ctl.stop_sandbox(st.id)
        assert env.reservations() == []
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        await ctl.stop_sandbox("0" * 64)
        await ctl.remove_sandbox("unknown")
        assert env.leftovers() == {}


async def test_stop_then_remove_leaves_nothing(env: Env) -> None:
    async with running(env) as ctl:
        st = await ctl.run_sandbox(pod())
        await ctl.stop_sandbox(st.id)
        stopped = await ctl.sandbox_status(st.id)
        assert stopped.state is State.NOT_READY
        assert stopped.history[-1].trigger == "stop"
        await ctl.remove_sandbox(st.id)
        assert await ctl.list_sandboxes() == []
        assert env.leftovers() == {}


async def test_node_user_namespace_and_host_network_variants(env: Env) -> None:
    async with running(env) as ctl:
        node = await ctl.run_sandbox(pod("node-userns", userns={"mode": "NODE"}))
        assert node.userns_path is None and node.netns_path
        assert node.pid is not None
        assert linux.ns_inode(f"/proc/{node.pid}/ns/user") == linux.ns_inode("/proc/self/ns/user")
        assert linux.netns_owner_inode(node.netns_path) == linux.ns_inode("/proc/self/ns/user")
        hostnet = await ctl.run_sandbox(pod("host-net", network="NODE"))
        assert hostnet.netns_path is None and hostnet.userns_path and hostnet.ip == ""
        assert hostnet.pid is not None
        host_net = linux.ns_inode("/proc/self/ns/net")
        assert linux.ns_inode(f"/proc/{hostnet.pid}/ns/net") == host_net
        # the host's /sys bound read-only: the host's interfaces are visible, nothing is writable
        assert env.bridge in os.listdir(f"/proc/{hostnet.pid}/root/sys/class/net")
        for st in (node, hostnet):
            await ctl.remove_sandbox(st.id)
        assert env.leftovers() == {}


BAD_PODS: dict[str, dict[str, Any]] = {
    "two mappings": pod(userns={"mode": "POD", "uids": CRITEST_MAP * 2, "gids": CRITEST_MAP}),
    "container id not 0": pod(userns={"mode": "POD", "gids": CRITEST_MAP, "uids": [
        {"host_id": 1000, "container_id": 1, "length": 100000}]}),
    "length 0": pod(userns={"mode": "POD", "gids": CRITEST_MAP, "uids": [
        {"host_id": 1000, "container_id": 0, "length": 0}]}),
    "mode CONTAINER": pod(userns={"mode": "CONTAINER"}),
    "mode TARGET": pod(userns={"mode": "TARGET"}),
    "bad name": {"metadata": {"name": "not;a;name"}},
    "name with a trailing newline": {"metadata": {"name": "web\n"}},
}


async def test_every_refused_pod_config_leaves_nothing(env: Env) -> None:
    async with running(env) as ctl:
        for case, data in BAD_PODS.items():
            with pytest.raises(InvalidPodConfig):
                await ctl.run_sandbox(data)
            assert env.leftovers() == {}, case
        assert await ctl.list_sandboxes() == []


async def test_ten_concurrent_sandboxes(env: Env) -> None:
    async with running(env) as ctl:
        results = []

        async def one(i: int) -> None:
            results.append(await ctl.run_sandbox(pod(f"p{i}")))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert [s.state for s in results] == [State.READY] * 10
        assert len({s.ip for s in results}) == 10
        maps = [s.uid_mappings[0] for s in results]
        assert all(find_overlap(m, maps[:i] + maps[i + 1:]) is None for i, m in enumerate(maps))
        assert all(m.host_id >= 65536 and m.length == 65536 for m in maps)
        async with anyio.create_task_group() as tg:
            for s in results:
                tg.start_soon(ctl.remove_sandbox, s.id)
        assert env.leftovers() == {}


# ---------------------------------------------------------------- injected failures


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_failing_cni_plugin_unwinds_to_nothing(runtime: str, tmp_path: Path) -> None:
    # bridge ADD succeeds, then a plugin chained after it fails: the bridge's address and veth
    # must be released by the unwinding
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _script(bindir / "pfsm-fail", """
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","code":11,"msg":"no network today"}'; exit 1
fi
echo '{}'
""")
    env = make_env(runtime, cni_bin_dirs=(str(bindir), "/usr/lib/cni"))
    conf = cniconf.default_conflist(env.network, env.bridge, env.subnet)
    conf["plugins"].append({"type": "pfsm-fail"})
    Path(env.cfg.cni_conf_dir, "10-fail.conflist").write_text(json.dumps(conf))
    try:
        async with env.controller() as c:
            with pytest.raises(SandboxRunError) as info:
                await c.run_sandbox(pod())
            assert "no network today" in str(info.value)
            assert info.value.step == "setup_namespaces"
            assert info.value.leftovers == []
            assert await c.list_sandboxes() == []
        assert env.leftovers() == {}
        assert not [i for i in os.listdir("/sys/class/net") if i.startswith("veth")
                    and os.path.realpath(f"/sys/class/net/{i}/master").endswith(env.bridge)]
    finally:
        destroy_env(env)


@pytest.mark.parametrize("verb", ["create", "start"])
async def test_runtime_that_fails_unwinds_to_nothing(runtime: str, verb: str,
                                                     tmp_path: Path) -> None:
    real = shutil.which(runtime)
    wrapper = _script(tmp_path / runtime, f"""
for a in "$@"; do
  if [ "$a" = "{verb}" ]; then echo "refusing to {verb} today" >&2; exit 1; fi
done
exec {real} "$@"
""")
    env = make_env(runtime, runtime_binary=wrapper)
    try:
        async with env.controller() as c:
            with pytest.raises(SandboxRunError) as info:
                await c.run_sandbox(pod())
            assert f"refusing to {verb} today" in str(info.value)
            assert info.value.leftovers == []
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


async def test_pause_that_dies_at_once_unwinds_to_nothing(runtime: str, tmp_path: Path) -> None:
    # A pause binary that exits (status 3) the moment it is exec'd. Usually the post-start
    # check sees it gone and the run unwinds; if it dies just after the check, the sandbox is
    # Ready for a moment and supervision takes it to NotReady. Either way nothing may be left
    # once it is removed.
    pause = exiting_static_binary(str(tmp_path / "exit3"), status=3)
    env = make_env(runtime, pause_binary=pause)
    try:
        async with env.controller() as c:
            try:
                st = await c.run_sandbox(pod())
            except SandboxRunError as exc:
                assert exc.leftovers == []
                assert exc.step in ("start_task", "mark_ready")
                assert await c.list_sandboxes() == []
            else:
                await wait_for_state(c, st.id, State.NOT_READY, within=1.0)
                assert (await c.sandbox_status(st.id)).exit_status == 3
                await c.remove_sandbox(st.id)
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


# ---------------------------------------------------------------- prerequisites


async def test_missing_runtime_is_named(tmp_path: Path) -> None:
    env = make_env("runc", runtime_binary=str(tmp_path / "no-such-runc"))
    try:
        with pytest.raises(PrerequisiteMissing, match="no-such-runc"):
            async with env.controller():
                pass
    finally:
        destroy_env(env)


async def test_missing_cni_plugin_is_named(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    env = make_env("runc", cni_bin_dirs=(str(tmp_path / "bin"),))
    try:
        with pytest.raises(PrerequisiteMissing, match="bridge"):
            async with env.controller():
                pass
    finally:
        destroy_env(env)


def test_not_root_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    code = ("import asyncio, podfsm\n"
            f"cfg = podfsm.ControllerConfig(state_dir='{tmp_path}/s', run_dir='{tmp_path}/r', "
            f"netns_dir='{tmp_path}/n')\n"
            "async def main():\n"
            "    async with podfsm.Controller(cfg): pass\n"
            "asyncio.run(main())\n")
    import sys

    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, cwd=os.getcwd())
    assert out.returncode != 0
    assert "must run as root" in out.stderr
