"""The pause container's config.json: namespaces joined by path, id mappings, the sysfs choice,
a read-only root, the cgroup path, and no side effects."""

from __future__ import annotations

import builtins
import copy
import json
import os
import subprocess
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podfsm.core.ocispec import cgroups_path, pause_spec
from podfsm.core.requests import PauseRequest
from podfsm.core.spec import IDMapping

ROOTFS = "/run/podfsm/pause-rootfs"
NETNS = "/run/netns/cni-1234"
USERNS = "/var/lib/podfsm/sandboxes/abc/user"
MAP = IDMapping(host_id=100000, container_id=0, length=65536)


def request(
    *, netns: str | None = NETNS, userns: str | None = USERNS,
    uid: IDMapping | None = MAP, gid: IDMapping | None = MAP, **kw: Any,
) -> PauseRequest:
    return PauseRequest(
        container_id=kw.pop("container_id", "c0ffee"), hostname=kw.pop("hostname", "pod-a"),
        netns_path=netns, userns_path=userns, uid_mapping=uid, gid_mapping=gid, **kw,
    )


def mount_at(spec: dict[str, Any], destination: str) -> dict[str, Any]:
    found = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(found) == 1, f"expected exactly one mount at {destination}: {found}"
    only: dict[str, Any] = found[0]
    return only


def namespaces(spec: dict[str, Any]) -> dict[str, str | None]:
    return {ns["type"]: ns.get("path") for ns in spec["linux"]["namespaces"]}


def test_pid_ipc_mount_are_new_and_uts_too_with_the_pods_network() -> None:
    for req in (request(), request(netns=None), request(userns=None), request(netns=None,
                                                                               userns=None)):
        ns = namespaces(pause_spec(req, rootfs=ROOTFS))
        kinds = ("pid", "ipc", "uts", "mount") if req.netns_path else ("pid", "ipc", "mount")
        for kind in kinds:
            assert kind in ns and ns[kind] is None
        # network NODE: the host's UTS namespace, and so no hostname in the spec (containerd)
        assert ("uts" in ns) == (req.netns_path is not None)


def test_pinned_user_and_network_namespaces_are_joined_by_path() -> None:
    ns = namespaces(pause_spec(request(), rootfs=ROOTFS))
    assert ns["network"] == NETNS
    assert ns["user"] == USERNS


def test_no_netns_path_means_host_network_and_no_userns_path_means_host_userns() -> None:
    ns = namespaces(pause_spec(request(netns=None, userns=None), rootfs=ROOTFS))
    assert "network" not in ns
    assert "user" not in ns


def test_mappings_are_written_when_a_user_namespace_is_joined() -> None:
    uid = IDMapping(host_id=200000, container_id=0, length=65536)
    gid = IDMapping(host_id=300000, container_id=0, length=1000)
    linux = pause_spec(request(uid=uid, gid=gid), rootfs=ROOTFS)["linux"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 200000, "size": 65536}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": 300000, "size": 1000}]


def test_no_mappings_without_a_user_namespace() -> None:
    linux = pause_spec(request(userns=None), rootfs=ROOTFS)["linux"]
    assert "uidMappings" not in linux
    assert "gidMappings" not in linux


def test_runc_refuses_to_join_a_user_namespace_without_mappings() -> None:
    with pytest.raises(ValueError, match="mappings"):
        pause_spec(request(uid=None, gid=None), rootfs=ROOTFS, runtime="runc")


def test_crun_joins_a_user_namespace_without_mappings() -> None:
    linux = pause_spec(request(uid=None, gid=None), rootfs=ROOTFS, runtime="crun")["linux"]
    assert namespaces({"linux": linux})["user"] == USERNS
    assert "uidMappings" not in linux


def test_own_netns_gets_a_fresh_read_only_sysfs() -> None:
    for userns in (USERNS, None):
        sys_mount = mount_at(pause_spec(request(userns=userns), rootfs=ROOTFS), "/sys")
        assert sys_mount["type"] == "sysfs"
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(sys_mount["options"])


def test_userns_with_host_network_binds_the_host_sys_read_only() -> None:
    # sysfs cannot be mounted: the host netns is owned by the host user namespace.
    sys_mount = mount_at(pause_spec(request(netns=None), rootfs=ROOTFS), "/sys")
    assert sys_mount["type"] == "bind"
    assert sys_mount["source"] == "/sys"
    assert {"rbind", "ro", "rro", "nosuid", "nodev", "noexec"} <= set(sys_mount["options"])


def test_host_userns_and_host_network_mounts_sysfs() -> None:
    sys_mount = mount_at(pause_spec(request(netns=None, userns=None), rootfs=ROOTFS), "/sys")
    assert sys_mount["type"] == "sysfs"


def test_usual_dev_and_proc_mounts() -> None:
    spec = pause_spec(request(), rootfs=ROOTFS)
    assert mount_at(spec, "/proc")["type"] == "proc"
    assert mount_at(spec, "/dev")["type"] == "tmpfs"
    assert mount_at(spec, "/dev/pts")["type"] == "devpts"
    assert mount_at(spec, "/dev/shm")["type"] == "tmpfs"
    assert mount_at(spec, "/dev/mqueue")["type"] == "mqueue"
    assert "gid=5" in mount_at(spec, "/dev/pts")["options"]


def test_devpts_tty_group_is_dropped_when_the_pod_does_not_map_it() -> None:
    small = IDMapping(host_id=100000, container_id=0, length=3)
    spec = pause_spec(request(gid=small), rootfs=ROOTFS)
    assert not any(o.startswith("gid=") for o in mount_at(spec, "/dev/pts")["options"])


def test_root_is_the_shared_rootfs_read_only() -> None:
    assert pause_spec(request(), rootfs=ROOTFS)["root"] == {"path": ROOTFS, "readonly": True}


def test_process_is_pause_as_root_without_privileges() -> None:
    proc = pause_spec(request(), rootfs=ROOTFS)["process"]
    assert proc["args"] == ["/catatonit", "-P"]
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["cwd"] == "/"
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert any(e.startswith("PATH=") for e in proc["env"])
    for caps in proc["capabilities"].values():
        assert caps == []


def test_pause_args_can_be_chosen() -> None:
    proc = pause_spec(request(), rootfs=ROOTFS, pause_args=["/pause"])["process"]
    assert proc["args"] == ["/pause"]
    with pytest.raises(ValueError):
        pause_spec(request(), rootfs=ROOTFS, pause_args=[])


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        ("", "/podfsm/c0ffee"),
        ("/kubepods/besteffort/pod1", "/kubepods/besteffort/pod1/c0ffee"),
        ("/kubepods/", "/kubepods/c0ffee"),
        ("kubepods", "/kubepods/c0ffee"),
        # verbatim: the teardown removes the parent by the same name (issue 17, item 13)
        ("/podfsm/x ", "/podfsm/x /c0ffee"),
        ("/podfsm/x\u3000//", "/podfsm/x\u3000/c0ffee"),
    ],
)
def test_cgroups_path(parent: str, expected: str) -> None:
    assert cgroups_path("c0ffee", parent) == expected
    spec = pause_spec(request(cgroup_parent=parent), rootfs=ROOTFS)
    assert spec["linux"]["cgroupsPath"] == expected


def test_hostname_sysctls_and_annotations() -> None:
    spec = pause_spec(
        request(sysctls={"net.ipv4.ping_group_range": "0 2147483647"},
                annotations={"example.com/a": "1", "run.oci.pidfd_receiver": "/x.sock"},
                annotation_patterns=("example.com/*",)),
        rootfs=ROOTFS,
    )
    assert spec["hostname"] == "pod-a"
    assert spec["linux"]["sysctl"] == {"net.ipv4.ping_group_range": "0 2147483647"}
    assert spec["annotations"] == {"example.com/a": "1",
                                   "io.kubernetes.cri.container-type": "sandbox",
                                   "io.kubernetes.cri.sandbox-id": "c0ffee"}
    assert "sysctl" not in pause_spec(request(), rootfs=ROOTFS)["linux"]
    assert "hostname" not in pause_spec(request(hostname=""), rootfs=ROOTFS)


def test_masked_and_readonly_paths_like_runc() -> None:
    linux = pause_spec(request(), rootfs=ROOTFS)["linux"]
    assert {"/proc/kcore", "/proc/keys", "/sys/firmware"} <= set(linux["maskedPaths"])
    assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(linux["readonlyPaths"])


def test_spec_is_deterministic_and_does_not_alias_the_request() -> None:
    req = request(sysctls={"b": "2", "a": "1"}, annotations={"y": "1", "x": "2"})
    before = copy.deepcopy(req)
    one = pause_spec(req, rootfs=ROOTFS)
    two = pause_spec(req, rootfs=ROOTFS)
    assert json.dumps(one) == json.dumps(two)
    one["annotations"]["z"] = "mutated"
    one["linux"]["sysctl"]["c"] = "3"
    assert req == before
    assert pause_spec(req, rootfs=ROOTFS) == two


def test_spec_generation_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"pause_spec did I/O: {args!r}")

    for mod, name in ((builtins, "open"), (os, "open"), (os, "stat"), (os, "lstat"),
                      (os, "listdir"), (os, "access"), (subprocess, "Popen")):
        monkeypatch.setattr(mod, name, forbidden)
    spec = pause_spec(request(netns=None), rootfs=ROOTFS)
    assert spec["root"]["path"] == ROOTFS


mappings = st.builds(
    lambda host_id, length: IDMapping(host_id=host_id, container_id=0, length=length),
    host_id=st.integers(65536, 1 << 31),
    length=st.integers(1, 1 << 20),
)


@given(
    netns=st.one_of(st.none(), st.just(NETNS)),
    userns=st.one_of(st.none(), st.just(USERNS)),
    uid=mappings,
    gid=mappings,
    runtime=st.sampled_from(["runc", "crun"]),
)
def test_invariants_for_every_namespace_combination(
    netns: str | None, userns: str | None, uid: IDMapping, gid: IDMapping, runtime: str
) -> None:
    spec = pause_spec(request(netns=netns, userns=userns, uid=uid, gid=gid),
                      rootfs=ROOTFS, runtime=runtime)
    json.dumps(spec)  # serialisable as config.json
    kinds = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert len(kinds) == len(set(kinds))
    destinations = [m["destination"] for m in spec["mounts"]]
    assert len(destinations) == len(set(destinations))
    sys_mount = mount_at(spec, "/sys")
    assert sys_mount["type"] == ("bind" if userns and not netns else "sysfs")
    assert "ro" in sys_mount["options"]
    assert spec["root"]["readonly"] is True
    assert ("uidMappings" in spec["linux"]) == (userns is not None)
