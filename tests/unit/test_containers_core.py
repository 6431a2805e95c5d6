"""The container half's pure core: the state table, the ContainerConfig model and its doc
table, the OCI spec as containerd builds it, users from the image's /etc files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from podfsm.core import containerspec
from podfsm.core.containeroci import (
    DEFAULT_CAPS,
    ContainerSpecInput,
    HostDevice,
    User,
    capabilities,
    container_spec,
    environment,
    process_args,
    resolve_user,
    signal_number,
    stop_signal,
)
from podfsm.core.containerstates import (
    COMPENSATIONS,
    TRANSITIONS,
    ContainerState,
    ContainerTrigger,
    CreateStep,
    lifecycle_kind,
    next_state,
)
from podfsm.core.errors import InvalidContainerConfig
from podfsm.core.records import SandboxFiles
from podfsm.core.spec import NamespaceMode

DOCS = Path(__file__).resolve().parents[2] / "docs"
S, T = ContainerState, ContainerTrigger


def cfg(**kw: Any) -> containerspec.ContainerConfig:
    data = {"metadata": {"name": "c"}, "image": {"image": "busybox"}, **kw}
    return containerspec.parse_container_config(data)


def test_the_table_walks_unknown_created_running_exited() -> None:
    assert next_state(S.UNKNOWN, T.CREATE) is S.CREATED
    assert next_state(S.CREATED, T.START) is S.RUNNING
    assert next_state(S.RUNNING, T.EXIT) is S.EXITED
    assert next_state(S.EXITED, T.REMOVE) is S.UNKNOWN
    with pytest.raises(ValueError, match="Exited cannot start"):
        next_state(S.EXITED, T.START)
    assert all(t.doc for t in TRANSITIONS)
    assert set(COMPENSATIONS) == set(CreateStep)
    assert lifecycle_kind(T.CREATE, S.UNKNOWN, S.CREATED) == "created"
    assert lifecycle_kind(T.STOP, S.EXITED, S.EXITED) is None
    assert lifecycle_kind(T.REMOVE, S.UNKNOWN, S.UNKNOWN) is None


def test_refusals_name_the_field() -> None:
    for kw, word in (({"linux": {"security_context": {"privileged": True}}}, "privileged"),
                     ({"devices": [{"container_path": "dev/x", "host_path": "/dev/x"}]},
                      "container_path"),
                     ({"devices": [{"container_path": "/dev/x", "host_path": "/dev/x",
                                    "permissions": "rwx"}]}, "permissions"),
                     ({"log_path": "../x"}, "log_path"),
                     ({"mounts": [{"container_path": "rel", "host_path": "/x"}]},
                      "container_path"),
                     ({"mounts": [{"container_path": "/a", "host_path": "/b",
                                   "recursive_read_only": True}]}, "recursive_read_only"),
                     ({"linux": {"security_context": {"namespace_options": {"pid": 3}}}},
                      "TARGET"),
                     ({"bogus": 1}, "bogus"), ({"CDI_devices": [{"name": "x"}]}, "cdi")):
        with pytest.raises(InvalidContainerConfig, match=word):
            cfg(**kw)


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, f in model.model_fields.items():
        out.add(prefix + name)
        ann = f.annotation
        for sub in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(sub, type) and issubclass(sub, BaseModel) and \
                    sub.__module__.startswith("podfsm.core.containerspec"):
                out |= _fields(sub, f"{prefix}{name}.")
    return out


def test_container_config_md_names_every_field() -> None:
    """docs/container-config.md has a row per field of the model (and no other)."""
    text = (DOCS / "container-config.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_.]+)` \|", text, re.MULTILINE))
    want = _fields(containerspec.ContainerConfig)
    assert want - rows == set(), f"not in docs/container-config.md: {sorted(want - rows)}"
    assert rows - want == set(), f"not fields any more: {sorted(rows - want)}"


def test_args_env_caps_and_signal_as_containerd() -> None:
    img = {"Entrypoint": ["/ep"], "Cmd": ["a"], "Env": ["PATH=/bin", "X=1"],
           "StopSignal": "SIGQUIT"}
    assert process_args(cfg(), img) == ["/ep", "a"]
    assert process_args(cfg(args=["b"]), img) == ["/ep", "b"]
    assert process_args(cfg(command=["top"]), img) == ["top"]
    with pytest.raises(ValueError, match="no command"):
        process_args(cfg(), {})
    env = environment(cfg(envs=[{"key": "X", "value": "2"}]), img, "h")
    assert env == ["HOSTNAME=h", "PATH=/bin", "X=2"]
    assert capabilities(cfg()) == list(DEFAULT_CAPS)
    caps = capabilities(cfg(linux={"security_context": {"capabilities": {
        "add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["KILL"]}}}))
    assert "CAP_NET_ADMIN" in caps and "CAP_KILL" not in caps
    assert capabilities(cfg(linux={"security_context": {"capabilities": {
        "add_capabilities": ["SYS_TIME"], "drop_capabilities": ["ALL"]}}})) == ["CAP_SYS_TIME"]
    assert stop_signal(cfg(), img) == "SIGQUIT" and stop_signal(cfg(), {}) == "SIGTERM"
    assert signal_number("SIGKILL") == 9 and signal_number("TERM") == 15
    with pytest.raises(ValueError):
        signal_number("SIGNOPE")


PASSWD = "root:x:0:0::/:/bin/sh\nwww-data:x:33:33::/:/bin/sh\nbob:x:1000:1000::/:/bin/sh\n"
GROUP = "root:x:0:\nwww-data:x:33:\nstaff:x:50:bob,www-data\nbob:x:1000:\n"


def test_users_from_the_images_files() -> None:
    assert resolve_user("", PASSWD, GROUP) == User(0, 0, (0,))
    assert resolve_user("www-data", PASSWD, GROUP) == User(33, 33, (33, 50))
    assert resolve_user("1000", PASSWD, GROUP, supplemental=[7]) == User(1000, 1000,
                                                                          (1000, 50, 7))
    assert resolve_user("1002", PASSWD, GROUP) == User(1002, 0, (0,))
    assert resolve_user("bob:www-data", PASSWD, GROUP).gid == 33
    assert resolve_user("1003:1004", PASSWD, GROUP).gid == 1004
    with pytest.raises(ValueError, match="nobody"):
        resolve_user("nobody", PASSWD, GROUP)
    with pytest.raises(ValueError, match="grp"):
        resolve_user("bob:grp", PASSWD, GROUP)


def test_the_spec_joins_the_pause_and_binds_the_sandbox_files() -> None:
    files = SandboxFiles(hostname_path="/s/hostname", hosts_path="/s/hosts",
                         resolv_conf_path="/s/resolv.conf", shm_path="/s/shm")
    c = cfg(command=["top"], mounts=[{"container_path": "/data", "host_path": "/link",
                                      "readonly": True, "propagation": 1}],
            linux={"security_context": {"readonly_rootfs": True},
                   "resources": {"cpu_shares": 512, "memory_limit_in_bytes": 1 << 26}})
    inp = ContainerSpecInput(
        container_id="c1", sandbox_id="s1", config=c, image_config={}, image_name="busybox",
        rootfs="/r", pause_pid=42, netns_path="/run/netns/x", pod_pid_mode=NamespaceMode.POD,
        pod_ipc_mode=NamespaceMode.POD, pod_hostname="h", pod_name="p", pod_namespace="n",
        pod_uid="u", files=files, cgroup_parent="/podfsm/pod", user=User(5, 6, (6,)),
        host_paths={"/data": "/real"})
    spec = container_spec(inp)
    ns = {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}
    assert ns == {"mount": None, "network": "/run/netns/x", "uts": "/proc/42/ns/uts",
                  "pid": "/proc/42/ns/pid", "ipc": "/proc/42/ns/ipc"}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/etc/hosts"]["source"] == "/s/hosts" and "ro" in mounts["/etc/hosts"][
        "options"]
    assert mounts["/dev/shm"]["source"] == "/s/shm"
    assert mounts["/data"]["source"] == "/real"
    assert mounts["/data"]["options"] == ["rbind", "rslave", "ro"]
    assert spec["root"] == {"path": "/r", "readonly": True}
    assert spec["process"]["user"] == {"uid": 5, "gid": 6, "additionalGids": [6]}
    assert spec["linux"]["cgroupsPath"] == "/podfsm/pod/c1"
    assert spec["linux"]["resources"]["cpu"] == {"shares": 512}
    assert "seccomp" not in spec["linux"]
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == "s1"
    with_dev = ContainerSpecInput(**{**inp.__dict__, "config": cfg(command=["top"], devices=[
        {"container_path": "/dev/fuse", "host_path": "/dev/fuse", "permissions": "rw"}]),
        "devices": {"/dev/fuse": HostDevice("c", 10, 229, 0o20666, 0, 0)}})
    dspec = container_spec(with_dev)
    assert dspec["linux"]["devices"] == [{"path": "/dev/fuse", "type": "c", "major": 10,
                                          "minor": 229, "fileMode": 0o666, "uid": 0,
                                          "gid": 0}]
    assert dspec["linux"]["resources"]["devices"] == [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"}]
    own = ContainerSpecInput(**{**inp.__dict__, "config": cfg(command=["top"], linux={
        "security_context": {"namespace_options": {"pid": 1}}})})
    assert {"type": "pid"} in container_spec(own)["linux"]["namespaces"]


def test_runtime_default_is_containerds_profile_for_the_capabilities() -> None:
    from podfsm.core.seccompdefault import default_profile

    plain = default_profile(DEFAULT_CAPS)
    allowed = set(plain["syscalls"][0]["names"])
    assert plain["defaultAction"] == "SCMP_ACT_ERRNO" and plain["defaultErrnoRet"] == 1
    assert {"read", "execve", "clock_nanosleep", "chroot"} <= allowed  # SYS_CHROOT is default
    assert not {"mount", "unshare", "setns", "ptrace", "reboot"} & allowed
    rules = {tuple(r["names"]): r for r in plain["syscalls"][1:]}
    assert rules[("clone3",)]["errnoRet"] == 38  # ENOSYS: the C library falls back to clone
    assert rules[("clone",)]["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    admin = default_profile([*DEFAULT_CAPS, "CAP_SYS_ADMIN"])
    assert {"mount", "unshare", "clone", "clone3"} <= set(admin["syscalls"][0]["names"])
    assert all(r["names"] != ["clone3"] for r in admin["syscalls"])
    spec = container_spec(ContainerSpecInput(
        container_id="c", sandbox_id="s", config=cfg(command=["top"], linux={
            "security_context": {"seccomp": {"profile_type": "RuntimeDefault"}}}),
        image_config={}, image_name="b", rootfs="/r", pause_pid=1, netns_path=None,
        pod_pid_mode=NamespaceMode.POD, pod_ipc_mode=NamespaceMode.POD, pod_hostname="h",
        pod_name="p", pod_namespace="n", pod_uid="u", files=None, cgroup_parent="",
        user=User()))
    assert spec["linux"]["seccomp"] == plain


def test_containers_md_shows_the_table_and_diagram_the_code_makes() -> None:
    from podfsm.core.containerstates import markdown_table, mermaid

    text = (DOCS / "containers.md").read_text()
    assert markdown_table() in text
    assert "```mermaid\n" + mermaid() + "```" in text
