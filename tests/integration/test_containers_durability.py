"""Containers crashed at every failpoint: a controller in a child process SIGKILLs itself at
`container_<step>.before/.after` (PODFSM_FAILPOINTS=...=crash) while it creates, starts, stops
or removes a container beside a running one; the next controller recovers: the survivor runs
on (its log still growing), the victim is finished or unwound, and once the pod is removed
nothing is left (no mount, no conmon, no container, no directory). The same steps failing with
`error` unwind what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from podfsm import Controller
from podfsm.core import failpoints as fp
from podfsm.core.containerstates import ContainerState
from podfsm.core.errors import PodfsmError
from podfsm.drivers import idmapmounts
from tests import imagekit as ik
from tests.integration.conftest import Env, destroy_env, make_env, pod
from tests.integration.test_containers_cri import E2E, busybox_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMAGE = f"registry.k8s.io/{E2E}/busybox:1.29-2"
CREATE_POINTS = [f"{s}.{w}" for s in fp.CONTAINER_STEPS[:4] for w in ("before", "after")]
CASES = ([(p, None) for p in CREATE_POINTS]
         + [(f"container_stop.{w}", "stop") for w in ("before", "after")]
         + [(f"container_remove.{w}", "remove") for w in ("before", "after")])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_image(), "1.29-2")
        yield reg


def _env(registry: ik.Registry, runtime: str) -> Env:
    env = make_env(runtime)
    certs = os.path.join(env.tmp, "certs.d")
    ik.hosts_toml(certs, "registry.k8s.io", registry.url)
    env.cfg = env.cfg.model_copy(update={"registry_config_dir": certs})
    return env


def _logpod(env: Env, userns: str = "NODE") -> dict[str, Any]:
    p = pod("ctrpod", userns={"mode": userns})
    p["log_directory"] = os.path.join(env.tmp, "logs")
    return p


def _child(env: Env, failpoints: str, then: str | None,
           userns: str = "NODE") -> tuple[int, str, str]:
    volume = None
    if userns == "POD":  # the idmapped rootfs and an idmapped volume are crashed too
        volume = os.path.join(env.tmp, "vol")
        os.makedirs(volume, exist_ok=True)
    spec = {"cfg": env.cfg.model_dump(mode="json"), "image": IMAGE,
            "pod": _logpod(env, userns), "then": then, "volume": volume}
    r = subprocess.run([sys.executable, "-m", "tests.integration.containerchild",
                        json.dumps(spec)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PODFSM_FAILPOINTS": failpoints},
                       check=False)
    return r.returncode, r.stdout, r.stderr


def _said(out: str, word: str) -> str | None:
    return next((line.split()[1] for line in out.splitlines() if line.startswith(word + " ")),
                None)


@pytest.mark.parametrize("userns", ["NODE", "POD"])
@pytest.mark.parametrize("runtime", ["runc", "crun"])
@pytest.mark.parametrize(("point", "then"), CASES)
async def test_crash_at_every_container_failpoint(registry: ik.Registry, runtime: str,
                                                  point: str, then: str | None,
                                                  userns: str) -> None:
    env = _env(registry, runtime)
    try:
        rc, out, err = _child(env, f"{point}=crash", then, userns)
        assert rc == -signal.SIGKILL, f"the failpoint was not met: {out}{err}"
        survivor, victim = _said(out, "survivor"), _said(out, "victim")
        assert survivor is not None
        log = Path(env.tmp, "logs", "survivor.log")
        before = len(log.read_text().splitlines())
        async with Controller(env.cfg) as ctl:
            assert ctl.recovery_problems == []
            sts = {s.name: s for s in await ctl.list_containers()}
            assert sts["survivor"].state is ContainerState.RUNNING
            await anyio.sleep(0.3)
            assert len(log.read_text().splitlines()) > before  # it ran on, and still does
            res = await ctl.exec_sync(survivor, ["echo", "up"], 10)
            assert (res.exit_code, res.stdout) == (0, "up\n")
            got = sts.get("victim")
            if then == "remove" or point.startswith(("container_mount_rootfs",
                                                     "container_write_bundle",
                                                     "container_start_monitor.before")):
                assert got is None, got  # finished, or unwound
            elif then == "stop":
                assert got is not None and got.state is ContainerState.EXITED
                assert got.exit_code == 137
            elif point == "container_start_monitor.after":
                assert got is None  # create's last record never said Created: unwound
            elif point == "container_start.before":
                assert got is not None and got.state is ContainerState.CREATED
            else:  # started, the record not yet saying so
                assert got is not None and got.state is ContainerState.RUNNING, got
            if victim is not None and got is None:
                assert victim not in env.workload_containers()
            for st in await ctl.list_sandboxes():
                await ctl.remove_sandbox(st.id)
            assert await ctl.list_containers() == []
        assert env.leftovers() == {}
        assert idmapmounts.mounts_under(env.tmp) == []
    finally:
        destroy_env(env)


@pytest.mark.parametrize("userns", ["NODE", "POD"])
@pytest.mark.parametrize("point", [p for p in fp.NAMES if p.startswith("container_")])
async def test_error_at_every_container_failpoint_unwinds(registry: ik.Registry,
                                                          point: str, userns: str) -> None:
    env = _env(registry, "runc")
    try:
        async with Controller(env.cfg, failpoints=f"{point}=1*error") as ctl:
            await ctl.pull_image(IMAGE)
            st = await ctl.run_sandbox(_logpod(env, userns))
            cfg: dict[str, Any] = {"metadata": {"name": "v"}, "image": {"image": IMAGE},
                                   "command": ["sleep", "1000"]}
            if userns == "POD":  # an idmapped volume beside the idmapped rootfs
                os.makedirs(os.path.join(env.tmp, "vol"), exist_ok=True)
                cfg["mounts"] = [{"container_path": "/vol",
                                  "host_path": os.path.join(env.tmp, "vol")}]
            try:
                cid = await ctl.create_container(st.id, cfg)
            except PodfsmError as exc:
                assert point.split(".")[0] in fp.CONTAINER_STEPS[:3], exc
                assert await ctl.list_containers() == []  # nothing of it
                assert env.container_dirs() == [] and env.workload_containers() == []
            else:
                try:
                    await ctl.start_container(cid)
                except PodfsmError:
                    assert point.startswith("container_start.")
                    s = await ctl.container_status(cid)
                    # before: nothing ran; after: it did start (the runtime says so)
                    assert s.state in (ContainerState.EXITED, ContainerState.CREATED)
                with_error = False
                try:
                    await ctl.stop_container(cid, 0)
                    await ctl.remove_container(cid)
                except PodfsmError:
                    with_error = True
                    assert point.startswith(("container_stop.", "container_remove."))
                if with_error:  # the one error was spent: it goes through now
                    await ctl.remove_container(cid)
            await ctl.remove_sandbox(st.id)
            assert await ctl.list_containers() == []
        assert env.leftovers() == {}
    finally:
        destroy_env(env)
