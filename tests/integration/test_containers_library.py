"""The container verbs of the library on the real system (runc and crun): filters, logs
(follow too), stop signal and timeout, resource updates in the cgroup, exec timeouts, names,
images, refusals that leave nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from podfsm import Controller
from podfsm.core.containerstates import ContainerState
from podfsm.core.errors import (
    ContainerNameReserved,
    ContainerNotFound,
    ExecTimeout,
    ImageNotFound,
    InvalidContainerConfig,
)
from tests import imagekit as ik
from tests.integration.conftest import Env, pod
from tests.integration.test_containers_durability import IMAGE, registry  # noqa: F401

pytestmark = pytest.mark.integration


def ctr(name: str, cmd: list[str], **kw: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "image": {"image": IMAGE}, "command": cmd,
            "log_path": f"{name}.log", **kw}


def _cgroup_file(pid: int, controller: str, name: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path(f"/sys/fs/cgroup/{controller}{path}/{name}")
    raise AssertionError(f"no {controller} cgroup for {pid}")


async def test_the_container_verbs(env: Env, registry: ik.Registry) -> None:  # noqa: F811
    certs = os.path.join(env.tmp, "certs.d")
    ik.hosts_toml(certs, "registry.k8s.io", registry.url)
    env.cfg = env.cfg.model_copy(update={"registry_config_dir": certs})
    logs = os.path.join(env.tmp, "logs")
    p = pod("lib", userns={"mode": "NODE"})
    p["log_directory"] = logs
    async with Controller(env.cfg) as ctl:
        st = await ctl.run_sandbox(p)
        with pytest.raises(ImageNotFound):
            await ctl.create_container(st.id, ctr("x", ["true"]))
        await ctl.pull_image(IMAGE)
        with pytest.raises(InvalidContainerConfig, match="host_path"):
            await ctl.create_container(st.id, ctr("x", ["true"], mounts=[
                {"container_path": "/m", "host_path": os.path.join(env.tmp, "missing")}]))
        assert await ctl.list_containers() == [] and env.container_dirs() == []

        a = await ctl.create_container(st.id, ctr("a", ["sh", "-c", "trap '' TERM; "
                                                        "while true; do sleep 0.1; done"],
                                                  labels={"role": "stubborn"}))
        with pytest.raises(ContainerNameReserved, match="'a'"):
            await ctl.create_container(st.id, ctr("a", ["true"]))
        b = await ctl.create_container(st.id, ctr("b", ["sh", "-c", "for i in 1 2 3; do "
                                                        "echo line$i; sleep 0.2; done"],
                                                  labels={"role": "talker"}))
        assert [s.id for s in await ctl.list_containers(labels={"role": "talker"})] == [b]
        assert {s.id for s in await ctl.list_containers(
            state=[ContainerState.CREATED])} == {a, b}
        assert [s.id for s in await ctl.list_containers(id_prefix=a[:8])] == [a]
        assert await ctl.list_containers(sandbox_id="f" * 64) == []
        await ctl.start_container(a)
        await ctl.start_container(b)
        lines = [line async for line in ctl.container_logs(b, follow=True)]
        assert [line.split(" ", 3)[1:] for line in lines] == [
            ["stdout", "F", f"line{i}"] for i in (1, 2, 3)]
        assert (await ctl.container_status(b)).exit_code == 0
        assert (await ctl.container_status(b)).reason == "Completed"

        # resources changed in place: the memory cgroup's limit
        sa = await ctl.container_status(a)
        assert sa.pid is not None
        from podfsm.core.spec import LinuxContainerResources

        await ctl.update_container_resources(a, LinuxContainerResources(
            memory_limit_in_bytes=64 << 20, cpu_shares=256))
        assert int(_cgroup_file(sa.pid, "memory", "memory.limit_in_bytes").read_text()) \
            == 64 << 20
        assert int(_cgroup_file(sa.pid, "cpu", "cpu.shares").read_text()) == 256

        # an exec past its timeout is killed
        with pytest.raises(ExecTimeout):
            await ctl.exec_sync(a, ["sleep", "7777"], 1)
        # no process of the pod has 7777 in its command line (the pattern spares grep's own)
        res = await ctl.exec_sync(a, ["sh", "-c", "grep -l '77[7]7' /proc/[0-9]*/cmdline; true"],
                                  10)
        assert res.stdout == "", res

        # SIGTERM ignored: SIGKILL once the timeout passes
        t0 = time.monotonic()
        await ctl.stop_container(a, 1)
        took = time.monotonic() - t0
        sa = await ctl.container_status(a)
        assert (sa.state, sa.exit_code) == (ContainerState.EXITED, 137) and 0.9 < took < 8
        await ctl.stop_container(a, 1)  # idempotent
        await ctl.remove_container(a)
        await ctl.remove_container(a)  # idempotent
        with pytest.raises(ContainerNotFound):
            await ctl.container_status(a)
        await anyio.lowlevel.checkpoint()
        await ctl.remove_sandbox(st.id)
        assert await ctl.list_containers() == []
    assert env.leftovers() == {}
