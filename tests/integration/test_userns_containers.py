"""Containers in a pod with its own user namespace, through the controller, checked from
outside on runc and crun: the container joins the pause's user namespace (its uid_map is the
pod's), its rootfs is an overlay over idmapped layers (busybox is 0:0 inside; what it writes is
the mapped uid on the host), its process is the mapped host uid, its /sys is a sysfs of the
pod's netns, a host-path volume is idmapped (on runc too, which ignores OCI mount idmaps), and
after remove nothing is mounted. Mode NODE: the host's uid_map."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from podfsm import Controller
from podfsm.core.errors import PodfsmError
from podfsm.drivers import idmapmounts, linux
from tests import imagekit as ik
from tests.integration.conftest import Env, destroy_env, make_env, pod
from tests.integration.test_containers_cri import E2E, busybox_image
from tests.integration.test_idmap import EXPLICIT, make_tree, owners, report

pytestmark = pytest.mark.integration

IMAGE = f"registry.k8s.io/{E2E}/busybox:1.29-2"

CHECKS = "; ".join([
    "echo busybox=$(stat -c %u:%g /bin/busybox)",
    "echo uid_map=$(cat /proc/self/uid_map)",
    "echo net=$(ls /sys/class/net)",
    "echo sysfs=$(stat -f -c %T /sys)",
    "echo id=$(id -u)",
    "echo userns=$(readlink /proc/self/ns/user)",
    "echo created=$(echo hi > /created && echo yes)",
    "echo vol=$(cat /vol/data) $(stat -c %u:%g /vol/data)",
    "echo volw=$(echo x 2>/dev/null > /volw/new && echo yes || echo no)",
])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_image(), "1.29-2")
        yield reg


@pytest.fixture(params=["runc", "crun"])
def uenv(request: pytest.FixtureRequest, registry: ik.Registry) -> Iterator[Env]:
    env = make_env(request.param)
    certs = os.path.join(env.tmp, "certs.d")
    ik.hosts_toml(certs, "registry.k8s.io", registry.url)
    env.cfg = env.cfg.model_copy(update={"registry_config_dir": certs})
    try:
        yield env
    finally:
        destroy_env(env)


def _status_uid(pid: int) -> tuple[int, int]:
    fields = {k: v.split() for k, _, v in (line.partition(":") for line in
                                           Path(f"/proc/{pid}/status").read_text().splitlines())}
    return int(fields["Uid"][0]), int(fields["Gid"][0])


def _volumes(env: Env) -> tuple[str, str]:
    vol, volw = os.path.join(env.tmp, "vol"), os.path.join(env.tmp, "volw")
    make_tree(vol, {"data": ("volume data\n", 0)})
    os.chmod(vol, 0o755)
    os.makedirs(volw)
    return vol, volw


def _config(vol: str, volw: str, userns: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "metadata": {"name": "c"}, "image": {"image": IMAGE}, "command": ["sleep", "1000"],
        "mounts": [{"container_path": "/vol", "host_path": vol, "readonly": True},
                   {"container_path": "/volw", "host_path": volw}],
    }
    if userns is not None:  # as kubelet sends it: a copy of the pod's
        cfg["linux"] = {"security_context": {"namespace_options": {"userns_options": userns}}}
    return cfg


@pytest.mark.parametrize("ids", ["allocated", "explicit"])
async def test_a_container_in_a_user_namespaced_pod_is_seen_from_outside_as_the_pods(
        uenv: Env, ids: str) -> None:
    env = uenv
    userns = None if ids == "allocated" else {"mode": "POD", "uids": [EXPLICIT],
                                              "gids": [EXPLICIT]}
    vol, volw = _volumes(env)
    async with Controller(env.cfg) as ctl:
        await ctl.pull_image(IMAGE)
        st = await ctl.run_sandbox(pod("uctr", userns=userns))
        assert st.userns_path and st.uid_mappings
        mapping = st.uid_mappings[0].model_dump()
        if ids == "explicit":
            assert mapping == EXPLICIT
        host = mapping["host_id"]
        cid = await ctl.create_container(st.id, _config(vol, volw, userns))
        await ctl.start_container(cid)
        cst = await ctl.container_status(cid)
        assert cst.pid is not None
        assert _status_uid(cst.pid) == (host, host)               # the mapped host uid
        assert os.readlink(f"/proc/{cst.pid}/ns/user") == \
            f"user:[{os.stat(st.userns_path).st_ino}]"            # the pause's namespace
        res = await ctl.exec_sync(cid, ["sh", "-c", CHECKS], 30)
        assert res.exit_code == 0, res.stderr
        got = report(res.stdout.splitlines())
        assert got["busybox"] == "0:0", res.stdout                # image files are root's
        assert got["uid_map"].split() == ["0", str(host), "65536"]
        assert sorted(got["net"].split()) == ["eth0", "lo"]       # the pod's interfaces only
        assert got["sysfs"] == "sysfs"
        assert got["id"] == "0"
        assert got["userns"] == f"user:[{os.stat(st.userns_path).st_ino}]"
        assert got["created"] == "yes"
        assert got["vol"] == "volume data 0:0"                    # volume owner mapped
        assert got["volw"] == "yes"
        upper = os.path.join(env.cfg.state_dir, "containers", cid, "upper")
        assert owners(os.path.join(upper, "created")) == [f"{host}:{host}"]
        # through an idmapped volume a write is stored with the container's own ids (as
        # containerd's idmapped mounts do): the host path stays the pod's to share
        assert owners(os.path.join(volw, "new")) == ["0:0"]
        ctr_dir = os.path.join(env.cfg.state_dir, "containers", cid)
        assert len(idmapmounts.mounts_under(ctr_dir)) == 3        # rootfs and two volumes
        await ctl.stop_container(cid, 0)
        await ctl.remove_container(cid)
        # no overlay, no idmapped mount (the pod's own shm and pins stay until it goes)
        assert idmapmounts.mounts_under(os.path.join(env.cfg.state_dir, "containers")) == []
        assert not os.path.exists(ctr_dir)
        assert owners(os.path.join(vol, "data")) == ["0:0"]       # the source untouched
        await ctl.remove_sandbox(st.id)
    assert env.leftovers() == {}
    assert idmapmounts.mounts_under(env.tmp) == []


async def test_a_container_in_a_pod_without_a_user_namespace_sees_the_hosts_uid_map(
        uenv: Env) -> None:
    env = uenv
    vol, volw = _volumes(env)
    async with Controller(env.cfg) as ctl:
        await ctl.pull_image(IMAGE)
        st = await ctl.run_sandbox(pod("nodectr", userns={"mode": "NODE"}))
        cid = await ctl.create_container(st.id, _config(vol, volw, {"mode": "NODE"}))
        await ctl.start_container(cid)
        res = await ctl.exec_sync(cid, ["cat", "/proc/self/uid_map"], 30)
        assert res.stdout.split() == Path("/proc/self/uid_map").read_text().split()
        cst = await ctl.container_status(cid)
        assert cst.pid is not None and _status_uid(cst.pid) == (0, 0)
        await ctl.stop_container(cid, 0)
        await ctl.remove_container(cid)
        await ctl.remove_sandbox(st.id)
    assert env.leftovers() == {}


async def test_a_containers_userns_options_must_be_its_pods(uenv: Env) -> None:
    env = uenv
    vol, volw = _volumes(env)
    async with Controller(env.cfg) as ctl:
        await ctl.pull_image(IMAGE)
        st = await ctl.run_sandbox(pod("mismatch"))
        with pytest.raises(Exception, match="does not match its pod") as info:
            await ctl.create_container(st.id, _config(vol, volw, {"mode": "NODE"}))
        assert type(info.value).__name__ == "InvalidContainerConfig"
        other = {**EXPLICIT, "host_id": EXPLICIT["host_id"] + 65536}
        with pytest.raises(Exception, match="not its pod's mappings"):
            await ctl.create_container(st.id, _config(vol, volw, {
                "mode": "POD", "uids": [other], "gids": [other]}))
        assert await ctl.list_containers() == [] and env.container_dirs() == []
        await ctl.remove_sandbox(st.id)
    assert env.leftovers() == {}


async def test_a_volume_on_a_filesystem_that_cannot_be_idmapped_is_refused_naming_it(
        uenv: Env) -> None:
    """An overlay cannot be the source of an idmapped mount (EINVAL): the container is refused
    naming the filesystem, never given a chowned copy, and nothing of it is left."""
    env = uenv
    base = os.path.join(env.tmp, "ovl")
    dirs = {n: os.path.join(base, n) for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        os.makedirs(d)
    linux.mount("overlay", dirs["merged"], "overlay", 0,
                f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}")
    try:
        async with Controller(env.cfg) as ctl:
            await ctl.pull_image(IMAGE)
            st = await ctl.run_sandbox(pod("noidmap"))
            cfg = {"metadata": {"name": "c"}, "image": {"image": IMAGE},
                   "command": ["sleep", "1000"],
                   "mounts": [{"container_path": "/vol", "host_path": dirs["merged"]}]}
            with pytest.raises(PodfsmError, match="overlay") as info:
                await ctl.create_container(st.id, cfg)
            assert "idmap" in str(info.value).lower() or "EINVAL" in str(info.value)
            assert await ctl.list_containers() == [] and env.container_dirs() == []
            assert idmapmounts.mounts_under(os.path.join(env.cfg.state_dir,
                                                         "containers")) == []
            await ctl.remove_sandbox(st.id)
    finally:
        idmapmounts.unmount(dirs["merged"])
    assert env.leftovers() == {}
